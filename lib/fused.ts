import { Scope } from './cancellation.js';
import type { DeadlineEntry } from './deadline-queue.js';
import { observe, promiseFor, settle, type Observer } from './settlers.js';
import { Call, invoke, runPolicy, type CallContext, type InternalFunction, type Policy } from './policy.js';

// A pipeline of guards that each wrap the call in a promise of their own pays for every
// layer: a promise, an `await`, a closure (~40 ns each on Node 20). Most guards decide
// admission synchronously and only need to hear the outcome, so a pipeline runs a run of
// such guards as one layer: every guard's `[enter]`, the function, one `then`, every
// guard's `[leave]`. A guard that cannot decide at once (a bulkhead that must queue, a
// breaker with a probe to coordinate) answers DEFER, and the rest of the run goes through
// the ordinary nested path. A timeout in the run is fused too: it contributes the child
// scope and the deadline, and the segment owns the one promise that can settle early.

/** `[enter]` answers this when the guard needs its full `[run]` path for this call. */
export const DEFER: unique symbol = Symbol('bulwark.defer');

/** `[enter]` answers this (through `refuse`) to refuse the call. */
export const REFUSED: unique symbol = Symbol('bulwark.refused');

// Refusing by answering rather than throwing: a thrown error costs V8 a message with a
// source position (~2 µs a refusal on a route, measured), a returned one nothing.
let refusal: unknown;

/** What `[enter]` returns to refuse the call with `error`. */
export function refuse(error: unknown): typeof REFUSED {
  refusal = error;
  return REFUSED;
}

/** A call the segment's guards refused: the rejection, for the caller to answer with. */
export class Refusal {
  constructor(readonly error: unknown) {}
}

/** How a call through a fused segment ended, for `[leave]`. */
export type Ending = typeof ENDED_OK | typeof ENDED_FAILED | typeof ENDED_ABORTED;
export const ENDED_OK = 0;
export const ENDED_FAILED = 1;
export const ENDED_ABORTED = 2;

export const enter: unique symbol = Symbol('bulwark.enter');
export const leave: unique symbol = Symbol('bulwark.leave');
export const deadline: unique symbol = Symbol('bulwark.deadline');

/** A guard that can admit synchronously and be told the outcome afterwards. */
export interface FusableGuard extends Policy {
  /**
   * Admits the call (returns a token for `[leave]`), refuses it (returns `refuse(rejection)`),
   * or returns `DEFER` to have this call go through `[run]`. Never asked about a call that
   * was cancelled before the segment began.
   */
  [enter](call: Call): unknown;
  /**
   * The admitted call ended; called exactly once per admitting `[enter]`. `ending` says how:
   * `ENDED_OK` or `ENDED_FAILED` with the function's value or error (a timeout of the segment is
   * a failure with its `TimeoutError`), or `ENDED_ABORTED` when the caller's call was cancelled
   * first, with the abort reason as `outcome`.
   */
  [leave](token: unknown, ending: Ending, outcome: unknown): void;
}

/** What a fused segment needs from a timeout. */
export interface DeadlineGuard extends Policy {
  /** Starts timing `entry`; the guard calls `entry.timedOut()` if the deadline passes first. */
  [deadline](entry: TimedCall): void;
  /** Ends the deadline of a call that settled: false when it had already passed. */
  finish(entry: TimedCall, outcome: unknown, failed: boolean): boolean;
}

/** A call a timeout times: its deadline-queue entry, and what the timeout tells it. */
export interface TimedCall extends DeadlineEntry {
  /** The call ended in time: let go of the caller's scope. */
  dispose(): void;
  /** The deadline passed: abort the call and answer the caller with `error`. */
  timedOut(error: unknown): void;
}

export function isFusable(policy: Policy): policy is FusableGuard {
  return typeof (policy as Partial<FusableGuard>)[enter] === 'function';
}

export function isDeadline(policy: Policy): policy is DeadlineGuard {
  return typeof (policy as Partial<DeadlineGuard>)[deadline] === 'function';
}

