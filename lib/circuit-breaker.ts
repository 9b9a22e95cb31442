import type { Scope } from './cancellation.js';
import { systemClock, type Clock } from './clock.js';
import { CircuitOpenError, isClientDisconnected, isGuardRejection, withoutStack } from './errors.js';
import { DEFER, ENDED_FAILED, ENDED_OK, enter, leave, refuse, type Ending } from './fused.js';
import { BasePolicy, defaultName, run, type Call, type InternalFunction, type PolicyEvents } from './policy.js';
import type { BreakerLink, BreakerStore, SharedBreakerState } from './stores/types.js';
import { clockOption, duration, fail, func, knownKeys, name as validName, oneOf, optionsObject, percentage, positiveInteger } from './validate.js';
import { CountWindow } from './windows/count-window.js';
import { TimeWindow } from './windows/time-window.js';
import { FAILED, SLOW, type Outcome, type OutcomeWindow, type WindowOptions } from './windows/types.js';

export type { WindowOptions } from './windows/types.js';

/**
 * The state a breaker shows: `closed` lets calls through, `open` refuses them, `half-open` tries a few.
 * @example if (breaker.state === 'open') return cachedAnswer();
 */
export type CircuitState = SharedBreakerState;

/**
 * Why a breaker changed state, as reported by `stateChange`.
 * @example breaker.on('stateChange', ({ to, reason }) => { if (to === 'open') alert(`opened: ${reason}`); });
 */
export type TransitionReason =
  /** The failure rate over the window reached `failureRateThreshold`. */
  | 'failure-rate'
  /** `consecutiveFailures` failures in a row. */
  | 'consecutive-failures'
  /** The share of slow calls over the window reached `slowCallRateThreshold`. */
  | 'slow-call-rate'
  /** `openMs` went by: the breaker lets probes through. */
  | 'open-elapsed'
  /** Every probe of the half-open state succeeded. */
  | 'probes-succeeded'
  /** A probe failed. */
  | 'probe-failed'
  /** A probe did not report within `halfOpenMaxMs`. */
  | 'probe-timeout'
  /** Another instance sharing the store opened or closed the breaker. */
  | 'peer'
  /** `forceOpen()` or `forceClosed()`. */
  | 'forced'
  /** `reset()`. */
  | 'reset';

/**
 * A breaker's events: those of every guard plus `stateChange` and `ignored`.
 * @example breaker.on('failure', ({ error, durationMs }) => log.debug({ error, durationMs }, 'counted as failure'));
 */
export interface CircuitBreakerEvents extends PolicyEvents {
  stateChange: { from: CircuitState; to: CircuitState; reason: TransitionReason };
  /** A call counted neither way: its error is in `exclude`, or its caller went away. */
  ignored: { error: unknown };
}

/**
 * A class whose instances `exclude` recognises with `instanceof`.
 * @example const ignore: ErrorClass[] = [ValidationError, NotFoundError];
 */
export type ErrorClass = abstract new (...args: never[]) => unknown;

/**
 * Options of `circuitBreaker()`; every one has a default.
 * @example
 * const options: CircuitBreakerOptions = { window: { kind: 'time', ms: 30_000, buckets: 6 }, minimumCalls: 10, openMs: 5000 };
 */
