import { monitorEventLoopDelay, performance as perfHooks, type EventLoopUtilization, type IntervalHistogram } from 'node:perf_hooks';
import { systemClock, type Clock } from './clock.js';
import { clockOption, duration, func, knownKeys, optionsObject } from './validate.js';

/** What the process looks like over the last sampling interval. */
export interface PressureMeasurements {
  /** Mean event-loop delay over the interval, in milliseconds. */
  eventLoopDelayMs: number;
  /** Share of the interval the event loop spent busy, 0..1. */
  eventLoopUtilization: number;
  heapUsedBytes: number;
  rssBytes: number;
}

/** One sample: the measurements and when they were taken (on the sampler's clock). */
export interface PressureSample extends PressureMeasurements {
  readonly takenAt: number;
}

/**
 * Where measurements come from. The default reads the real process; tests hand the
 * sampler a fake one.
 */
export interface PressureProbe {
  /** Sampling begins: start whatever has to run between reads. */
  start(): void;
  /** Measurements since the previous `read()` (or `start()`); starts a new interval. */
  read(): PressureMeasurements;
  /** Sampling ends: release whatever `start()` set up. */
  stop(): void;
}

// Resolution of the event-loop-delay histogram. Its timer fires every RESOLUTION ms,
// and every recorded delay includes those RESOLUTION ms, so they are taken off the mean.
const RESOLUTION_MS = 10;

/**
 * The real process: `monitorEventLoopDelay` for the delay, `eventLoopUtilization` for the
 * busy share, `process.memoryUsage()` for memory. Every read covers the interval since the
 * previous one: the histogram is reset and utilisation is diffed, so a long-running
 * process is as sensitive as a fresh one (fastify/under-pressure#294).
 */
export function processProbe(): PressureProbe {
  let histogram: IntervalHistogram | undefined;
  let previous: EventLoopUtilization | undefined;
  let heapUsedBytes = 0;
  let rssBytes = 0;
  return {
    start() {
      histogram = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
      histogram.enable();
      previous = perfHooks.eventLoopUtilization();
    },
    read() {
      let eventLoopDelayMs = 0;
      if (histogram !== undefined) {
        if (histogram.count > 0) eventLoopDelayMs = Math.max(0, histogram.mean / 1e6 - RESOLUTION_MS);
        histogram.reset();
      }
      const current = perfHooks.eventLoopUtilization();
      const utilization = previous === undefined ? 0 : perfHooks.eventLoopUtilization(current, previous).utilization;
      previous = current;
      // An interval of zero length (a read right after start) has no defined share.
      const eventLoopUtilization = Number.isFinite(utilization) ? utilization : 0;
      try {
        const memory = process.memoryUsage();
        heapUsedBytes = memory.heapUsed;
        rssBytes = memory.rss;
      } catch {
        // Reading the RSS opens /proc/self/stat, which fails with EMFILE when the process is
        // out of file descriptors, an overload of its own: keep the last figures.
      }
      return { eventLoopDelayMs, eventLoopUtilization, heapUsedBytes, rssBytes };
    },
    stop() {
      histogram?.disable();
      histogram = undefined;
      previous = undefined;
    },
  };
}

/**
 * A shedder's claim on the sampler. The shedder marks it `used` on every call (one store,
 * no clock read); the sampler looks at the mark once per tick and drops subscriptions that
 * stayed unused for `idleMs`, after which the shedder subscribes again on its next call.
 */
export interface PressureSubscription {
  readonly intervalMs: number;
  used: boolean;
  /** False once the sampler dropped it for idleness. */
  readonly active: boolean;
}

interface Subscription extends PressureSubscription {
  active: boolean;
  lastUsedAt: number;
}

export interface PressureSamplerOptions {
  /** Where measurements come from (default: the real process). */
  probe?: PressureProbe;
  clock?: Clock;
  /** Stop sampling once no subscriber has been used for this long (default 30000). */
  idleMs?: number;
  /**
   * The event loop's total idle time so far, in ms (default: `performance.eventLoopUtilization().idle`).
   * It moves whenever the loop waited for I/O, which tells one loop turn from the next. Tests pass their own.
   */
  loopIdleTime?: () => number;
}

const EMPTY: PressureSample = { eventLoopDelayMs: 0, eventLoopUtilization: 0, heapUsedBytes: 0, rssBytes: 0, takenAt: 0 };

/**
 * One timer that measures the process for every load shedder. It starts on the first
 * subscription, ticks at the shortest interval any subscriber asked for, and stops (timer
 * cleared, histogram disabled) once every subscriber has been idle for `idleMs`, so an idle
 * process pays nothing and can exit. The timer is unref'd.
 *
 * Besides the probe's figures, each tick measures how late it ran itself: a loop blocked
 * for longer than the interval leaves the histogram nothing to record until it is free
 * again, but it always makes the sampler's own timer late.
 *
 * @example
 * // Tests: a sampler over fake measurements, driven by sinon's fake timers.
 * const sampler = new PressureSampler({ probe: fakeProbe });
 * const shedder = loadShedder({ maxEventLoopDelayMs: 100, sampler });
 */
export class PressureSampler {
  private readonly probe: PressureProbe;
  private readonly clock: Clock;
  private readonly idleMs: number;
  private readonly subscriptions = new Set<Subscription>();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private dueAt = 0;
  private current: PressureSample = EMPTY;
  private samples = 0;
  private readonly loopIdleTime: () => number;
  // The event-loop turn in progress, as calls see it (see turnExceeds): when its first call
  // came, and the loop's idle time then. turnStartedAt < 0: no turn open.
  private turnStartedAt = -1;
  private turnIdle = 0;
  private turnEndPending = false;
  private readonly endTurn = (): void => {
    this.turnStartedAt = -1;
    this.turnEndPending = false;
  };