/** Runs `policies[index…]` the ordinary way: each wraps the next. */
export function runNested<T>(policies: readonly Policy[], index: number, fn: InternalFunction<T>, call: Call): Promise<T> {
  if (index === policies.length - 1) return runPolicy(policies[index]!, fn, call);
  if (index >= policies.length) return invoke(fn, call);
  return runPolicy(policies[index]!, (inner) => runNested(policies, index + 1, fn, inner), call);
}

/** A run of fusable guards (at most one timeout among them), outermost first. */
export class FusedSegment {
  constructor(
    readonly policies: readonly Policy[],
    /** Index of the timeout in `policies`, or -1. */
    readonly timeoutAt: number,
  ) {}

  run<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    return this.runStarted(this.begin(call, undefined, fn as InternalFunction<unknown>), fn);
  }

  private runStarted<T>(started: FusedCall | Promise<unknown> | Refusal, fn: InternalFunction<T>): Promise<T> {
    if (started instanceof Refusal) return Promise.reject(started.error);
    if (!(started instanceof FusedCall)) return started as Promise<T>;
    let result: T | PromiseLike<T>;
    try {
      result = fn(started.inner);
    } catch (error) {
      return started.answer(Promise.reject(error)) as Promise<T>;
    }
    return started.answer(result) as Promise<T>;
  }

  /**
   * Enters every guard of the segment. When all admit, returns the call's record without
   * running anything: the caller runs the function with `inner` and reports how it ended
   * with `finish()` (no promise involved), and `owner` hears if the timeout passes first.
   * When a guard cannot decide at once (DEFER), the rest of the segment runs `fn` the
   * ordinary way and the promise of that comes back instead. A refusal comes back as a
   * `Refusal`, after the guards that had admitted the call heard of it.
   */
  begin(call: Call, owner: SegmentOwner, fn?: InternalFunction<unknown>): FusedCall | Promise<unknown> | Refusal;
  begin(call: Call, owner: undefined, fn: InternalFunction<unknown>): FusedCall | Promise<unknown> | Refusal;
  begin(call: Call, owner: SegmentOwner | undefined, fn: InternalFunction<unknown> | undefined): FusedCall | Promise<unknown> | Refusal {
    // A call cancelled before it began takes the ordinary way, where each guard answers it
    // as it does any cancelled call; so `[enter]` never has to ask.
    if (call.aborted) return this.stopped(new FusedCall(this, call, undefined), DEFER, 0, call, owner, fn);
    return this.enterAll(call, undefined, owner, fn);
  }

  /**
   * `run` for a caller that gave no call of its own (`execute` without a signal): the
   * segment's record is the whole call, with nothing outside it that could cancel it.
   */
  runRoot<T>(fn: InternalFunction<T>, context: CallContext | undefined): Promise<T> {
    return this.runStarted(this.enterAll(undefined, context, undefined, fn as InternalFunction<unknown>), fn);
  }

  // The record is made in here rather than by the callers: V8 then compiles it into this
  // function, whose inlining budget it fits, and not into the caller's.
  private enterAll(call: Call | undefined, context: CallContext | undefined, owner: SegmentOwner | undefined, fn: InternalFunction<unknown> | undefined): FusedCall | Promise<unknown> | Refusal {
    const policies = this.policies;
    const timeoutAt = this.timeoutAt;
    const fused = new FusedCall(this, call, context);
    let inner = call ?? fused;
    try {
      for (let i = 0; i < policies.length; i++) {
        const policy = policies[i]!;
        if (i === timeoutAt) {
          // The segment's own record is the call the guards inside the timeout see.
          (policy as DeadlineGuard)[deadline](fused);
          inner = fused;
          fused.entered = i + 1;
          continue;
        }
        const token = (policy as FusableGuard)[enter](inner);
        if (typeof token === 'symbol' && (token === REFUSED || token === DEFER)) return this.stopped(fused, token, i, inner, owner, fn);
        fused.setToken(i, token);
        fused.entered = i + 1;
      }
    } catch (error) {
      // A guard that failed to decide (a key function that threw): the call fails with it.
      fused.finish(error, true);
      return new Refusal(error);
    }
    // Only now: a call that went the ordinary way above answers its caller through the promise.
    fused.owner = owner;
    return fused;
  }

  // Out of `begin`, which would otherwise pay for a closure context on every call: the
  // function literal below captures `owner`.
  private stopped(fused: FusedCall, token: symbol, index: number, inner: Call, owner: SegmentOwner | undefined, fn: InternalFunction<unknown> | undefined): Promise<unknown> | Refusal {
    if (token === REFUSED) {
      const error = refusal;
      refusal = undefined;
      // The guards outside it hear of the refusal as the call's outcome.
      fused.finish(error, true);
      return new Refusal(error);
    }
    return fused.answer(runNested(this.policies, index, fn ?? ((deferred: Call) => owner!.runDeferred(deferred)), inner));
  }
}

