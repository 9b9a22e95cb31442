import { duration, fail, finiteNumber, knownKeys, oneOf } from './validate.js';

/** How the wait before each retry is spread (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/). */
export type Jitter = 'full' | 'equal' | 'none';

export interface BackoffOptions {
  /** Wait before the first retry, before jitter. Default 100. */
  initialMs?: number;
  /** Largest wait, before jitter. Default 10000. */
  maxMs?: number;
  /** Growth factor from one retry to the next. Default 2. */
  multiplier?: number;
  /**
   * `'full'` (default): anywhere in [0, wait]; `'equal'`: in [wait/2, wait];
   * `'none'`: exactly `wait`. Jitter spreads out callers that failed together.
   */
  jitter?: Jitter;
}

/** Backoff options with every default filled in. */
export type Backoff = Required<BackoffOptions>;

/** The jitter modes `backoff.jitter` accepts. */
export const JITTERS: readonly Jitter[] = ['full', 'equal', 'none'];
const KEYS = ['initialMs', 'maxMs', 'multiplier', 'jitter'] as const;

/**
 * Validates `backoff` options for `guard` and fills in the defaults.
 * @example backoffOptions('retry', { initialMs: 50 }); // { initialMs: 50, maxMs: 10000, multiplier: 2, jitter: 'full' }
 */
export function backoffOptions(guard: string, options: BackoffOptions | undefined): Backoff {
  if (options !== undefined && (typeof options !== 'object' || options === null || Array.isArray(options))) fail(guard, 'backoff', 'an object', options);
  const o: BackoffOptions = options ?? {};
  knownKeys(`${guard}: backoff`, o, KEYS);
  const initialMs = duration(guard, 'backoff.initialMs', o.initialMs ?? 100, true);
  const maxMs = duration(guard, 'backoff.maxMs', o.maxMs ?? Math.max(10_000, initialMs), true);
  if (maxMs < initialMs) fail(guard, 'backoff.maxMs', `at least backoff.initialMs (${initialMs})`, maxMs);
  const multiplier = finiteNumber(guard, 'backoff.multiplier', o.multiplier ?? 2, 1);
  const jitter = oneOf(guard, 'backoff.jitter', o.jitter ?? 'full', JITTERS);
  return { initialMs, maxMs, multiplier, jitter };
}

/**
 * The un-jittered wait before retry number `retry` (1 for the first retry):
 * `min(maxMs, initialMs × multiplier^(retry-1))`.
 * @example backoffCeiling(backoffOptions('retry', {}), 3); // 400
 */
export function backoffCeiling(backoff: Backoff, retry: number): number {
  // Computed step by step so that a large `retry` saturates at maxMs instead of overflowing.
  let wait = backoff.initialMs;
  for (let i = 1; i < retry && wait < backoff.maxMs; i++) wait *= backoff.multiplier;
  return Math.min(wait, backoff.maxMs);
}

/**
 * The wait before retry number `retry`, jittered with `random()` (a number in [0, 1)).
 *
 * @example
 * backoffDelay({ initialMs: 100, maxMs: 10_000, multiplier: 2, jitter: 'equal' }, 3, Math.random); // 200..400
 */
export function backoffDelay(backoff: Backoff, retry: number, random: () => number): number {
  const ceiling = backoffCeiling(backoff, retry);
  switch (backoff.jitter) {
    case 'none':
      return ceiling;
    case 'equal':
      return ceiling / 2 + unit(random()) * (ceiling / 2);
    case 'full':
      return unit(random()) * ceiling;
  }
}

/**
 * The smallest wait `backoffDelay` can return for `retry`: the floor the jitter keeps.
 * @example backoffFloor(backoffOptions('retry', { jitter: 'equal' }), 1); // 50
 */
export function backoffFloor(backoff: Backoff, retry: number): number {
  const ceiling = backoffCeiling(backoff, retry);
  return backoff.jitter === 'none' ? ceiling : backoff.jitter === 'equal' ? ceiling / 2 : 0;
}

// A user-supplied `random` that strays outside [0, 1] must not stretch the bounds.
function unit(value: number): number {
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 1) : 0;
}

/**
 * Reads an HTTP `Retry-After` value, in delay-seconds (`120`) or as an HTTP-date
 * (`Wed, 21 Oct 2015 07:28:00 GMT`), as milliseconds from `nowMs` (wall-clock time,
 * `Date.now()` by default). A date in the past gives 0; anything unreadable, undefined.
 *
 * @example
 * parseRetryAfter('2');                             // 2000
 * parseRetryAfter(new Date(Date.now() + 5000).toUTCString()); // about 5000
 */
export function parseRetryAfter(value: string | null | undefined, nowMs: number = Date.now()): number | undefined {
  if (typeof value !== 'string') return undefined;
  const text = value.trim();
  if (text === '') return undefined;
  if (/^\d+$/.test(text)) {
    const seconds = Number(text);
    return Number.isSafeInteger(seconds) ? seconds * 1000 : undefined;
  }
  // Every HTTP-date form starts with the day name; Date.parse alone would read "-1" or
  // "1.5" as dates.
  if (!/^[A-Za-z]{3}/.test(text)) return undefined;
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - nowMs);
}

/**
 * The minimum wait an error asks for: its own `retryAfterMs`, else a `Retry-After` header
 * on `error.response` (a fetch `Response`, or any object whose `headers` is a `Headers`
 * or a plain record, as axios, got and node:http give them).
 * @example retryAfterOf({ response: { headers: new Headers({ 'retry-after': '3' }) } }); // 3000
 */
export function retryAfterOf(error: unknown): number | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const own = (error as { retryAfterMs?: unknown }).retryAfterMs;
  if (typeof own === 'number' && Number.isFinite(own) && own >= 0) return own;
  const response = (error as { response?: unknown }).response;
  if (typeof response !== 'object' || response === null) return undefined;
  const headers = (response as { headers?: unknown }).headers;
  if (typeof headers !== 'object' || headers === null) return undefined;
  let value: unknown;
  if (typeof (headers as { get?: unknown }).get === 'function') {
    value = (headers as { get(name: string): unknown }).get('retry-after');
  } else {
    const record = headers as Record<string, unknown>;
    value = record['retry-after'] ?? record['Retry-After'];
  }
  if (Array.isArray(value)) value = value[0];
  return parseRetryAfter(typeof value === 'string' ? value : typeof value === 'number' ? String(value) : undefined);
}
