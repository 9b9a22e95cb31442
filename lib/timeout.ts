import { Scope } from './cancellation.js';
import { systemClock, type Clock } from './clock.js';
import { DeadlineQueue } from './deadline-queue.js';
import { isThenable, observe, promiseFor, settle, type Observer } from './settlers.js';
import { deadline, type TimedCall } from './fused.js';
import { TimeoutError, withoutStack } from './errors.js';
import { BasePolicy, defaultName, run, type Call, type InternalFunction, type PolicyEvents } from './policy.js';
import { clockOption, duration, knownKeys, name as nameOption, optionsObject } from './validate.js';

export interface TimeoutOptions {
  /** Used in events, metrics and the dashboard. Default `timeout-<n>`. */
  name?: string;
  /** Time source, for tests. Default: the monotonic system clock. */
  clock?: Clock;
}

export interface TimeoutStats {
  /** The configured limit in milliseconds. */
  timeoutMs: number;
  /** Calls running now. */
  pending: number;
  /** Calls started since creation. */
  calls: number;
  /** Calls cut short by the deadline since creation. */
  timedOut: number;
}

export type TimeoutEvents = PolicyEvents;

const KEYS = ['name', 'clock'] as const;

/**
 * Aborts the call's `signal` and rejects with a `TimeoutError` once `ms` have passed,
 * whether or not the function ever settles. The function keeps running unless it honours
 * its signal (cancellation in JavaScript is cooperative): pass `signal` to `fetch`, to
 * database drivers, to `stream.pipeline`.
 *
 * The signal's `reason` is the `TimeoutError` itself, so code can tell a timeout from a
 * caller abort (`ClientDisconnectedError`, or the caller's own reason).
 *
 * @example
 * const guard = timeout(2000);
 * const res = await guard.execute(({ signal }) => fetch(url, { signal }));
 */
export function timeout(ms: number, options?: TimeoutOptions): Timeout {
  return new Timeout(ms, options);
}

/**
 * The policy `timeout()` returns.
 *
 * @example
 * const guard = new Timeout(500, { name: 'search' });
 * guard.on('rejected', () => metrics.increment('search.timeouts'));
 */
export class Timeout extends BasePolicy<TimeoutStats, TimeoutEvents> {
  readonly kind = 'timeout';
  readonly ms: number;
  private readonly clock: Clock;
  private readonly deadlines: DeadlineQueue<TimedCall>;
  private calls = 0;
  private timedOut = 0;

  constructor(ms: number, options?: TimeoutOptions) {
    const o = optionsObject('timeout', options);
    knownKeys('timeout', o, KEYS);
    super(nameOption('timeout', o.name) ?? defaultName('timeout'));
    this.ms = duration('timeout', 'ms', ms);
    this.clock = clockOption('timeout', o.clock) ?? systemClock;
    this.deadlines = new DeadlineQueue<TimedCall>(this.ms, this.clock, (entry) => this.expire(entry));
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    this.calls++;
    const pending = new PendingCall(this, call.scope);
    const promise = promiseFor<T>(pending);
    // Listeners get durations, which need a start stamped precisely.
    this.deadlines.push(pending, this.hearsOutcomes());
    let result: T | PromiseLike<T>;
    try {
      result = fn(call.withScope(pending));
    } catch (error) {
      pending.settled(error, true);
      return promise;
    }
    if (isThenable(result)) observe(result, pending);
    else pending.settled(result, false);
    return promise;
  }

  stats(): TimeoutStats {
    return { timeoutMs: this.ms, pending: this.deadlines.size, calls: this.calls, timedOut: this.timedOut };
  }

  /** A fused pipeline segment times a call; it ends the deadline with `finish`, or hears of expiry. */
  [deadline](entry: TimedCall): void {
    this.calls++;
    this.deadlines.push(entry, this.hearsOutcomes());
  }

  /** @internal Ends the deadline of a call that settled; false when the deadline came first. */
  finish(entry: TimedCall, outcome: unknown, failed: boolean): boolean {
    // Out of the queue already: the deadline came first, and the caller has its answer.
    if (!this.deadlines.delete(entry)) return false;
    // Unlinks from the caller's scope or signal, so a long-lived caller signal does not
    // collect one listener per call.
    entry.dispose();
    const events = this.events;
    if (events !== undefined) {
      if (!failed) {
        if (events.has('success')) events.emit('success', { durationMs: this.elapsed(entry) });
      } else if (events.has('failure')) {
        events.emit('failure', { error: outcome, durationMs: this.elapsed(entry) });
      }
    }
    return true;
  }

  private elapsed(entry: TimedCall): number {
    return this.clock.now() - (entry.deadline - this.ms);
  }

  /** The deadline passed; the queue has taken `entry` out, so a later settle is ignored. */
  private expire(entry: TimedCall): void {
    this.timedOut++;
    const error = withoutStack(() => new TimeoutError(this.ms, this.name));
    entry.timedOut(error);
    if (this.events?.has('rejected')) this.events.emit('rejected', { reason: 'timeout', error });
  }
}

/**
 * One call in flight. It is the call's child scope (one allocation instead of two), its
 * deadline-queue entry, and holds the settle functions of the promise the caller awaits.
 */
class PendingCall extends Scope implements TimedCall, Observer {
  constructor(
    readonly timer: Timeout,
    parent: Scope | undefined,
  ) {
    super(parent);
  }

  deadline = 0;
  /** In the deadline queue: neither settled nor expired yet. */
  queued = false;
  resolve: ((value: unknown) => void) | undefined = undefined;
  reject: ((error: unknown) => void) | undefined = undefined;

  /** The function settled, one way or the other; ignored once the deadline has passed. */
  settled(outcome: unknown, failed: boolean): void {
    if (this.timer.finish(this, outcome, failed)) settle(this, outcome, failed);
  }

  timedOut(error: TimeoutError): void {
    // Abort first: inner guards (a queued bulkhead place, a retry's sleep) let go before
    // the caller hears of it. Aborting also unlinks the scope from its parent.
    this.abort(error);
    this.dispose();
    this.reject!(error);
  }
}
