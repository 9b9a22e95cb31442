import { isGuardRejection, type RejectionReason } from './errors.js';
import { BasePolicy, defaultName, run, type Call, type InternalFunction, type PolicyEvents } from './policy.js';
import { func, knownKeys, name as nameOption, optionsObject } from './validate.js';

/** Why the fallback answered: the guard's rejection reason, or `'error'` for a failure of the function. */
export type FallbackReason = RejectionReason | 'error';

/** Computes the stand-in answer; may be async. */
export type FallbackFunction<R> = (reason: FallbackReason, error: unknown) => R | PromiseLike<R>;

export interface FallbackOptions {
  /** Whether this error gets the fallback; return false to let it through. Default: every error. */
  shouldFallback?: (error: unknown) => boolean;
  /** Used in events, metrics, the dashboard. Default `fallback-<n>`. */
  name?: string;
}

export interface FallbackStats {
  /** Calls since creation. */
  calls: number;
  /** Calls answered by the fallback. */
  fallbacks: number;
  /** Calls where the fallback function itself failed (the original error was thrown). */
  fallbackFailures: number;
}

export interface FallbackEvents extends PolicyEvents {
  /** The fallback answered in place of `error`. */
  fallback: { reason: FallbackReason; error: unknown };
}

const KEYS = ['shouldFallback', 'name'] as const;

/**
 * Answers with a stand-in when the call is rejected or fails: `valueOrFn` itself, or what
 * `valueOrFn(reason, error)` returns (it may be async). `reason` is the rejection's reason
 * (`'circuit_open'`, `'timeout'`, …) for a `GuardRejection` and `'error'` for anything
 * else. If the fallback function throws, the original error is thrown, not the fallback's.
 *
 * The stand-in should have the type the guarded function returns: a fallback is typed as
 * any other policy, so `execute` promises the function's own result type. To use a
 * function as the value itself, return it from a fallback function.
 *
 * @example
 * const prices = pipeline(fallback((reason) => ({ prices: [], stale: true, reason })), timeout(500));
 * const body = await prices.execute(({ signal }) => loadPrices(signal));
 */
export function fallback<R>(valueOrFn: R | FallbackFunction<R>, options?: FallbackOptions): Fallback<R> {
  return new Fallback<R>(valueOrFn, options);
}

/**
 * The policy `fallback()` returns.
 *
 * @example
 * const guard = new Fallback<string[]>([]);
 * const names = await guard.execute(() => loadNames());
 */
export class Fallback<R = unknown> extends BasePolicy<FallbackStats, FallbackEvents> {
  readonly kind = 'fallback';
  private readonly answer: R | FallbackFunction<R>;
  private readonly shouldFallback: ((error: unknown) => boolean) | undefined;
  private calls = 0;
  private fallbacks = 0;
  private fallbackFailures = 0;

  constructor(valueOrFn: R | FallbackFunction<R>, options?: FallbackOptions) {
    const o = optionsObject('fallback', options);
    knownKeys('fallback', o, KEYS);
    super(nameOption('fallback', o.name) ?? defaultName('fallback'));
    this.answer = valueOrFn;
    this.shouldFallback = o.shouldFallback === undefined ? undefined : func('fallback', 'shouldFallback', o.shouldFallback);
  }

  async [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    this.calls++;
    try {
      return await fn(call);
    } catch (error) {
      return (await this.replace(error)) as T;
    }
  }

  stats(): FallbackStats {
    return { calls: this.calls, fallbacks: this.fallbacks, fallbackFailures: this.fallbackFailures };
  }

  private async replace(error: unknown): Promise<R> {
    if (this.shouldFallback !== undefined) {
      let wanted: boolean;
      try {
        wanted = Boolean(this.shouldFallback(error));
      } catch {
        wanted = false;
      }
      if (!wanted) throw error;
    }
    const reason: FallbackReason = isGuardRejection(error) ? error.reason : 'error';
    let value: R;
    if (typeof this.answer === 'function') {
      try {
        value = await (this.answer as FallbackFunction<R>)(reason, error);
      } catch {
        this.fallbackFailures++;
        throw error;
      }
    } else {
      value = this.answer;
    }
    this.fallbacks++;
    if (this.events?.has('fallback')) this.events.emit('fallback', { reason, error });
    return value;
  }
}