export interface CircuitBreakerOptions {
  /** Used in errors, events and metrics, and as the identity of the breaker's shared state in a store. */
  name?: string;
  /** Calls the rates are measured over. Default `{ kind: 'count', size: 100 }`; `{ kind: 'time' }` means 60 000 ms in 10 buckets. */
  window?: WindowOptions;
  /** Failure rate (%) that opens the breaker, once the window holds `minimumCalls`. Default 50. */
  failureRateThreshold?: number;
  /** Calls the window must hold before the rates count (at most the size of a count window). Default 20. */
  minimumCalls?: number;
  /** Opens after this many failures in a row, whatever the window says. Off by default. */
  consecutiveFailures?: number;
  /** A call that takes at least this long is slow. Off by default. */
  slowCallMs?: number;
  /** Share of slow calls (%) that opens the breaker; needs `slowCallMs`. Default 100 when `slowCallMs` is set. */
  slowCallRateThreshold?: number;
  /** How long the breaker stays open before it lets probes through. Default 30 000. */
  openMs?: number;
  /** Calls admitted in half-open; all must succeed to close. Default 1. */
  halfOpenProbes?: number;
  /** A probe that has not reported after this long counts as failed. Default `openMs`. */
  halfOpenMaxMs?: number;
  /** Whether an error counts as a failure (else as a success). Default: every error not in `exclude`. */
  isFailure?: (error: unknown) => boolean;
  /** Whether a result counts as a failure. Default: never. */
  isFailureResult?: (result: unknown) => boolean;
  /** Error classes counted neither as success nor as failure. */
  exclude?: readonly ErrorClass[];
  /** Shares the breaker's state with other instances (see `bulwark/redis`). */
  store?: BreakerStore;
  /** Where time comes from; tests inject a fake one. Default: monotonic `performance.now()`. */
  clock?: Clock;
}

/**
 * What `stats()` returns: the state, the current window, and lifetime totals.
 * @example const { state, failureRate, totals } = breaker.stats();
 */
export interface CircuitBreakerStats {
  state: CircuitState;
  /** True while held by `forceOpen()` or `forceClosed()`. */
  forced: boolean;
  /** Calls in the current window. */
  calls: number;
  failures: number;
  slowCalls: number;
  /** Failures as a percentage of `calls` (0 without calls). */
  failureRate: number;
  slowCallRate: number;
  consecutiveFailures: number;
  /** Milliseconds until half-open, rounded up, while open (not when forced open). */
  remainingOpenMs?: number;
  /** While half-open: probes running and probes that succeeded. */
  probes?: { inFlight: number; succeeded: number };
  /** Since the breaker was made. */
  totals: { successes: number; failures: number; slowCalls: number; rejections: number; ignored: number };
}

interface ClosedState {
  readonly state: 'closed';
  readonly forced: boolean;
}

interface OpenState {
  readonly state: 'open';
  readonly forced: boolean;
  /** When the breaker half-opens; `Infinity` when forced open. */
  readonly until: number;
}

interface HalfOpenState {
  readonly state: 'half-open';
  readonly forced: false;
  /** Places taken: probes running or succeeded. */
  taken: number;
  succeeded: number;
  /**
   * Start times of the probes still running, oldest first. With a store, each of them
   * holds one probe right, given back when its outcome is known or the state ends.
   */
  readonly running: number[];
  /** The store said another instance probes: refuse until then without asking again. */
  deniedUntil: number;
}

type MachineState = ClosedState | OpenState | HalfOpenState;

// Every legal move and what may cause it. `transition()` refuses anything else, so a bug
// shows up as an exception in tests instead of a breaker stuck in a state.
const LEGAL: { readonly [F in CircuitState]: { readonly [T in CircuitState]?: readonly TransitionReason[] } } = {
  closed: {
    open: ['failure-rate', 'consecutive-failures', 'slow-call-rate', 'peer', 'forced'],
    closed: ['forced', 'reset'],
  },
  open: {
    'half-open': ['open-elapsed'],
    open: ['forced'],
    closed: ['peer', 'forced', 'reset'],
  },
  'half-open': {
    closed: ['probes-succeeded', 'peer', 'forced', 'reset'],
    open: ['probe-failed', 'probe-timeout', 'peer', 'forced'],
  },
};

const GUARD = 'circuitBreaker';
const OPTIONS = [
  'name',
  'window',
  'failureRateThreshold',
  'minimumCalls',
  'consecutiveFailures',
  'slowCallMs',
  'slowCallRateThreshold',
  'openMs',
  'halfOpenProbes',
  'halfOpenMaxMs',
  'isFailure',
  'isFailureResult',
  'exclude',
  'store',
  'clock',
] as const;
const NO_CLASSES: readonly ErrorClass[] = Object.freeze([]);