/** What drives a call started with `FusedSegment.begin` without promises. */
export interface SegmentOwner {
  /** The timeout passed before the call ended. */
  expired(error: unknown): void;
  /** A guard could not admit the call at once: the call's function, for the ordinary path. */
  runDeferred(call: Call): Promise<unknown>;
}

/**
 * One call through a fused segment. With a timeout in the segment it is also the call that
 * the guards and the function inside the timeout see, and the timeout's deadline-queue
 * entry: one object per call instead of three. Its cancellation scope (a child of the
 * caller's) is made only when something asks for it, which most calls never do. A call
 * that `execute` started without a signal has no outer call: this record is the call.
 */
export class FusedCall extends Call implements TimedCall, Observer {
  entered = 0;
  /** Hears of the timeout instead of the promise of `answer()`, when the caller drives the call itself. */
  owner: SegmentOwner | undefined = undefined;
  deadline = 0;
  queued = false;
  // The guards' tokens: three fields cover the usual pipeline without an array per call.
  private token0: unknown = undefined;
  private token1: unknown = undefined;
  private token2: unknown = undefined;
  private moreTokens: unknown[] | undefined = undefined;
  /** The timeout's error, once the deadline passed. */
  private timeoutError: unknown = undefined;
  private done = false;
  /** Settle the caller's promise when there is a timeout (`promiseFor`). */
  resolve: ((value: unknown) => void) | undefined = undefined;
  reject: ((error: unknown) => void) | undefined = undefined;

  constructor(
    private readonly segment: FusedSegment,
    /** The caller's call; undefined when this record is the whole call (`runRoot`). */
    private readonly outer: Call | undefined,
    context: CallContext | undefined,
  ) {
    super(undefined, outer === undefined ? 1 : outer.attempt, context);
  }

  /** Whether the call is being timed: the segment has a timeout and the call got that far. */
  private get timed(): boolean {
    const at = this.segment.timeoutAt;
    return at >= 0 && this.entered > at;
  }

  /** The call the function runs with: this one inside a timeout, else the caller's. */
  get inner(): Call {
    return this.outer === undefined || this.timed ? this : this.outer;
  }

  /** One context for the whole call, even when the caller gave none and it is made late. */
  override get context(): CallContext {
    const outer = this.outer;
    return outer === undefined ? super.context : outer.context;
  }

  /** The timeout's child scope of the caller's, made on first read. */
  override get scope(): Scope {
    return (this.cancellation ??= this.openScope());
  }

  override get aborted(): boolean {
    const scope = this.cancellation;
    if (scope !== undefined) return scope.aborted;
    return this.timeoutError !== undefined || this.callerAborted();
  }

  override get abortReason(): unknown {
    const scope = this.cancellation;
    if (scope !== undefined) return scope.reason;
    return this.timeoutError ?? this.outer?.abortReason;
  }

  private callerAborted(): boolean {
    const outer = this.outer;
    return outer !== undefined && outer.aborted;
  }

  private openScope(): Scope {
    // Asked for after the call ended in time: nothing will abort it any more.
    const scope = new Scope(this.done && this.timeoutError === undefined ? undefined : this.outer?.scope);
    if (this.timeoutError !== undefined) scope.abort(this.timeoutError);
    return scope;
  }

