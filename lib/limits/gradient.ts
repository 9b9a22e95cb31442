import type { ConcurrencyLimit } from '../adaptive-concurrency.js';
import { duration, finiteNumber, knownKeys, optionsObject, positiveInteger, fail } from '../validate.js';

export interface GradientLimitOptions {
  initialLimit?: number;
  minLimit?: number;
  maxLimit?: number;
  /** Share of the new estimate taken in each update, (0, 1] (default 0.2). */
  smoothing?: number;
  /** How far the short RTT may rise above the long one before the limit shrinks, >= 1 (default 1.5). */
  rttTolerance?: number;
  /** Windows the long-term RTT averages over (default 600). */
  longWindow?: number;
  /** How much the limit may grow per update while latency holds, > 0 (default 4). */
  queueSize?: number;
  /** Shortest measuring window, in ms (default 250). */
  windowMs?: number;
  /** Fewest calls a window needs before it counts (default 10). */
  minWindowSamples?: number;
}

const GUARD = 'adaptiveConcurrency';
export const GRADIENT_KEYS = ['smoothing', 'rttTolerance', 'longWindow', 'queueSize', 'windowMs', 'minWindowSamples'] as const;

/**
 * Netflix's Gradient2: compares the short-term RTT (the mean of the last window) with a
 * long-term exponential average of it. While they agree the limit grows by up to
 * `queueSize` per window; when the short one rises above `rttTolerance` times the long one,
 * the limit shrinks in proportion (never by more than half per window, and smoothed):
 *
 *     gradient = clamp(rttTolerance * longRtt / shortRtt, 0.5, 1)
 *     limit    = limit * (1 - smoothing) + (limit * gradient + queueSize) * smoothing
 *
 * A window with a drop (a timeout, an overload rejection) takes the gradient's floor.
 * The limit does not grow while fewer than half of its places are in use: an idle service
 * says nothing about how much more it could take.
 *
 * @example
 * const limit = new GradientLimit({ initialLimit: 20, minLimit: 1, maxLimit: 200 });
 * limit.onSample(12, 18, false, performance.now());   // → the (integer) limit
 */
export class GradientLimit implements ConcurrencyLimit {
  readonly minLimit: number;
  readonly maxLimit: number;
  private readonly smoothing: number;
  private readonly rttTolerance: number;
  private readonly queueSize: number;
  private readonly windowMs: number;
  private readonly minWindowSamples: number;
  private readonly longFactor: number;
  private estimate: number;

  // The long-term RTT: a plain mean over the first WARMUP windows, then an EWMA.
  private long = 0;
  private longCount = 0;
  private short: number | undefined;

  // The window being filled.
  private windowStart: number | undefined;
  private samples = 0;
  private rttSum = 0;
  private rttCount = 0;
  private maxInflight = 0;
  private dropped = false;