/**
 * A circuit breaker: closed → open → half-open → closed. While closed it counts outcomes
 * over a window and opens when the failure rate (or the slow-call rate, or a run of
 * consecutive failures) crosses its threshold; open, it refuses calls with a
 * `CircuitOpenError` for `openMs`; then it lets `halfOpenProbes` calls through and closes
 * if they all succeed.
 *
 * @example
 * const breaker = circuitBreaker({ name: 'users-api', consecutiveFailures: 5, openMs: 10_000 });
 * breaker.on('stateChange', ({ from, to, reason }) => log.warn({ from, to, reason }, 'users-api breaker'));
 * const user = await breaker.execute(({ signal }) => fetch(`${base}/users/${id}`, { signal }));
 */
export function circuitBreaker(options?: CircuitBreakerOptions): CircuitBreaker {
  return new CircuitBreaker(options);
}

/**
 * The breaker `circuitBreaker()` makes. Open → half-open is decided when the breaker is
 * next used or read (no timer), and every state change goes through one `transition()`.
 *
 * @example
 * const breaker = new CircuitBreaker({ window: { kind: 'time', ms: 10_000, buckets: 10 } });
 * if (breaker.state === 'open') serveFromCache();
 */
export class CircuitBreaker extends BasePolicy<CircuitBreakerStats, CircuitBreakerEvents> {
  private readonly failureRateThreshold: number;
  private readonly minimumCalls: number;
  /** 0 when the consecutive rule is off. */
  private readonly consecutiveLimit: number;
  /**
   * Undefined when slow calls are not tracked. Not `Infinity`: a field that holds a
   * non-integer number gets a heap box of its own in every breaker (16 bytes each).
   */
  private readonly slowCallMs: number | undefined;
  private readonly slowCallRateThreshold: number;
  private readonly openMs: number;
  private readonly halfOpenProbes: number;
  private readonly halfOpenMaxMs: number;
  private readonly isFailure: ((error: unknown) => boolean) | undefined;
  private readonly isFailureResult: ((result: unknown) => boolean) | undefined;
  private readonly exclude: readonly ErrorClass[];
  private readonly clock: Clock;
  /** The store until the first call attaches to it. */
  private unattached: BreakerStore | undefined;
  private link: BreakerLink | undefined;
  private current: MachineState = { state: 'closed', forced: false };
  private readonly window: OutcomeWindow;
  private consecutive = 0;
  private successes = 0;
  private failures = 0;
  private slowCalls = 0;
  private rejections = 0;
  private ignored = 0;