  setToken(index: number, token: unknown): void {
    if (index === 0) this.token0 = token;
    else if (index === 1) this.token1 = token;
    else if (index === 2) this.token2 = token;
    else (this.moreTokens ??= [])[index - 3] = token;
  }

  private token(index: number): unknown {
    if (index === 0) return this.token0;
    if (index === 1) return this.token1;
    if (index === 2) return this.token2;
    return this.moreTokens?.[index - 3];
  }

  /** Hands back the caller's promise for `result`, and arranges for the guards to hear how it ends. */
  answer(result: unknown): Promise<unknown> {
    // Cheaper than Promise.resolve(), which looks up `constructor` to tell a native promise.
    const promise = result instanceof Promise ? (result as Promise<unknown>) : Promise.resolve(result);
    let answer = promise;
    if (this.timed) {
      // Only a timeout can settle the call before the function does: then the caller gets
      // a promise of the segment's own.
      answer = promiseFor(this);
    } else if (this.entered === 0) {
      return promise;
    }
    // Registered before the caller's `await`: the guards hear of the outcome first.
    observe(promise, this);
    return answer;
  }

  /** @internal The function's promise settled (through `answer()`). */
  settled(outcome: unknown, failed: boolean): void {
    if (this.done) return;
    this.finish(outcome, failed);
    if (this.resolve !== undefined) settle(this, outcome, failed);
  }

  /**
   * Tells every guard that entered how the call ended, innermost first. Once only: a call
   * that ran out of time was already reported.
   */
  finish(outcome: unknown, failed: boolean): void {
    if (this.done) return;
    this.done = true;
    if (this.timed) {
      const { policies, timeoutAt } = this.segment;
      if (!(policies[timeoutAt] as DeadlineGuard).finish(this, outcome, failed)) return;
    }
    // The caller's abort is checked here and in timedOut() rather than once in leaveAll():
    // folded in there, V8 inlined leaveAll into this method and no longer the timeout's
    // finish (95 more instructions per call, measured).
    if (this.callerAborted()) this.leaveAll(ENDED_ABORTED, this.outer!.abortReason);
    else this.leaveAll(failed ? ENDED_FAILED : ENDED_OK, outcome);
  }

  dispose(): void {
    this.cancellation?.dispose();
  }

  timedOut(error: unknown): void {
    this.timeoutError = error;
    const scope = this.cancellation;
    if (scope !== undefined) {
      // Abort first: whatever listens on the signal stops before the caller hears of it.
      // Aborting also unlinks the scope from its parent.
      scope.abort(error);
      scope.dispose();
    }
    if (this.done) return;
    this.done = true;
    if (this.callerAborted()) this.leaveAll(ENDED_ABORTED, this.outer!.abortReason);
    else this.leaveAll(ENDED_FAILED, error);
    if (this.owner !== undefined) this.owner.expired(error);
    else this.reject?.(error);
  }

  private leaveAll(ending: Ending, outcome: unknown): void {
    const policies = this.segment.policies;
    const timeoutAt = this.segment.timeoutAt;
    for (let i = this.entered - 1; i >= 0; i--) if (i !== timeoutAt) (policies[i] as FusableGuard)[leave](this.token(i), ending, outcome);
  }
}

/**
 * Splits a pipeline's guards into fused segments and guards that run on their own, so
 * that each maximal run of fusable guards (with at most one timeout) is one layer.
 */
export function compile(policies: readonly Policy[]): Array<FusedSegment | Policy> {
  const parts: Array<FusedSegment | Policy> = [];
  let run: Policy[] = [];
  let timeoutAt = -1;
  const flush = (): void => {
    if (run.length === 1 && timeoutAt < 0) parts.push(run[0]!);
    else if (run.length > 0) parts.push(new FusedSegment(run, timeoutAt));
    run = [];
    timeoutAt = -1;
  };
  for (const policy of policies) {
    if (isDeadline(policy)) {
      if (timeoutAt >= 0) flush();
      timeoutAt = run.length;
      run.push(policy);
    } else if (isFusable(policy)) {
      run.push(policy);
    } else {
      flush();
      parts.push(policy);
    }
  }
  flush();
  return parts;
}
