import { systemClock, type Clock } from './clock.js';
import { OverloadError, isClientDisconnected, isGuardRejection, withoutStack } from './errors.js';
import { AIMD_KEYS, AimdLimit } from './limits/aimd.js';
import { GRADIENT_KEYS, GradientLimit } from './limits/gradient.js';
import { BasePolicy, defaultName, run, type Call, type InternalFunction, type PolicyEvents } from './policy.js';
import { clockOption, func, knownKeys, name as checkName, oneOf, optionsObject } from './validate.js';

/**
 * A concurrency-limit algorithm: fed one finished call at a time, it answers the limit.
 * `lib/limits/` holds the built-in ones.
 */
export interface ConcurrencyLimit {
  /** The current limit, an integer from `minLimit` to `maxLimit`. */
  readonly limit: number;
  /**
   * One finished call: how long it took, how many calls were in flight when it started
   * (itself included), whether it was dropped (timed out, rejected for overload), and the
   * time it finished on the guard's clock. Returns the new limit.
   */
  onSample(rttMs: number, inflight: number, dropped: boolean, nowMs: number): number;
  readonly shortRttMs?: number | undefined;
  readonly longRttMs?: number | undefined;
}

export type AdaptiveConcurrencyAlgorithm = 'gradient' | 'aimd';

export interface AdaptiveConcurrencyOptions {
  /** `'gradient'` (Netflix Gradient2, the default) or `'aimd'`. */
  algorithm?: AdaptiveConcurrencyAlgorithm;
  /** The limit before anything was measured (default 20, within min..max). */
  initialLimit?: number;
  /** The limit never goes below this (default 1). */
  minLimit?: number;
  /** The limit never goes above this (default 1000). */
  maxLimit?: number;
  name?: string;
  clock?: Clock;
  /**
   * Whether a failed call means overload (and shrinks the limit). Default: timeouts,
   * overload and bulkhead rejections, and errors with status 429, 503 or 504. Other errors
   * are left out of the measurements; a client that went away always is.
   */
  isDrop?: (error: unknown) => boolean;
  /** gradient: share of each new estimate taken, (0, 1] (default 0.2). */
  smoothing?: number;
  /** gradient: how far the short RTT may exceed the long one before shrinking, >= 1 (default 1.5). */
  rttTolerance?: number;
  /** gradient: windows the long-term RTT averages over (default 600). */
  longWindow?: number;
  /** gradient: how much the limit may grow per window, > 0 (default 4). */
  queueSize?: number;
  /** gradient: shortest measuring window in ms (default 250). */
  windowMs?: number;
  /** gradient: fewest calls a window needs (default 10). */
  minWindowSamples?: number;
  /** aimd: factor applied on a drop or a slow call, in (0, 1) (default 0.9). */
  backoffRatio?: number;
  /** aimd: a call slower than this counts like a drop, in ms (default 5000). */
  latencyThresholdMs?: number;
}

export interface AdaptiveConcurrencyStats {
  algorithm: AdaptiveConcurrencyAlgorithm;
  limit: number;
  inflight: number;
  /** gradient: mean RTT of the last window; aimd: RTT of the last call (ms). */
  shortRttMs: number | undefined;
  /** gradient: the long-term RTT the short one is compared with (ms). */
  longRttMs: number | undefined;
  admitted: number;
  rejected: number;
  /** Calls that counted as drops. */
  dropped: number;
}

export interface AdaptiveConcurrencyEvents extends PolicyEvents {
  /** The (integer) limit moved. */
  limitChange: { from: number; to: number };
}

const GUARD = 'adaptiveConcurrency';
const COMMON_KEYS = ['algorithm', 'initialLimit', 'minLimit', 'maxLimit', 'name', 'clock', 'isDrop'] as const;

/**
 * A concurrency limit that finds itself: it follows the latency of the calls it admits,
 * shrinking when latency climbs (work is queueing somewhere) and growing while it holds.
 * Calls over the limit are rejected at once with an `OverloadError` (503 `overloaded`).
 *
 * @example
 * const limiter = adaptiveConcurrency({ name: 'orders-db', maxLimit: 200 });
 * const rows = await limiter.execute(() => db.query(sql));
 * limiter.stats();   // { limit: 37, inflight: 12, shortRttMs: 8.1, longRttMs: 6.4, … }
 */
export function adaptiveConcurrency(options?: AdaptiveConcurrencyOptions): AdaptiveConcurrency {
  return new AdaptiveConcurrency(options);
}

export class AdaptiveConcurrency extends BasePolicy<AdaptiveConcurrencyStats, AdaptiveConcurrencyEvents> {
  readonly kind = 'adaptive-concurrency';
  readonly algorithm: AdaptiveConcurrencyAlgorithm;
  private readonly strategy: ConcurrencyLimit;
  private readonly clock: Clock;
  private readonly isDrop: (error: unknown) => boolean;
  private inflight = 0;
  private admitted = 0;
  private rejected = 0;
  private dropped = 0;