  constructor(options: PressureSamplerOptions = {}) {
    const o = optionsObject('PressureSampler', options);
    knownKeys('PressureSampler', o, ['probe', 'clock', 'idleMs', 'loopIdleTime']);
    const probe = o.probe;
    if (probe !== undefined && (typeof probe !== 'object' || probe === null || typeof probe.read !== 'function' || typeof probe.start !== 'function' || typeof probe.stop !== 'function')) {
      throw new TypeError('PressureSampler: probe must be an object with start(), read() and stop()');
    }
    this.probe = probe ?? processProbe();
    this.clock = clockOption('PressureSampler', o.clock) ?? systemClock;
    this.idleMs = o.idleMs === undefined ? 30_000 : duration('PressureSampler', 'idleMs', o.idleMs);
    this.loopIdleTime = o.loopIdleTime === undefined ? () => perfHooks.eventLoopUtilization().idle : func('PressureSampler', 'loopIdleTime', o.loopIdleTime);
  }

  /** The latest sample (all zeros before the first one). */
  get latest(): PressureSample {
    return this.current;
  }

  /** True while the timer runs, i.e. while `latest` is fresh. */
  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Samples taken so far: the number of `latest`. */
  get sampleCount(): number {
    return this.samples;
  }

  /** Number of live subscriptions (for tests and diagnostics). */
  get subscribers(): number {
    return this.subscriptions.size;
  }

  /**
   * Whether the event loop has been busy for more than `limitMs` in its current turn, i.e.
   * since the first call that asked during this turn. This is event-loop delay as it builds
   * up, before any timer can see it: the loop reads every request that is ready in one turn
   * and runs their handlers one after the other, so with synchronous handlers the requests
   * late in a turn have waited behind all the work before them, and a sample (taken between
   * turns, by a timer) sees that only once the turn is over.
   *
   * A turn ends at the next check phase (one `setImmediate` per turn in which calls come).
   * A turn that seems too long is confirmed against the loop's idle time: if the loop
   * waited for I/O since the turn began (a turn opened from a `setImmediate` callback lasts
   * until the next check phase), a new turn begins instead.
   */
  turnExceeds(limitMs: number): boolean {
    const now = this.clock.now();
    if (this.turnStartedAt < 0) {
      this.openTurn(now);
      return false;
    }
    if (now - this.turnStartedAt <= limitMs) return false;
    if (this.loopIdleTime() !== this.turnIdle) {
      // A fresh immediate as well: the pending one may never run (fake timers removed).
      this.turnEndPending = false;
      this.openTurn(now);
      return false;
    }
    return true;
  }

  private openTurn(now: number): void {
    this.turnStartedAt = now;
    this.turnIdle = this.loopIdleTime();
    if (this.turnEndPending) return;
    this.turnEndPending = true;
    // By its global name at call time, so that fake timers installed after import apply.
    setImmediate(this.endTurn);
  }

  /** Registers a subscriber that wants a sample at least every `intervalMs`; starts sampling. */
  subscribe(intervalMs: number): PressureSubscription {
    const now = this.clock.now();
    const subscription: Subscription = { intervalMs, used: true, active: true, lastUsedAt: now };
    this.subscriptions.add(subscription);
    if (this.timer === undefined) {
      this.probe.start();
      this.current = { ...this.probe.read(), takenAt: now };
      this.samples++;
      this.schedule(now, intervalMs);
    } else if (now + intervalMs < this.dueAt) {
      // A subscriber that wants fresher samples than the running cadence: tick sooner.
      clearTimeout(this.timer);
      this.schedule(now, intervalMs);
    }
    return subscription;
  }

  /** Stops sampling at once and forgets every subscriber (they resubscribe on next use) and the loop turn in progress. */
  stop(): void {
    this.turnStartedAt = -1;
    this.turnEndPending = false;
    for (const subscription of this.subscriptions) subscription.active = false;
    this.subscriptions.clear();
    if (this.timer === undefined) return;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.probe.stop();
  }

  private schedule(now: number, intervalMs: number): void {
    this.dueAt = now + intervalMs;
    // By its global name at call time, so that fake timers installed after import apply.
    const timer = setTimeout(() => this.tick(), intervalMs);
    timer.unref?.();
    this.timer = timer;
  }

  private tick(): void {
    const now = this.clock.now();
    const lateness = Math.max(0, now - this.dueAt);
    let measured: PressureMeasurements = this.current;
    try {
      measured = this.probe.read();
    } catch {
      // A timer callback that throws would crash the process; a failed read keeps the last figures.
    }
    this.current = {
      eventLoopDelayMs: Math.max(measured.eventLoopDelayMs, lateness),
      eventLoopUtilization: measured.eventLoopUtilization,
      heapUsedBytes: measured.heapUsedBytes,
      rssBytes: measured.rssBytes,
      takenAt: now,
    };
    this.samples++;

    let interval = Infinity;
    for (const subscription of this.subscriptions) {
      if (subscription.used) {
        subscription.used = false;
        subscription.lastUsedAt = now;
      } else if (now - subscription.lastUsedAt >= Math.max(this.idleMs, 3 * subscription.intervalMs)) {
        subscription.active = false;
        this.subscriptions.delete(subscription);
        continue;
      }
      interval = Math.min(interval, subscription.intervalMs);
    }

    if (interval === Infinity) {
      this.timer = undefined;
      this.probe.stop();
      return;
    }
    this.schedule(now, interval);
  }
}

/** The sampler every load shedder uses unless given another. Nothing runs until first use. */
export const sharedSampler: PressureSampler = new PressureSampler();
