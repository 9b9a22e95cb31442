import type { CallContext, NormalizedRequest } from './policy.js';

/** Picks the budget (`rateLimit`) or the policy (`keyed`) a call belongs to. */
export type KeyFunction = (request: NormalizedRequest | undefined, context: CallContext) => string | number | undefined | null;

/** The key of calls whose key function gave nothing usable, or threw. */
export const SHARED_KEY = '*';

/**
 * Runs a user's key function. A function that throws must neither crash the request nor let
 * it slip past its guard: such calls share one key, and `onError` reports the error.
 */
export function resolveKey(keyFn: KeyFunction, context: CallContext, onError: (error: unknown) => void): string {
  let key: unknown;
  try {
    key = keyFn(context.request, context);
  } catch (error) {
    onError(error);
    return SHARED_KEY;
  }
  if (typeof key === 'string') return key.length > 0 ? key : SHARED_KEY;
  if (typeof key === 'number' || typeof key === 'bigint') return String(key);
  return SHARED_KEY;
}