  constructor(options?: AdaptiveConcurrencyOptions) {
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, [...COMMON_KEYS, ...GRADIENT_KEYS, ...AIMD_KEYS]);
    super(checkName(GUARD, o.name) ?? defaultName(GUARD));
    this.algorithm = o.algorithm === undefined ? 'gradient' : oneOf(GUARD, 'algorithm', o.algorithm, ['gradient', 'aimd'] as const);
    // Tunables of the other algorithm would be silently ignored: almost always a mistake.
    const foreign = this.algorithm === 'gradient' ? AIMD_KEYS : GRADIENT_KEYS;
    for (const key of foreign) {
      if (o[key] !== undefined) throw new TypeError(`${GUARD}: ${key} does not apply to the '${this.algorithm}' algorithm`);
    }
    const { initialLimit, minLimit, maxLimit } = o;
    this.strategy =
      this.algorithm === 'gradient'
        ? new GradientLimit({ initialLimit, minLimit, maxLimit, smoothing: o.smoothing, rttTolerance: o.rttTolerance, longWindow: o.longWindow, queueSize: o.queueSize, windowMs: o.windowMs, minWindowSamples: o.minWindowSamples })
        : new AimdLimit({ initialLimit, minLimit, maxLimit, backoffRatio: o.backoffRatio, latencyThresholdMs: o.latencyThresholdMs });
    this.clock = clockOption(GUARD, o.clock) ?? systemClock;
    this.isDrop = o.isDrop === undefined ? isOverloadFailure : func(GUARD, 'isDrop', o.isDrop);
  }

  /** The current limit. */
  get limit(): number {
    return this.strategy.limit;
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    if (this.inflight >= this.strategy.limit) {
      this.rejected++;
      const error = withoutStack(() => new OverloadError(this.name));
      if (this.events?.has('rejected')) this.events.emit('rejected', { reason: 'overloaded', error });
      return Promise.reject(error);
    }
    this.admitted++;
    this.admittedCall();
    return this.measure(fn, call, ++this.inflight);
  }

  stats(): AdaptiveConcurrencyStats {
    return {
      algorithm: this.algorithm,
      limit: this.strategy.limit,
      inflight: this.inflight,
      shortRttMs: this.strategy.shortRttMs,
      longRttMs: this.strategy.longRttMs,
      admitted: this.admitted,
      rejected: this.rejected,
      dropped: this.dropped,
    };
  }

  private measure<T>(fn: InternalFunction<T>, call: Call, inflight: number): Promise<T> {
    const start = this.clock.now();
    let result: T | PromiseLike<T>;
    try {
      result = fn(call);
    } catch (error) {
      this.failed(error, call, start, inflight);
      return Promise.reject(error);
    }
    // Two closures rather than an async function: measured ~40 ns (15%) cheaper per call.
    return Promise.resolve(result).then(
      (value) => {
        this.succeeded(start, inflight);
        return value;
      },
      (error: unknown) => {
        this.failed(error, call, start, inflight);
        throw error;
      },
    ) as Promise<T>;
  }

  private succeeded(start: number, inflight: number): void {
    this.inflight--;
    const now = this.clock.now();
    this.sample(now - start, inflight, false, now);
    if (this.events?.has('success')) this.events.emit('success', { durationMs: now - start });
  }

  private failed(error: unknown, call: Call, start: number, inflight: number): void {
    this.inflight--;
    const now = this.clock.now();
    // A client that went away says nothing about the dependency's latency.
    if (!isClientDisconnected(error) && !isClientDisconnected(call.scope?.reason) && this.classify(error, call)) {
      this.dropped++;
      this.sample(now - start, inflight, true, now);
    }
    if (this.events?.has('failure')) this.events.emit('failure', { error, durationMs: now - start });
  }

  private classify(error: unknown, call: Call): boolean {
    // The guarded function often fails with an AbortError when a timeout aborted its
    // signal: the timeout, not the AbortError, is what happened.
    const reason = call.scope?.aborted ? call.scope.reason : undefined;
    if (isGuardRejection(reason) && reason.reason === 'timeout') return true;
    try {
      return this.isDrop(error) === true;
    } catch {
      return false;
    }
  }

  private sample(rttMs: number, inflight: number, dropped: boolean, now: number): void {
    const before = this.strategy.limit;
    const after = this.strategy.onSample(rttMs, inflight, dropped, now);
    if (after !== before && this.events?.has('limitChange')) this.events.emit('limitChange', { from: before, to: after });
  }
}

const DROP_REASONS = new Set(['timeout', 'overloaded', 'bulkhead_full']);
const DROP_STATUSES = new Set([429, 503, 504]);

/**
 * The default `isDrop`: failures that mean "too much load" — a bulwark timeout, overload
 * or full bulkhead, a `TimeoutError` (as `AbortSignal.timeout()` raises), an answer with
 * status 429, 503 or 504. An open circuit or a rate limit says nothing about load.
 */
export function isOverloadFailure(error: unknown): boolean {
  if (isGuardRejection(error)) return DROP_REASONS.has(error.reason);
  if (typeof error !== 'object' || error === null) return false;
  const e = error as { name?: unknown; status?: unknown; statusCode?: unknown };
  if (e.name === 'TimeoutError') return true;
  return DROP_STATUSES.has(e.status as number) || DROP_STATUSES.has(e.statusCode as number);
}
