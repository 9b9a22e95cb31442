import { systemClock, type Clock } from './clock.js';
import { OverloadError, withoutStack } from './errors.js';
import { DEFER, enter, leave, refuse } from './fused.js';
import { BasePolicy, defaultName, invoke, run, type Call, type InternalFunction } from './policy.js';
import { PressureSampler, sharedSampler, type PressureSample, type PressureSubscription } from './pressure-sampler.js';
import { clockOption, duration, fail, finiteNumber, knownKeys, name as checkName, optionsObject } from './validate.js';

export interface LoadShedderOptions {
  /** Shed while the event loop lags more than this (mean over the last interval, or the sampler's own lateness). */
  maxEventLoopDelayMs?: number;
  /** Shed while the V8 heap in use exceeds this many bytes. */
  maxHeapUsedBytes?: number;
  /** Shed while the resident set size exceeds this many bytes. */
  maxRssBytes?: number;
  /** Shed while the event loop was busy more than this share (0..1) of the last interval. */
  maxEventLoopUtilization?: number;
  /** How often the process is measured, in ms (default 1000, at least 10). */
  sampleIntervalMs?: number;
  /** The `retryAfterMs` of the rejection (default: `sampleIntervalMs`, the soonest the verdict can change). */
  retryAfterMs?: number;
  name?: string;
  /** Clock for the `success`/`failure` event durations (tests). */
  clock?: Clock;
  /** The sampler to read (default: the one shared by every shedder). Tests pass their own. */
  sampler?: PressureSampler;
}

export interface LoadShedderStats {
  /** True while the last sample is over a limit (and sampling is live). */
  shedding: boolean;
  eventLoopDelayMs: number;
  heapUsedBytes: number;
  rssBytes: number;
  eventLoopUtilization: number;
  admitted: number;
  rejected: number;
}

const GUARD = 'loadShedder';
const KEYS = ['maxEventLoopDelayMs', 'maxHeapUsedBytes', 'maxRssBytes', 'maxEventLoopUtilization', 'sampleIntervalMs', 'retryAfterMs', 'name', 'clock', 'sampler'] as const;
const LIMITS = ['maxEventLoopDelayMs', 'maxHeapUsedBytes', 'maxRssBytes', 'maxEventLoopUtilization'] as const;

/**
 * Rejects calls with an `OverloadError` (503 `overloaded`) while the process is overloaded:
 * event-loop delay, event-loop utilisation, heap or RSS over its limit. It recovers by
 * itself as soon as a sample is back under every limit.
 *
 * Measuring costs nothing per call: one timer shared by every shedder samples the process
 * (starting on first use, stopping when unused), and each call compares the last sample
 * with the limits.
 *
 * @example
 * const shedder = loadShedder({ maxEventLoopDelayMs: 200, maxHeapUsedBytes: 1.5 * 2 ** 30 });
 * app.get('/search', guard(shedder), handler);   // 503 + Retry-After while overloaded
 */
export function loadShedder(options: LoadShedderOptions): LoadShedder {
  return new LoadShedder(options);
}

export class LoadShedder extends BasePolicy<LoadShedderStats> {
  readonly kind = 'load-shedder';
  readonly sampleIntervalMs: number;
  readonly retryAfterMs: number;
  // Absent limits are Infinity, so the per-call check is four comparisons and no branches on options.
  private readonly maxEventLoopDelayMs: number;
  private readonly maxHeapUsedBytes: number;
  private readonly maxRssBytes: number;
  private readonly maxEventLoopUtilization: number;
  private readonly clock: Clock;
  private readonly sampler: PressureSampler;
  private subscription: PressureSubscription | undefined;
  private admitted = 0;
  private rejected = 0;
  /** `sampler.sampleCount` when this shedder last cut a loop turn short (see cutsTurn). */
  private cutAtSample = -2;

