import type { ConcurrencyLimit } from '../adaptive-concurrency.js';
import { duration, fail, knownKeys, optionsObject } from '../validate.js';
import { limitBounds } from './gradient.js';

export interface AimdLimitOptions {
  initialLimit?: number;
  minLimit?: number;
  maxLimit?: number;
  /** Factor the limit is multiplied by on a drop or a slow call, in (0, 1) (default 0.9). */
  backoffRatio?: number;
  /** A call slower than this counts like a drop, in ms (default 5000). */
  latencyThresholdMs?: number;
}

const GUARD = 'adaptiveConcurrency';
export const AIMD_KEYS = ['backoffRatio', 'latencyThresholdMs'] as const;

/**
 * Additive increase, multiplicative decrease, the way TCP does it: the limit grows by 1
 * per round of calls that come back under `latencyThresholdMs` (each such call adds
 * 1/limit), and is multiplied by `backoffRatio` when a call is dropped (timeout, overload
 * rejection) or comes back slower than the threshold.
 *
 * One congestion event backs off once: the calls that were already in flight when the
 * limit went down come back just as slow, and backing off again for each of them would
 * collapse the limit to its minimum (0.9^30 ≈ 0.04) on a single slow spell.
 *
 * @example
 * const limit = new AimdLimit({ initialLimit: 20, latencyThresholdMs: 250 });
 * limit.onSample(300, 20, false);   // slower than 250 ms → 18
 */
export class AimdLimit implements ConcurrencyLimit {
  readonly minLimit: number;
  readonly maxLimit: number;
  readonly backoffRatio: number;
  readonly latencyThresholdMs: number;
  private estimate: number;
  /** Samples still to come from calls started before the last backoff. */
  private holdoff = 0;
  private last: number | undefined;

  constructor(options: AimdLimitOptions = {}) {
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, ['initialLimit', 'minLimit', 'maxLimit', ...AIMD_KEYS]);
    const bounds = limitBounds(o);
    this.minLimit = bounds.minLimit;
    this.maxLimit = bounds.maxLimit;
    this.estimate = bounds.initialLimit;
    const ratio = o.backoffRatio ?? 0.9;
    if (typeof ratio !== 'number' || !Number.isFinite(ratio) || ratio <= 0 || ratio >= 1) fail(GUARD, 'backoffRatio', 'a number above 0 and below 1', ratio);
    this.backoffRatio = ratio;
    this.latencyThresholdMs = o.latencyThresholdMs === undefined ? 5000 : duration(GUARD, 'latencyThresholdMs', o.latencyThresholdMs);
  }

  get limit(): number {
    return Math.floor(this.estimate);
  }

  /** RTT of the last call that was not dropped, in ms. */
  get shortRttMs(): number | undefined {
    return this.last;
  }

  onSample(rttMs: number, inflight: number, dropped: boolean): number {
    if (!dropped) this.last = rttMs;
    if (dropped || rttMs > this.latencyThresholdMs) {
      if (this.holdoff > 0) this.holdoff--;
      else {
        const before = this.limit;
        this.estimate = Math.max(this.minLimit, this.estimate * this.backoffRatio);
        this.holdoff = before - 1;
      }
      return this.limit;
    }
    if (this.holdoff > 0) this.holdoff--;
    // Grow only while the limit is in use: an idle service says nothing about its capacity.
    if (inflight * 2 >= this.estimate) this.estimate = Math.min(this.maxLimit, this.estimate + 1 / this.estimate);
    return this.limit;
  }
}