  constructor(options: GradientLimitOptions = {}) {
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, ['initialLimit', 'minLimit', 'maxLimit', ...GRADIENT_KEYS]);
    const bounds = limitBounds(o);
    this.minLimit = bounds.minLimit;
    this.maxLimit = bounds.maxLimit;
    this.estimate = bounds.initialLimit;
    this.smoothing = o.smoothing === undefined ? 0.2 : fraction('smoothing', o.smoothing);
    this.rttTolerance = o.rttTolerance === undefined ? 1.5 : finiteNumber(GUARD, 'rttTolerance', o.rttTolerance, 1);
    const longWindow = o.longWindow === undefined ? 600 : positiveInteger(GUARD, 'longWindow', o.longWindow);
    this.longFactor = 2 / (longWindow + 1);
    this.queueSize = o.queueSize === undefined ? 4 : positive('queueSize', o.queueSize);
    this.windowMs = o.windowMs === undefined ? 250 : duration(GUARD, 'windowMs', o.windowMs);
    this.minWindowSamples = o.minWindowSamples === undefined ? 10 : positiveInteger(GUARD, 'minWindowSamples', o.minWindowSamples);
  }

  get limit(): number {
    return Math.floor(this.estimate);
  }

  /** Mean RTT of the last complete window, in ms. */
  get shortRttMs(): number | undefined {
    return this.short;
  }

  /** The long-term RTT the short one is compared with, in ms. */
  get longRttMs(): number | undefined {
    return this.longCount === 0 ? undefined : this.long;
  }

  onSample(rttMs: number, inflight: number, dropped: boolean, nowMs: number): number {
    this.windowStart ??= nowMs;
    this.samples++;
    if (inflight > this.maxInflight) this.maxInflight = inflight;
    // A dropped call's duration is the timeout's, not the dependency's: it only counts as a drop.
    if (dropped) this.dropped = true;
    else {
      this.rttSum += rttMs;
      this.rttCount++;
    }
    if (nowMs - this.windowStart < this.windowMs || this.samples < this.minWindowSamples) return this.limit;

    const short = this.rttCount === 0 ? undefined : this.rttSum / this.rttCount;
    const maxInflight = this.maxInflight;
    const anyDrop = this.dropped;
    this.windowStart = nowMs;
    this.samples = this.rttSum = this.rttCount = this.maxInflight = 0;
    this.dropped = false;
    return this.update(short, maxInflight, anyDrop);
  }

  private update(short: number | undefined, maxInflight: number, dropped: boolean): number {
    if (short !== undefined) {
      this.short = short;
      this.addLong(short);
      // After a long overload the average stays high while calls are fast again; pull it
      // down faster than the EWMA would, or the limit would not grow for minutes.
      if (this.long > 2 * short) this.long *= 0.9;
    }
    if (!dropped && maxInflight < this.estimate / 2) return this.limit;

    let gradient = 0.5;
    if (!dropped && short !== undefined) {
      gradient = short <= 0 ? 1 : Math.max(0.5, Math.min(1, (this.rttTolerance * this.long) / short));
    }
    const target = this.estimate * gradient + this.queueSize;
    const next = this.estimate * (1 - this.smoothing) + target * this.smoothing;
    this.estimate = Math.max(this.minLimit, Math.min(this.maxLimit, next));
    return this.limit;
  }

  private addLong(rtt: number): void {
    if (this.longCount < WARMUP) {
      this.longCount++;
      this.long += (rtt - this.long) / this.longCount;
    } else {
      this.long += (rtt - this.long) * this.longFactor;
    }
  }
}

// Windows averaged plainly before the EWMA takes over, so one odd first window does not
// set the baseline for minutes.
const WARMUP = 10;

/** Validates `minLimit`, `maxLimit` and `initialLimit` together (shared by the limits). */
export function limitBounds(o: { initialLimit?: unknown; minLimit?: unknown; maxLimit?: unknown }): { initialLimit: number; minLimit: number; maxLimit: number } {
  const minLimit = o.minLimit === undefined ? 1 : positiveInteger(GUARD, 'minLimit', o.minLimit);
  const maxLimit = o.maxLimit === undefined ? 1000 : positiveInteger(GUARD, 'maxLimit', o.maxLimit);
  if (minLimit > maxLimit) throw new TypeError(`${GUARD}: minLimit (${minLimit}) must not be greater than maxLimit (${maxLimit})`);
  if (o.initialLimit === undefined) return { initialLimit: Math.max(minLimit, Math.min(maxLimit, 20)), minLimit, maxLimit };
  const initialLimit = positiveInteger(GUARD, 'initialLimit', o.initialLimit);
  if (initialLimit < minLimit || initialLimit > maxLimit) fail(GUARD, 'initialLimit', `an integer from minLimit (${minLimit}) to maxLimit (${maxLimit})`, initialLimit);
  return { initialLimit, minLimit, maxLimit };
}

function fraction(option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > 1) fail(GUARD, option, 'a number above 0 and at most 1', value);
  return value;
}

function positive(option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) fail(GUARD, option, 'a finite number > 0', value);
  return value;
}