  constructor(options?: CircuitBreakerOptions) {
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, OPTIONS);
    super(validName(GUARD, o.name) ?? defaultName(GUARD));
    this.window = makeWindow(o.window);
    this.failureRateThreshold = o.failureRateThreshold === undefined ? 50 : percentage(GUARD, 'failureRateThreshold', o.failureRateThreshold);
    const minimumCalls = o.minimumCalls === undefined ? 20 : positiveInteger(GUARD, 'minimumCalls', o.minimumCalls);
    // A count window never holds more than its size: a larger minimum would disable the rates.
    this.minimumCalls = this.window instanceof CountWindow ? Math.min(minimumCalls, this.window.size) : minimumCalls;
    this.consecutiveLimit = o.consecutiveFailures === undefined ? 0 : positiveInteger(GUARD, 'consecutiveFailures', o.consecutiveFailures);
    this.slowCallMs = o.slowCallMs === undefined ? undefined : duration(GUARD, 'slowCallMs', o.slowCallMs);
    if (o.slowCallRateThreshold !== undefined && o.slowCallMs === undefined) {
      fail(GUARD, 'slowCallRateThreshold', 'used together with slowCallMs (which says what a slow call is)', o.slowCallRateThreshold);
    }
    this.slowCallRateThreshold = o.slowCallRateThreshold === undefined ? 100 : percentage(GUARD, 'slowCallRateThreshold', o.slowCallRateThreshold);
    this.openMs = o.openMs === undefined ? 30_000 : duration(GUARD, 'openMs', o.openMs);
    this.halfOpenProbes = o.halfOpenProbes === undefined ? 1 : positiveInteger(GUARD, 'halfOpenProbes', o.halfOpenProbes);
    this.halfOpenMaxMs = o.halfOpenMaxMs === undefined ? this.openMs : duration(GUARD, 'halfOpenMaxMs', o.halfOpenMaxMs);
    this.isFailure = o.isFailure === undefined ? undefined : func(GUARD, 'isFailure', o.isFailure);
    this.isFailureResult = o.isFailureResult === undefined ? undefined : func(GUARD, 'isFailureResult', o.isFailureResult);
    this.exclude = o.exclude === undefined ? NO_CLASSES : errorClasses(o.exclude);
    this.unattached = o.store === undefined ? undefined : breakerStore(o.store);
    this.clock = clockOption(GUARD, o.clock) ?? systemClock;
  }

  // On the prototype rather than each instance: keyed breakers come by the thousand.
  get kind(): 'circuit-breaker' {
    return 'circuit-breaker';
  }

  /** `closed`, `open` or `half-open`, as of now. */
  get state(): CircuitState {
    return this.refresh(this.clock.now()).state;
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    this.ensureAttached();
    const state = this.current;
    if (state.state !== 'closed') return this.runNotClosed(fn, call);
    const start = this.slowCallMs !== undefined || this.hearsOutcomes() ? this.clock.now() : NaN;
    return this.runAdmitted(fn, call, state, start);
  }

  /**
   * Fused pipelines: a closed breaker that needs no timing admits at once and hears the
   * outcome through `[leave]`; every other case goes through `[run]`.
   */
  [enter](_call: Call): unknown {
    this.ensureAttached();
    const state = this.current;
    if (state.state === 'open') {
      // Refusing is synchronous too (no rejected promise); a breaker whose open
      // time ran out goes through `[run]`, which coordinates the probes.
      const now = this.clock.now();
      const refreshed = this.refresh(now);
      if (refreshed.state === 'open') return refuse(this.rejection(refreshed, now));
      return DEFER;
    }
    if (state.state !== 'closed' || this.slowCallMs !== undefined || this.hearsOutcomes()) return DEFER;
    this.admittedCall();
    return state;
  }

  [leave](token: unknown, ending: Ending, outcome: unknown): void {
    const admitted = token as MachineState;
    if (ending === ENDED_OK) this.settleResult(admitted, outcome, NaN);
    else if (ending === ENDED_FAILED) this.settleError(admitted, outcome, NaN);
    else this.settleAborted(admitted, outcome, NaN);
  }

  stats(): CircuitBreakerStats {
    const now = this.clock.now();
    const state = this.refresh(now);
    const window = this.window;
    window.roll(now);
    const calls = window.calls;
    const stats: CircuitBreakerStats = {
      state: state.state,
      forced: state.forced,
      calls,
      failures: window.failures,
      slowCalls: window.slowCalls,
      failureRate: calls === 0 ? 0 : (window.failures / calls) * 100,
      slowCallRate: calls === 0 ? 0 : (window.slowCalls / calls) * 100,
      consecutiveFailures: this.consecutive,
      totals: { successes: this.successes, failures: this.failures, slowCalls: this.slowCalls, rejections: this.rejections, ignored: this.ignored },
    };
    if (state.state === 'open' && !state.forced) stats.remainingOpenMs = Math.max(0, Math.ceil(state.until - now));
    if (state.state === 'half-open') stats.probes = { inFlight: state.running.length, succeeded: state.succeeded };
    return stats;
  }

  /**
   * Opens the breaker and keeps it open until `forceClosed()` or `reset()`.
   * @example app.post('/admin/users-api/isolate', () => breaker.forceOpen());
   */
  forceOpen(): void {
    if (this.current.state === 'open' && this.current.forced) return;
    this.ensureAttached();
    this.transition({ state: 'open', forced: true, until: Infinity }, 'forced', this.clock.now());
  }

  /**
   * Closes the breaker and keeps it closed, whatever the window says, until `reset()`.
   * @example breaker.forceClosed(); // the dependency is known good, stop refusing
   */
  forceClosed(): void {
    if (this.current.state === 'closed' && this.current.forced) return;
    this.ensureAttached();
    this.transition({ state: 'closed', forced: true }, 'forced', this.clock.now());
  }

  /**
   * Back to a plain closed breaker with an empty window (ends `forceOpen`/`forceClosed`).
   * @example breaker.reset();
   */
  reset(): void {
    this.ensureAttached();
    this.transition({ state: 'closed', forced: false }, 'reset', this.clock.now());
  }

  /**
   * Stops sharing state through the store (a `keyed` guard dropping this breaker, a
   * shutdown). The breaker goes on working on its own.
   * @example process.on('SIGTERM', () => breaker.dispose());
   */
  dispose(): void {
    this.unattached = undefined;
    const link = this.link;
    this.link = undefined;
    link?.detach();
  }

  private runNotClosed<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    const now = this.clock.now();
    const state = this.refresh(now);
    if (state.state === 'closed') return this[run](fn, call);
    if (state.state === 'open' || state.taken >= this.halfOpenProbes || now < state.deniedUntil) return this.reject(state, now);
    // The place is taken at once, before any await: that is what keeps concurrent callers out.
    state.taken++;
    if (this.link !== undefined) return this.probeShared(fn, call, state, this.link);
    state.running.push(now);
    return this.runAdmitted(fn, call, state, now);
  }

  /** A probe that must first win the store's probe right, so that one instance probes for all. */
  private async probeShared<T>(fn: InternalFunction<T>, call: Call, state: HalfOpenState, link: BreakerLink): Promise<T> {
    let allowed: boolean;
    try {
      allowed = await link.acquireProbe(this.halfOpenMaxMs);
    } catch {
      // The contract says a store never fails; if one does, probe locally.
      allowed = true;
    }
    // The state moved on while the store answered (a peer's verdict, say): start over.
    if (this.current !== state) {
      if (allowed) link.releaseProbe();
      return this[run](fn, call);
    }
    const now = this.clock.now();
    if (!allowed) {
      state.taken--;
      state.deniedUntil = now + this.halfOpenMaxMs;
      throw this.rejection(state, now);
    }
    state.running.push(now);
    return this.runAdmitted(fn, call, state, now);
  }

  private runAdmitted<T>(fn: InternalFunction<T>, call: Call, admitted: MachineState, start: number): Promise<T> {
    this.admittedCall();
    const scope = call.scope;
    return scope === undefined ? this.runTracked(fn, call, admitted, start) : this.runScoped(fn, call, scope, admitted, start);
  }

  // Not an async function: handing back fn's own promise and watching it with `then` is
  // cheaper than an async wrapper (measured over a bare `await fn()`: ~65 ns a call for
  // the whole breaker, against ~85 ns with async/await).
  private runTracked<T>(fn: InternalFunction<T>, call: Call, admitted: MachineState, start: number): Promise<T> {
    let promise: Promise<T>;
    try {
      promise = Promise.resolve(fn(call));
    } catch (error) {
      this.settleError(admitted, error, start);
      return Promise.reject(error);
    }
    promise.then(
      (result) => this.settleResult(admitted, result, start),
      (error: unknown) => this.settleError(admitted, error, start),
    );
    return promise;
  }

  /**
   * With a scope, the outcome is settled by whichever comes first: `fn` settling, or the
   * scope aborting (a timeout is a failure then, even if `fn` resolves later; any other
   * reason means the caller went away, which says nothing about the dependency).
   */
  private runScoped<T>(fn: InternalFunction<T>, call: Call, scope: Scope, admitted: MachineState, start: number): Promise<T> {
    let settled = false;
    if (scope.aborted) {
      // Cut short before it reached the dependency: nothing to learn from it.
      settled = true;
      this.settleIgnored(admitted, scope.reason, start);
    } else {
      // The handler stays registered after `fn` settles (`settled` silences it): the scope
      // belongs to this call and its owner disposes of it, and taking the handler out
      // (a splice) would cost more than everything else the breaker does.
      scope.onAbort((reason) => {
        if (settled) return;
        settled = true;
        this.settleAborted(admitted, reason, start);
      });
    }
    let promise: Promise<T>;
    try {
      promise = Promise.resolve(fn(call));
    } catch (error) {
      if (!settled) {
        settled = true;
        this.settleError(admitted, error, start);
      }
      return Promise.reject(error);
    }
    promise.then(
      (result) => {
        if (settled) return;
        settled = true;
        this.settleResult(admitted, result, start);
      },
      (error: unknown) => {
        if (settled) return;
        settled = true;
        this.settleError(admitted, error, start);
      },
    );
    return promise;
  }

  private settleResult(admitted: MachineState, result: unknown, start: number): void {
    this.record(admitted, this.isFailureResult !== undefined && ask(this.isFailureResult, result) ? FAILED : 0, result, start);
  }

  /**
   * Most outcomes are untimed successes of a closed breaker that nobody listens to, and
   * `recordOutcome` (every state, every rule, the events) is too big for V8 to inline:
   * `record` is the part of it such a success takes, small enough to be. Once a count
   * window holds `minimumCalls`, a success only keeps or lowers both rates, so it needs no
   * verdict.
   */
  private record(admitted: MachineState, outcome: Outcome, value: unknown, start: number): void {
    if (outcome !== 0 || start === start || !this.recordedPlainSuccess(admitted)) this.recordOutcome(admitted, outcome, value, start);
  }

  private recordedPlainSuccess(admitted: MachineState): boolean {
    const window = this.window;
    if (admitted !== this.current || admitted.state !== 'closed' || this.events !== undefined || window.needsTime || window.calls < this.minimumCalls) return false;
    this.successes++;
    window.record(0, NaN);
    this.consecutive = 0;
    return true;
  }

  private settleError(admitted: MachineState, error: unknown, start: number): void {
    if (isClientDisconnected(error) || this.excluded(error)) this.settleIgnored(admitted, error, start);
    else this.record(admitted, this.isFailure === undefined || ask(this.isFailure, error) ? FAILED : 0, error, start);
  }

  /** The call was cancelled: a timeout is a failure, any other abort (the caller went away) says nothing. */
  private settleAborted(admitted: MachineState, reason: unknown, start: number): void {
    if (isGuardRejection(reason) && reason.reason === 'timeout') this.settleError(admitted, reason, start);
    else this.settleIgnored(admitted, reason, start);
  }

  private excluded(error: unknown): boolean {
    for (const errorClass of this.exclude) if (error instanceof errorClass) return true;
    return false;
  }

  private settleIgnored(admitted: MachineState, error: unknown, start: number): void {
    this.ignored++;
    if (this.events?.has('ignored')) this.events.emit('ignored', { error });
    if (admitted.state !== 'half-open') return;
    this.refresh(this.clock.now());
    if (admitted !== this.current) return;
    admitted.taken--;
    this.probeEnded(admitted, start);
  }

  private probeEnded(state: HalfOpenState, start: number): void {
    removeOne(state.running, start);
    this.link?.releaseProbe();
  }

  private recordOutcome(admitted: MachineState, outcome: Outcome, value: unknown, start: number): void {
    let now = NaN;
    let durationMs: number | undefined;
    if (start === start) {
      now = this.clock.now();
      durationMs = now - start;
      if (this.slowCallMs !== undefined && durationMs >= this.slowCallMs) outcome |= SLOW;
    }
    const failed = (outcome & FAILED) !== 0;
    if (failed) this.failures++;
    else this.successes++;
    if (outcome & SLOW) this.slowCalls++;
    const events = this.events;
    if (events !== undefined) {
      if (failed) {
        if (events.has('failure')) events.emit('failure', { error: value, durationMs });
      } else if (events.has('success')) events.emit('success', { durationMs });
    }

    if (admitted.state === 'closed') {
      // A call admitted before the breaker last changed state says nothing about this one.
      if (admitted !== this.current) return;
      const window = this.window;
      if (window.needsTime && now !== now) now = this.clock.now();
      window.record(outcome, now);
      this.consecutive = failed ? this.consecutive + 1 : 0;
      if (admitted.forced) return;
      const reason = this.verdict(failed);
      if (reason === undefined) return;
      if (now !== now) now = this.clock.now();
      this.transition({ state: 'open', forced: false, until: now + this.openMs }, reason, now);
      return;
    }
    // A probe: always timed, so `now` is known. It may have outlived `halfOpenMaxMs`.
    if (admitted.state !== 'half-open' || this.refresh(now) !== admitted) return;
    this.probeEnded(admitted, start);
    // With the slow-call rule on, a slow probe shows the dependency has not recovered.
    if (failed || (outcome & SLOW) !== 0) {
      this.transition({ state: 'open', forced: false, until: now + this.openMs }, 'probe-failed', now);
    } else if (++admitted.succeeded >= this.halfOpenProbes) {
      this.transition({ state: 'closed', forced: false }, 'probes-succeeded', now);
    }
  }

  private verdict(failed: boolean): TransitionReason | undefined {
    if (failed && this.consecutiveLimit !== 0 && this.consecutive >= this.consecutiveLimit) return 'consecutive-failures';
    const window = this.window;
    const calls = window.calls;
    if (calls < this.minimumCalls) return undefined;
    if (window.failures * 100 >= this.failureRateThreshold * calls) return 'failure-rate';
    if (this.slowCallMs !== undefined && window.slowCalls * 100 >= this.slowCallRateThreshold * calls) return 'slow-call-rate';
    return undefined;
  }

  /** The transitions time makes: open → half-open, and a hung probe's half-open → open. */
  private refresh(now: number): MachineState {
    let state = this.current;
    for (;;) {
      if (state.state === 'open') {
        if (now < state.until) return state;
        state = this.transition(halfOpen(), 'open-elapsed', now);
      } else if (state.state === 'half-open' && state.running.length > 0 && now >= state.running[0]! + this.halfOpenMaxMs) {
        // Reopened when the probe ran out of time, not when somebody noticed: half-open
        // then comes back on schedule even if the breaker was idle in between.
        const failedAt = state.running[0]! + this.halfOpenMaxMs;
        state = this.transition({ state: 'open', forced: false, until: failedAt + this.openMs }, 'probe-timeout', now);
      } else {
        return state;
      }
    }
  }

  /** The one place the state changes: checks the move, then tells the store and the listeners. */
  private transition(next: MachineState, reason: TransitionReason, now: number): MachineState {
    const from = this.current;
    const allowed = LEGAL[from.state][next.state];
    if (allowed === undefined || !allowed.includes(reason)) {
      throw new Error(`${GUARD} "${this.name}": illegal transition ${from.state} → ${next.state} (${reason})`);
    }
    this.current = next;
    // Probes still running when half-open ends (hung, or overtaken) give their rights back now.
    if (from.state === 'half-open' && this.link !== undefined) for (let i = from.running.length; i > 0; i--) this.link.releaseProbe();
    if (next.state === 'closed' && (from.state !== 'closed' || reason === 'reset')) {
      this.window.clear();
      this.consecutive = 0;
    }
    const changed = from.state !== next.state || from.forced !== next.forced;
    if (this.link !== undefined && reason !== 'peer' && (changed || reason === 'reset')) {
      this.link.publish(next.state, next.state === 'open' && next.until !== Infinity ? Math.max(0, next.until - now) : this.openMs);
    }
    if (changed && this.events?.has('stateChange')) this.events.emit('stateChange', { from: from.state, to: next.state, reason });
    return next;
  }

  private reject(state: OpenState | HalfOpenState, now: number): Promise<never> {
    return Promise.reject(this.rejection(state, now));
  }

  private rejection(state: OpenState | HalfOpenState, now: number): CircuitOpenError {
    this.rejections++;
    // While half-open nobody knows how long the probes will take: the adapter's default applies.
    const retryAfterMs = state.state === 'open' && !state.forced ? Math.ceil(state.until - now) : undefined;
    const error = withoutStack(() => new CircuitOpenError(retryAfterMs, this.name));
    if (this.events?.has('rejected')) this.events.emit('rejected', { reason: 'circuit_open', error });
    return error;
  }

  private ensureAttached(): void {
    if (this.unattached !== undefined) this.attach();
  }

  private attach(): void {
    const store = this.unattached!;
    this.unattached = undefined;
    try {
      this.link = store.attach(this.name, {
        opened: (remainingMs) => this.peerOpened(remainingMs),
        closed: () => this.peerClosed(),
      });
    } catch (error) {
      // A store must never fail a request: this breaker goes on alone.
      process.emitWarning(`bulwark: ${GUARD} "${this.name}" could not attach to its store: ${String(error)}`, 'BulwarkStoreWarning');
    }
  }

  private peerOpened(remainingMs: number): void {
    const now = this.clock.now();
    const state = this.refresh(now);
    if (state.forced || state.state === 'open') return;
    const remaining = Number.isFinite(remainingMs) ? Math.max(0, remainingMs) : this.openMs;
    this.transition({ state: 'open', forced: false, until: now + remaining }, 'peer', now);
  }

  private peerClosed(): void {
    const now = this.clock.now();
    const state = this.refresh(now);
    if (state.forced || state.state === 'closed') return;
    this.transition({ state: 'closed', forced: false }, 'peer', now);
  }
}

