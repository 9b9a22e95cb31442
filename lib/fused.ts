import type { Scope } from './cancellation.js';
import { Call, runPolicy, type CallContext, type InternalFunction, type Policy } from './policy.js';

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

export const enter: unique symbol = Symbol('bulwark.enter');
export const leave: unique symbol = Symbol('bulwark.leave');
export const deadline: unique symbol = Symbol('bulwark.deadline');

/** A guard that can admit synchronously and be told the outcome afterwards. */
export interface FusableGuard extends Policy {
  /**
   * Admits the call (returns a token for `[leave]`), refuses it (throws its rejection), or
   * returns `DEFER` to have this call go through `[run]`.
   */
  [enter](call: Call): unknown;
  /** The admitted call ended; called exactly once per admitting `[enter]`. */
  [leave](token: unknown, call: Call, outcome: unknown, failed: boolean): void;
}

/** What a fused segment needs from a timeout. */
export interface DeadlineGuard extends Policy {
  [deadline](call: Call, owner: DeadlineOwner): TimedScope;
}

/** The child scope a timeout opens for one call. */
export interface TimedScope extends Scope {
  /** Ends the deadline: false when it had already passed (the owner was told). */
  close(outcome: unknown, failed: boolean): boolean;
}

/** Told by the timeout when the deadline passes first. */
export interface DeadlineOwner {
  expired(error: unknown): void;
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
  if (index >= policies.length) return Promise.resolve().then(() => fn(call));
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
    const policies = this.policies;
    const fused = new FusedCall(this, call);
    let inner = call;
    for (let i = 0; i < policies.length; i++) {
      const policy = policies[i]!;
      if (i === this.timeoutAt) {
        // The segment's own record is the call the guards inside the timeout see.
        fused.timed((policy as DeadlineGuard)[deadline](inner, fused));
        inner = fused;
        fused.entered = i + 1;
        continue;
      }
      let token: unknown;
      try {
        token = (policy as FusableGuard)[enter](inner);
      } catch (error) {
        // Refused: the guards outside it hear of the refusal as the call's outcome.
        fused.finish(error, true);
        return Promise.reject(error);
      }
      if (token === DEFER) return fused.answer(runNested(policies, i, fn, inner)) as Promise<T>;
      fused.setToken(i, token);
      fused.entered = i + 1;
    }
    let result: T | PromiseLike<T>;
    try {
      result = fn(inner);
    } catch (error) {
      return fused.answer(Promise.reject(error)) as Promise<T>;
    }
    return fused.answer(result) as Promise<T>;
  }
}

/**
 * One call through a fused segment. It is also the call that the guards and the function
 * inside the timeout see (with the timeout's scope), one object instead of two.
 */
class FusedCall extends Call implements DeadlineOwner {
  entered = 0;
  // The guards' tokens: three fields cover the usual pipeline without an array per call.
  private token0: unknown = undefined;
  private token1: unknown = undefined;
  private token2: unknown = undefined;
  private moreTokens: unknown[] | undefined = undefined;
  private deadlineScope: TimedScope | undefined = undefined;
  private done = false;
  private resolve: ((value: unknown) => void) | undefined = undefined;
  private reject: ((error: unknown) => void) | undefined = undefined;

  constructor(
    private readonly segment: FusedSegment,
    private readonly outer: Call,
  ) {
    super(outer.scope, outer.attempt, undefined);
  }

  /** One context for the whole call, even when the caller gave none and it is made late. */
  override get context(): CallContext {
    return this.outer.context;
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

  timed(scope: TimedScope): void {
    this.deadlineScope = scope;
    this.cancellation = scope;
  }

  /** Hands back the caller's promise for `result`, and arranges for the guards to hear how it ends. */
  answer(result: unknown): Promise<unknown> {
    const promise = Promise.resolve(result);
    if (this.deadlineScope === undefined) {
      // Without a timeout nothing can settle the call early: the caller gets the
      // function's own promise, and the guards hear of it first (their reaction is
      // registered before the caller's `await`).
      if (this.entered > 0) promise.then(this.succeeded, this.failed);
      return promise;
    }
    capturing = this;
    const answer = new Promise(capture);
    promise.then(this.succeeded, this.failed);
    return answer;
  }

  private readonly succeeded = (value: unknown): void => this.settle(value, false);
  private readonly failed = (error: unknown): void => this.settle(error, true);

  private settle(outcome: unknown, failed: boolean): void {
    if (this.done) return;
    this.finish(outcome, failed);
    if (this.resolve !== undefined) {
      if (failed) this.reject!(outcome);
      else this.resolve(outcome);
    }
  }

  /** Tells every guard that entered how the call ended, innermost first. */
  finish(outcome: unknown, failed: boolean): void {
    if (this.done) return;
    this.done = true;
    const scope = this.deadlineScope;
    if (scope !== undefined && !scope.close(outcome, failed)) return;
    this.leaveAll(outcome, failed);
  }

  expired(error: unknown): void {
    if (this.done) return;
    this.done = true;
    this.leaveAll(error, true);
    this.reject?.(error);
  }

  private leaveAll(outcome: unknown, failed: boolean): void {
    const { policies, timeoutAt } = this.segment;
    for (let i = this.entered - 1; i >= 0; i--) {
      if (i === timeoutAt) continue;
      (policies[i] as FusableGuard)[leave](this.token(i), i > timeoutAt && timeoutAt >= 0 ? this : this.outer, outcome, failed);
    }
  }

  static capture(this: void, resolve: (value: unknown) => void, reject: (error: unknown) => void): void {
    capturing!.resolve = resolve;
    capturing!.reject = reject;
    capturing = undefined;
  }
}

// The promise executor runs synchronously inside `new Promise`, so a module slot hands it
// the call without a closure per call.
let capturing: FusedCall | undefined;
const capture = FusedCall.capture;

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