  constructor(options: LoadShedderOptions) {
    if (options === undefined) fail(GUARD, 'options', 'an object with at least one limit', options);
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, KEYS);
    super(checkName(GUARD, o.name) ?? defaultName(GUARD));
    if (LIMITS.every((key) => o[key] === undefined)) {
      throw new TypeError(`${GUARD}: at least one limit is required (${LIMITS.join(', ')})`);
    }
    this.maxEventLoopDelayMs = o.maxEventLoopDelayMs === undefined ? Infinity : duration(GUARD, 'maxEventLoopDelayMs', o.maxEventLoopDelayMs);
    this.maxHeapUsedBytes = o.maxHeapUsedBytes === undefined ? Infinity : bytes('maxHeapUsedBytes', o.maxHeapUsedBytes);
    this.maxRssBytes = o.maxRssBytes === undefined ? Infinity : bytes('maxRssBytes', o.maxRssBytes);
    this.maxEventLoopUtilization = o.maxEventLoopUtilization === undefined ? Infinity : utilization(o.maxEventLoopUtilization);
    this.sampleIntervalMs = o.sampleIntervalMs === undefined ? 1000 : interval(o.sampleIntervalMs);
    this.retryAfterMs = o.retryAfterMs === undefined ? this.sampleIntervalMs : duration(GUARD, 'retryAfterMs', o.retryAfterMs);
    this.clock = clockOption(GUARD, o.clock) ?? systemClock;
    if (o.sampler !== undefined && !(o.sampler instanceof PressureSampler)) fail(GUARD, 'sampler', 'a PressureSampler', o.sampler);
    this.sampler = o.sampler ?? sharedSampler;
  }

  /** True while the last sample is over a limit, or while loop turns are being cut short. */
  get shedding(): boolean {
    return this.sampler.running && (this.isOver(this.sampler.latest) || this.cutting());
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    if (!this.admit()) return Promise.reject(this.refuse());
    return this.hearsOutcomes() ? this.runObserved(fn, call, this.clock) : invoke(fn, call);
  }

  /**
   * Fused pipelines (and HTTP routes): the decision is synchronous, so the shedder admits
   * or refuses on the spot; outcomes matter only to listeners, who take `[run]`.
   */
  [enter](_call: Call): unknown {
    if (this.hearsOutcomes()) return DEFER;
    if (!this.admit()) return refuse(this.refuse());
    return undefined;
  }

  [leave](): void {}

  /** Samples (keeping the shared sampler subscribed) and decides; counts an admission. */
  private admit(): boolean {
    const subscription = this.subscription;
    if (subscription !== undefined && subscription.active) subscription.used = true;
    else this.subscription = this.sampler.subscribe(this.sampleIntervalMs);
    if (this.isOver(this.sampler.latest) || this.cutsTurn()) return false;
    this.admitted++;
    this.admittedCall();
    return true;
  }

  private refuse(): OverloadError {
    this.rejected++;
    const error = withoutStack(() => new OverloadError(this.name, this.retryAfterMs));
    if (this.events?.has('rejected')) this.events.emit('rejected', { reason: 'overloaded', error });
    return error;
  }

  stats(): LoadShedderStats {
    const sample = this.sampler.latest;
    return {
      shedding: this.shedding,
      eventLoopDelayMs: sample.eventLoopDelayMs,
      heapUsedBytes: sample.heapUsedBytes,
      rssBytes: sample.rssBytes,
      eventLoopUtilization: sample.eventLoopUtilization,
      admitted: this.admitted,
      rejected: this.rejected,
    };
  }

  /**
   * The live half of `maxEventLoopDelayMs`: refuses the rest of a loop turn that has already
   * run longer than the limit (the requests read in it have been waiting that long). The
   * first call of every turn is admitted, so the loop always has work while requests come.
   */
  private cutsTurn(): boolean {
    if (this.maxEventLoopDelayMs === Infinity || !this.sampler.turnExceeds(this.maxEventLoopDelayMs)) return false;
    this.cutAtSample = this.sampler.sampleCount;
    return true;
  }

  /**
   * Whether this shedder cut a turn short during the interval the latest sample covers, or
   * since. The delay sampled then is (at least in part) the one the cutting lets through,
   * about the limit plus one call; shedding every call on it would leave the loop idle
   * while requests wait, and cut goodput for nothing.
   */
  private cutting(): boolean {
    return this.cutAtSample >= this.sampler.sampleCount - 1;
  }

  private isOver(sample: PressureSample): boolean {
    return (
      (sample.eventLoopDelayMs > this.maxEventLoopDelayMs && !this.cutting()) ||
      sample.heapUsedBytes > this.maxHeapUsedBytes ||
      sample.rssBytes > this.maxRssBytes ||
      sample.eventLoopUtilization > this.maxEventLoopUtilization
    );
  }
}

function bytes(option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) fail(GUARD, option, 'a finite number of bytes > 0', value);
  return value;
}

function utilization(value: unknown): number {
  // At 1 or more the limit could never be exceeded; at 0 every call would be shed.
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value >= 1) {
    fail(GUARD, 'maxEventLoopUtilization', 'a number above 0 and below 1', value);
  }
  return value;
}

function interval(value: unknown): number {
  // The event-loop-delay histogram has a 10 ms resolution; a shorter interval measures nothing.
  finiteNumber(GUARD, 'sampleIntervalMs', value, 10);
  return duration(GUARD, 'sampleIntervalMs', value);
}