function halfOpen(): HalfOpenState {
  return { state: 'half-open', forced: false, taken: 0, succeeded: 0, running: [], deniedUntil: -Infinity };
}

/** A user predicate that throws counts as "yes, a failure", and never breaks the call. */
function ask(predicate: (value: unknown) => boolean, value: unknown): boolean {
  try {
    return predicate(value) === true;
  } catch {
    return true;
  }
}

function removeOne(list: number[], value: number): void {
  const index = list.indexOf(value);
  if (index >= 0) list.splice(index, 1);
}

function makeWindow(value: unknown): OutcomeWindow {
  if (value === undefined) return new CountWindow(100);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(GUARD, 'window', "an object such as { kind: 'count', size: 100 }", value);
  const window = value as Record<string, unknown>;
  const kind = oneOf(GUARD, 'window.kind', window.kind, ['count', 'time']);
  if (kind === 'count') {
    knownWindowKeys(window, ['kind', 'size']);
    return new CountWindow(window.size === undefined ? 100 : positiveInteger(GUARD, 'window.size', window.size));
  }
  knownWindowKeys(window, ['kind', 'ms', 'buckets']);
  const ms = window.ms === undefined ? 60_000 : duration(GUARD, 'window.ms', window.ms);
  const buckets = window.buckets === undefined ? 10 : positiveInteger(GUARD, 'window.buckets', window.buckets);
  if (buckets > ms) fail(GUARD, 'window.buckets', `at most window.ms (${ms}), so that a bucket lasts at least 1 ms`, buckets);
  return new TimeWindow(ms, buckets);
}

function knownWindowKeys(window: Record<string, unknown>, allowed: readonly string[]): void {
  for (const key of Object.keys(window)) {
    if (!allowed.includes(key)) throw new TypeError(`${GUARD}: unknown option "window.${key}" for a ${String(window.kind)} window (allowed: ${allowed.join(', ')})`);
  }
}

function errorClasses(value: unknown): readonly ErrorClass[] {
  if (!Array.isArray(value)) fail(GUARD, 'exclude', 'an array of error classes', value);
  value.forEach((item: unknown, index) => {
    // `instanceof` throws on a function without a prototype (an arrow function).
    if (typeof item !== 'function' || typeof item.prototype !== 'object') fail(GUARD, `exclude[${index}]`, 'an error class', item);
  });
  return Object.freeze([...(value as readonly ErrorClass[])]);
}

function breakerStore(value: unknown): BreakerStore {
  if (typeof value !== 'object' || value === null || typeof (value as BreakerStore).attach !== 'function') {
    fail(GUARD, 'store', 'a breaker store (an object with attach())', value);
  }
  return value as BreakerStore;
}
