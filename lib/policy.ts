import { Scope } from './cancellation.js';
import type { Clock } from './clock.js';
import { Emitter, type Unsubscribe } from './events.js';
import type { RejectionReason } from './errors.js';

/** The request as adapters describe it to guards, the same in every framework. */
export interface NormalizedRequest {
  /** Client address as the framework resolves it (honouring its trust-proxy setting). */
  ip: string;
  method: string;
  /** Path without the query string. */
  path: string;
  headers: Readonly<Record<string, string | string[] | undefined>>;
}

/** What `rateLimit` learned about the caller's budget, for the `RateLimit-*` headers. */
export interface RateLimitInfo {
  limit: number;
  remaining: number;
  /** Milliseconds until the budget is whole again. */
  resetMs: number;
}

/**
 * One plain object per call, handed unchanged through a pipeline. Adapters put the
 * normalised request in `request`; `rateLimit` records its decision in `rateLimit`.
 */
export interface CallContext {
  request?: NormalizedRequest;
  rateLimit?: RateLimitInfo;
  [key: string]: unknown;
}

/** What a guarded function receives. */
export interface ExecuteContext {
  /** Aborts when the caller's signal aborts, a timeout fires, or the client goes away. */
  readonly signal: AbortSignal;
  /** 1 for the first try, 2 for the first retry, … */
  readonly attempt: number;
  readonly context: CallContext;
}

export type GuardedFunction<T> = (ctx: ExecuteContext) => T | PromiseLike<T>;

export type PolicyKind =
  | 'circuit-breaker'
  | 'bulkhead'
  | 'timeout'
  | 'retry'
  | 'fallback'
  | 'rate-limit'
  | 'load-shedder'
  | 'adaptive-concurrency'
  | 'keyed'
  | 'chaos'
  | 'pipeline';

/** Events every guard may publish. Guards add their own (a breaker's `stateChange`, …). */
export interface PolicyEvents {
  /** A guard that can refuse (breaker, bulkhead, rate limit, load shedder, adaptive limit) let the call through. */
  admitted: Record<string, never>;
  /** The guarded function ran and its outcome was a success. */
  success: { durationMs: number | undefined };
  /** The guarded function ran and failed (as the guard counts failures). */
  failure: { error: unknown; durationMs: number | undefined };
  /** The guard refused the call (or cut it short) with a `GuardRejection`. */
  rejected: { reason: RejectionReason; error: Error };
}

/** Everything that guards calls: one `execute`, a `name`, `stats()`. */
export interface Policy<Stats extends object = object> {
  readonly name: string;
  readonly kind: PolicyKind;
  /**
   * Runs `fn` under this policy. `signal` is the caller's; `context` is handed to `fn`
   * (and to every guard of a pipeline) unchanged.
   */
  execute<T>(fn: GuardedFunction<T>, signal?: AbortSignal, context?: CallContext): Promise<T>;
  stats(): Stats;
  /** Guards this one is made of (a pipeline's members, a keyed guard's live instances). */
  children?(): Iterable<Policy>;
}

/**
 * The internal entry point guards use among themselves: it hands over a `Call` (lazy
 * signal and all) instead of an `AbortSignal`, so a pipeline creates no signal at all.
 */
export const run: unique symbol = Symbol('bulwark.run');

export type InternalFunction<T> = (call: Call) => T | PromiseLike<T>;

/** A policy made by this copy of bulwark, with the internal entry point. */
export interface InternalPolicy<Stats extends object = object> extends Policy<Stats> {
  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T>;
}

/** The object a guarded function receives; its signal is created on first read. */
export class Call implements ExecuteContext {
  constructor(
    protected cancellation: Scope | undefined,
    readonly attempt: number,
    private ownContext: CallContext | undefined,
  ) {}

  /** The caller's context object, or one made on first read when the caller gave none. */
  get context(): CallContext {
    return (this.ownContext ??= {});
  }

  /** The cancellation scope, or undefined when nothing can cancel this call. */
  get scope(): Scope | undefined {
    return this.cancellation;
  }

  get signal(): AbortSignal {
    // Through `scope`, which a subclass may make on demand.
    return (this.scope ?? (this.cancellation = new Scope())).signal;
  }

  /** Whether the call was cancelled. Unlike reading `scope`, never makes a scope to find out. */
  get aborted(): boolean {
    const scope = this.cancellation;
    return scope !== undefined && scope.aborted;
  }

  /** Why the call was cancelled; undefined while it was not. */
  get abortReason(): unknown {
    return this.cancellation?.reason;
  }

  /** Same attempt and context, another scope (a timeout's child scope, say). */
  withScope(scope: Scope): Call {
    return new Call(scope, this.attempt, this.context);
  }

  withAttempt(attempt: number): Call {
    return new Call(this.scope, attempt, this.context);
  }
}

/** Runs `policy` with the internal entry point when it has one, else through `execute`. */
export function runPolicy<T>(policy: Policy, fn: InternalFunction<T>, call: Call): Promise<T> {
  const internal = (policy as Partial<InternalPolicy>)[run];
  if (internal !== undefined) return internal.call(policy, fn, call) as Promise<T>;
  // A policy from another copy of bulwark (or a user's own): give it a real signal.
  return policy.execute((ctx) => fn(ctx instanceof Call ? ctx : new Call(new Scope(ctx.signal), ctx.attempt, ctx.context)), call.signal, call.context);
}

/** Calls `fn` and hands back a promise: a synchronous throw becomes a rejection. */
export function invoke<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
  try {
    return Promise.resolve(fn(call));
  } catch (error) {
    return Promise.reject(error);
  }
}

const ADMITTED: Record<string, never> = Object.freeze({});

const counters = new Map<string, number>();

/** `circuitBreaker-1`, `circuitBreaker-2`, … for guards the user did not name. */
export function defaultName(factory: string): string {
  const next = (counters.get(factory) ?? 0) + 1;
  counters.set(factory, next);
  return `${factory}-${next}`;
}

/**
 * Shared base of the built-in guards: the public `execute`, events, and the name.
 * Subclasses implement `[run]` and `stats()`.
 */
export abstract class BasePolicy<Stats extends object, Events extends PolicyEvents = PolicyEvents> implements InternalPolicy<Stats> {
  abstract readonly kind: PolicyKind;
  readonly name: string;
  /** Created on the first subscription; guards check `events?.has(…)` before building a payload. */
  protected events: Emitter<Events> | undefined;

  /** Publishes `admitted` when somebody listens; one check otherwise. */
  protected admittedCall(): void {
    const events = this.events as Emitter<PolicyEvents> | undefined;
    if (events !== undefined && events.has('admitted')) events.emit('admitted', ADMITTED);
  }

  /**
   * Somebody listens to `success` or `failure`: outcomes must be heard and timed, which is
   * what keeps a guard off its cheapest path (no clock read, no fusing).
   */
  protected hearsOutcomes(): boolean {
    const events = this.events as Emitter<PolicyEvents> | undefined;
    return events !== undefined && (events.has('success') || events.has('failure'));
  }

  /** Runs `fn` and reports how it ended, with its duration on `clock`, as `success` or `failure`. */
  protected async runObserved<T>(fn: InternalFunction<T>, call: Call, clock: Clock): Promise<T> {
    const events = this.events as Emitter<PolicyEvents> | undefined;
    const started = clock.now();
    try {
      const result = await fn(call);
      if (events?.has('success')) events.emit('success', { durationMs: clock.now() - started });
      return result;
    } catch (error) {
      if (events?.has('failure')) events.emit('failure', { error, durationMs: clock.now() - started });
      throw error;
    }
  }

  constructor(name: string) {
    this.name = name;
  }

  /**
   * Subscribes to an event; returns a function that unsubscribes.
   * @example const off = breaker.on('stateChange', ({ from, to }) => log.warn({ from, to }));
   */
  on<K extends keyof Events>(event: K, listener: (event: Events[K]) => void): Unsubscribe {
    return (this.events ??= new Emitter<Events>()).on(event, listener);
  }

  execute<T>(fn: GuardedFunction<T>, signal?: AbortSignal, context?: CallContext): Promise<T> {
    if (signal === undefined) return this[run](fn, new Call(undefined, 1, context));
    return executeWithSignal(this, fn, signal, context);
  }

  abstract [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T>;
  abstract stats(): Stats;
}

async function executeWithSignal<T>(policy: InternalPolicy, fn: GuardedFunction<T>, signal: AbortSignal, context: CallContext | undefined): Promise<T> {
  const scope = new Scope(signal);
  try {
    return await policy[run](fn, new Call(scope, 1, context));
  } finally {
    scope.dispose();
  }
}
