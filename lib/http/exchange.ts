// One request through a guarded route: runs the handler under the policy, listens to what
// the handler and the connection do, and decides the single answer the client gets. The
// adapters report events (the handler threw, the handler is answering with this status)
// and carry out the decisions (send this answer, let that failure stand) on their framework.
//
// This runs on every request of a guarded route, so the common case (the policy admits,
// the handler answers, the response ends) is kept to a few allocations: no AbortController
// until someone reads `signal`, no request description until something reads it, no
// listener on the guard's own scope until the handler holds a signal, no async function.

import { EventEmitter } from 'node:events';
import { ServerResponse } from 'node:http';
import { Scope } from '../cancellation.js';
import { ClientDisconnectedError, isGuardRejection, withoutStack, type GuardRejection } from '../errors.js';
import { FusedCall, Refusal, type SegmentOwner } from '../fused.js';
import { Call, runPolicy, type CallContext } from '../policy.js';
import { degradedAnswer, rateLimitHeaders, rejectionAnswer, type AnswerReason, type HttpAnswer } from './answers.js';
import type { HeaderReader, HttpRequest } from './cache.js';
import { errorStatus, type FallbackContext, type HttpGuard } from './options.js';
import { unwatchSocket, watchSocket, type SocketWatcher, type WatchableSocket } from './socket-watch.js';

/** The part of Node's `ServerResponse` the exchange watches. */
export interface RawResponse {
  readonly headersSent: boolean;
  readonly writableEnded: boolean;
  /** What `writableEnded` reads, as an own field of Node's responses (see `ended`). */
  readonly finished?: boolean;
  readonly statusCode: number;
  /** Null while the response waits behind an earlier one on its connection (HTTP/1.1 pipelining). */
  readonly socket?: { readonly destroyed?: boolean } | null;
  /** The request it answers, whose socket is the connection's. */
  readonly req?: { readonly socket?: WatchableSocket | null };
  on(event: 'close', listener: () => void): unknown;
  destroy(error?: Error): unknown;
}

/**
 * Whether `end()` was called on the response, read where every request looks (its end, its
 * close). Node's `writableEnded` getter returns the response's own `finished` field (which
 * its docs call deprecated in favour of the getter, but Node itself keeps setting): the field
 * is found on the object at once, where the getter is looked up through five prototypes on
 * Express's response, whose every read misses V8's caches (about 1,000 instructions).
 * A response without the field answers through the getter.
 */
function ended(raw: RawResponse): boolean {
  const finished = raw.finished;
  return finished === undefined ? raw.writableEnded : finished;
}

/** What an adapter does on its framework when the exchange decides. */
export interface ResponseTarget {
  /** The raw Node response underneath (for `close`, `headersSent`, `destroy`). */
  readonly raw: RawResponse;
  /** Writes the guard's answer. From now on the handler's writes are dropped. */
  send(answer: HttpAnswer): void;
  /** The guard takes the response from the handler (its answer follows): drop the handler's writes from now on. */
  takeOver(): void;
  /**
   * Lets the handler's failure stand: a thrown error goes to the framework's error handling
   * (`thrown`), a held failing answer goes out as the handler wrote it.
   */
  release(error: unknown, thrown: boolean): void;
  /** Adds headers to the handler's answer (the `RateLimit-*` set), before the handler runs. */
  setHeaders(headers: Record<string, string>): void;
  /** Runs the rest of the route (the handler), when `run()` is given no function. */
  start?(): void;
  /** Describes the request; called at most once, when something reads it. */
  describe?(): HttpRequest;
}

/**
 * The handler answered with a status that counts as a failure (by default, 5xx): what the
 * guarded call rejects with, so that breakers count it.
 *
 * @example breaker.on('failure', ({ error }) => { if (error instanceof FailedResponseError) log(error.status); });
 */
export class FailedResponseError extends Error {
  readonly status: number;
  constructor(status: number) {
    super(`the route answered ${status}`);
    this.name = 'FailedResponseError';
    this.status = status;
  }
}

/** The key under which a framework's request object (and Fastify's reply) holds its exchange. */
export const EXCHANGE_KEY: unique symbol = Symbol('bulwark.exchange');
const EXCHANGE: typeof EXCHANGE_KEY = EXCHANGE_KEY;
/** Marks a prototype whose `signal` reads the exchange (inherited by the prototypes below it). */
const SIGNAL_INSTALLED = Symbol('bulwark.signal');

/** Where a `signal` assigned to a request object goes, once the accessor is in place. */
const ASSIGNED_SIGNAL: unique symbol = Symbol('bulwark.assignedSignal');

/** A `signal` the app assigned, and the guard whose request it was then (none: before any). */
interface AssignedSignal {
  readonly value: unknown;
  readonly under: Exchange | undefined;
}

type Holder = { [EXCHANGE_KEY]?: Exchange | null; [ASSIGNED_SIGNAL]?: AssignedSignal };

/**
 * How many more guarded requests look for an own `signal`. Once the accessor is installed,
 * assigning goes through its setter; but a request that a middleware gave a `signal` while
 * the first guarded request was on its way carries an own one, which hides the accessor.
 * Such requests can only be among the first after the install: the next thousand are
 * checked, and every one from the first such `signal` found on (an app whose middleware
 * assigns one before its guards). Any other request is spared the check (some 800
 * instructions on Koa's context).
 */
let ownSignalChecks = 0;
const OWN_SIGNAL_CHECKS_AFTER_INSTALL = 1000;
type Lookup = (holder: object) => Exchange | null | undefined;
type Prototype = object & { [SIGNAL_INSTALLED]?: true };

/**
 * Points a framework's request object (Koa `ctx`, Fastify `request`) at its exchange, so
 * that its `signal` reads `exchange.signal` (see `provideSignal`).
 *
 * @example exposeSignal(ctx, exchange); // ctx.signal aborts on timeout and client disconnect
 */
export function exposeSignal(holder: object, exchange: Exchange): void {
  (holder as Holder)[EXCHANGE] = exchange;
  // Koa's context and Fastify's request keep one shape, so the mark is read through the
  // object (it inherits it) at the cost of a cached load, where Object.getPrototypeOf goes
  // through V8's runtime (~120 instructions) unless TurboFan folds it.
  if ((holder as Prototype)[SIGNAL_INSTALLED] !== true) provideSignal(holder, exchangeOf);
  else if (ownSignalChecks > 0) moveOwnSignalAside(holder);
}

/**
 * Gives `holder` a `signal` that reads the exchange `lookup` finds for it. The accessor
 * lives on the object's prototype, defined there the first time a guarded request of that
 * prototype comes by: defining a property on every request object costs more than the
 * rest of the exchange. The framework's own `signal` (Fastify's) still answers for
 * requests without an exchange.
 *
 * @example provideSignal(req, (req) => req.res.locals[EXCHANGE_KEY]); // Express
 */
export function provideSignal(holder: object, lookup: Lookup): void {
  // The mark is read on the prototype, not through `holder`: Express gives its request a new
  // shape on every request, and a load through such an object misses V8's caches (some
  // 2,300 instructions a request, measured, against ~120 for Object.getPrototypeOf).
  const prototype = Object.getPrototypeOf(holder) as Prototype | null;
  if (prototype === null) return;
  if (prototype[SIGNAL_INSTALLED] !== true) {
    installSignal(prototype, lookup);
    ownSignalChecks = Math.max(ownSignalChecks, OWN_SIGNAL_CHECKS_AFTER_INSTALL);
  }
  if (ownSignalChecks > 0) moveOwnSignalAside(holder);
}

/** An own `signal` (assigned before the accessor was there) would hide it: keep it aside instead. */
function moveOwnSignalAside(holder: object): void {
  ownSignalChecks--;
  const own = Object.getOwnPropertyDescriptor(holder, 'signal');
  if (own === undefined) return;
  ownSignalChecks = Infinity;
  delete (holder as { signal?: unknown }).signal;
  (holder as Holder)[ASSIGNED_SIGNAL] = { value: own.get !== undefined ? own.get.call(holder) : own.value, under: undefined };
}

function installSignal(prototype: Prototype, lookup: Lookup): void {
  const inherited = findDescriptor(prototype, 'signal');
  const get = inherited?.get;
  const value: unknown = inherited?.value;
  Object.defineProperty(prototype, 'signal', {
    configurable: true,
    enumerable: false,
    // A `signal` the app assigns is read back where it was assigned: an unguarded request
    // reads it, and so does a guarded one that assigned it inside the guard (a handler's
    // `AbortSignal.any([ctx.signal, mine])`); one assigned before the guard took the request
    // (a middleware ahead of it) gives way to the guard's, which also aborts when the app's
    // would not.
    get(this: Holder): unknown {
      const exchange = lookup(this) ?? undefined;
      const assigned = this[ASSIGNED_SIGNAL];
      if (assigned !== undefined && assigned.under === exchange) return assigned.value;
      if (exchange !== undefined) return exchange.signal;
      if (assigned !== undefined) return assigned.value;
      return get !== undefined ? get.call(this) : value;
    },
    // Kept aside rather than as an own property, which would hide this accessor and cost
    // every guarded request a check for it.
    set(this: Holder, replacement: unknown): void {
      this[ASSIGNED_SIGNAL] = { value: replacement, under: lookup(this) ?? undefined };
    },
  });
  Object.defineProperty(prototype, SIGNAL_INSTALLED, { value: true });
}

/** The property descriptor `name` resolves to on `object` or its prototypes. */
export function findDescriptor(object: object, name: PropertyKey): PropertyDescriptor | undefined {
  for (let o: object | null = object; o !== null; o = Object.getPrototypeOf(o) as object | null) {
    const descriptor = Object.getOwnPropertyDescriptor(o, name);
    if (descriptor !== undefined) return descriptor;
  }
  return undefined;
}

/**
 * The exchange `exposeSignal` attached to a request object, if any.
 *
 * @example exchangeOf(request)?.caching; // in a Fastify onSend hook
 */
export function exchangeOf(this: void, holder: object): Exchange | undefined {
  return (holder as Holder)[EXCHANGE] ?? undefined;
}

/** What the guarded function resolves with when the handler's answer went out as it wrote it. */
const DONE: unique symbol = Symbol('bulwark.handled');

// Where the request stands. The handler's answer is decided once: it stands (COMMITTED),
// is held back as a failure (FAILED) until the guard knows whether a fallback replaces it,
// or the guard answers instead (GUARDED); a failure nothing replaced is RELEASED.
const WAITING = 0; // the policy has not run the handler (yet)
const RUNNING = 1; // the handler runs and has not answered
const FAILED = 2; // the handler failed; its answer (or error) is held
const COMMITTED = 3; // the handler's answer goes out as written
const GUARDED = 4; // the guard answers; the handler's writes are dropped
const RELEASED = 5; // the handler's failure stands, the framework answers it
type Phase = typeof WAITING | typeof RUNNING | typeof FAILED | typeof COMMITTED | typeof GUARDED | typeof RELEASED;

// The exchange's yes/no state, packed in `flags` (`has`, `mark`): one field rather than ten per request.
const FLAG = {
  /** Direct path: the policy's part of the call is over (ended, or ran out of time). */
  POLICY_DONE: 1,
  /** The failure was thrown (or passed on), not a failing status the handler answered with. */
  FAILURE_THROWN: 2,
  /** The failure counts as one for the policy (`isFailure`). */
  FAILURE_COUNTS: 4,
  /** The response is over: it ended (the last write went out) or it closed. */
  CLOSED: 8,
  /** The response closed before it ended: the client went away. */
  CLIENT_GONE: 16,
  /** The guard ended the connection itself. */
  DESTROYED_BY_GUARD: 32,
  /** The answer is decided (see `decision()`). */
  DECIDED: 64,
  /** The handler asked for its signal: it can act the moment a guard's scope aborts. */
  SIGNAL_READ: 128,
  /** Listening on the scope of a guard's call (`watchCall`). */
  WATCHING_CALL: 256,
  /** `decision()` rejects with the failure (`rethrowOnDecision`). */
  RETHROW: 512,
  /** Something hears the response end by itself (a `close` listener, Koa's watch). */
  HEARS_END: 1024,
} as const;
type Flag = (typeof FLAG)[keyof typeof FLAG];

/**
 * The per-request state machine shared by the adapters. An adapter either hands it a
 * `ResponseTarget`, or extends it and implements `ResponseTarget` itself (one object per
 * request instead of two).
 *
 * @example
 * // inside an adapter, per request:
 * const exchange = new Exchange(compiled, request, target);
 * exchange.run(() => next());           // the handler runs when the policy admits it
 * // the adapter reports: exchange.fail(error), exchange.respond(status), exchange.offer(…)
 */
export class Exchange implements SegmentOwner, SocketWatcher {
  /** The request's own call; its cancellation scope is made only when something needs one. */
  private root: RequestCall | undefined = undefined;
  readonly guard: HttpGuard;
  private readonly target: ResponseTarget;
  private described: HttpRequest | undefined;
  private call: Call | undefined = undefined;
  private phase: Phase = WAITING;
  /** One bit per `FLAG`. */
  private flags = 0;
  private starter: (() => void) | undefined = undefined;
  /**
   * Driving a fused segment without promises: the handler's end goes to the segment's
   * record (`finish`) instead of settling a promise. `handled` is the record (null when the
   * route has no guard to tell), undefined in the promise path.
   */
  private handled: FusedCall | null | undefined = undefined;
  private resolveRun: ((value: typeof DONE) => void) | undefined = undefined;
  private rejectRun: ((error: unknown) => void) | undefined = undefined;
  /** The handler's failure (what it threw, or a `FailedResponseError`). */
  private failure: unknown = undefined;
  /** A failing status the handler's answer went out with (counted when the response ends). */
  private failedStatus = 0;
  private decisionMade: Promise<void> | undefined = undefined;
  private resolveDecision: (() => void) | undefined = undefined;
  private rejectDecision: ((error: unknown) => void) | undefined = undefined;
  private key: string | undefined | null = null;
  /** The connection watched for the client going away (`watchSocket`), until the response is over. */
  private socket: WatchableSocket | undefined = undefined;

  /**
   * @param request the request as guards see it; leave it out when the target can `describe()` it
   * @param target what carries out the decisions; leave it out when a subclass implements `ResponseTarget`
   */
  constructor(guard: HttpGuard, request?: HttpRequest, target?: ResponseTarget) {
    this.guard = guard;
    this.described = request;
    this.target = target ?? (this as unknown as ResponseTarget);
  }

  private has(flag: Flag): boolean {
    return (this.flags & flag) !== 0;
  }

  private mark(flag: Flag, on = true): void {
    this.flags = on ? this.flags | flag : this.flags & ~flag;
  }

  /** The context handed through the policy (`{ request }` when a guard may read it); made by `run()`. */
  get context(): CallContext {
    return this.root?.context ?? EMPTY_CONTEXT;
  }

  /** Root of the request's cancellation: aborted when the client goes away. Made on first read. */
  get scope(): Scope {
    return (this.root ??= new RequestCall(EMPTY_CONTEXT, undefined)).scope;
  }

  /** The request as guards, `fallback` and `onReject` see it; described on first read. */
  get request(): HttpRequest {
    return (this.described ??= this.target.describe!());
  }

  /** The handler's signal: aborts on timeout and when the client goes away. Made on first read. */
  get signal(): AbortSignal {
    const call = this.call;
    this.mark(FLAG.SIGNAL_READ);
    if (call === undefined) return this.scope.signal;
    this.watchCall();
    return call.signal;
  }

  /** True while the handler runs and has not answered: its first write decides (`respond`). */
  get accepting(): boolean {
    return this.phase === RUNNING && !this.has(FLAG.CLOSED);
  }

  /** True once the guard took the response from the handler, or holds the handler's failure. */
  get superseded(): boolean {
    return this.phase === GUARDED || this.phase === FAILED;
  }

  /** True once the handler's failure was left to the framework (its error handling answers). */
  get released(): boolean {
    return this.phase === RELEASED;
  }

  /** True once the handler's own answer goes out as it wrote it. */
  get committedByHandler(): boolean {
    return this.phase === COMMITTED;
  }

  /** Whether the adapter should show the cache the handler's answer (`offer`). */
  get caching(): boolean {
    return this.guard.cache !== undefined && this.cacheKey() !== undefined;
  }

  /**
   * Runs the route through the policy. `start` (else the target's `start()`) runs the rest of
   * the route (the handler); it is called at most once, when the policy admits the call.
   */
  run(start?: () => void): void {
    this.starter = start;
    // Guards that never read the context never write it either (only rateLimit writes it,
    // and it reads the request): they share one frozen empty context.
    const context: CallContext = this.guard.exposesRequest ? { request: this.request } : EMPTY_CONTEXT;
    const raw = this.target.raw;
    this.listen(raw);
    if (this.socket === undefined) {
      const socket = raw.socket;
      // A response queued behind another on its connection never closes if the connection
      // dies first: only the socket tells.
      if (socket === null) {
        this.watchSocket(raw.req?.socket);
      } else if (socket?.destroyed === true) {
        // The client left before the guard ran (while a slow middleware ahead of it
        // worked): its close is past, so nothing would ever end this call. Nothing runs
        // and nothing counts.
        this.onClose();
        return;
      }
    }
    // A scope asked for before (an early read of `signal`) carries over.
    const call = (this.root = new RequestCall(context, this.root?.madeScope));
    const segment = this.guard.segment;
    let outcome: Promise<unknown>;
    try {
      if (segment === null) {
        this.startDirect(null, call);
        return;
      }
      if (segment !== undefined) {
        const started = segment.begin(call, this);
        if (started instanceof FusedCall) {
          this.startDirect(started, started.inner);
          return;
        }
        if (started instanceof Refusal) {
          this.policySettled(true, started.error);
          return;
        }
        outcome = started;
      } else {
        outcome = runPolicy(this.guard.policy, (admitted) => this.runDeferred(admitted), call);
      }
    } catch (error) {
      this.policySettled(true, error);
      return;
    }
    outcome.then(
      (value) => this.onResolved(value),
      (error: unknown) => this.onRejected(error),
    );
  }

  /** The timeout of the fused segment passed before the handler's part ended. */
  expired(error: unknown): void {
    this.mark(FLAG.POLICY_DONE);
    this.policySettled(true, error);
  }

  /**
   * Resolves when the answer is decided: the handler's stands, or the guard's is set (Koa
   * waits for it). Rejects with the handler's error when the target asked for it to be
   * rethrown (`rethrowOnDecision`).
   */
  decision(): Promise<void> {
    // Settled promises carry no state a caller could change: one resolved promise serves all.
    if (this.has(FLAG.DECIDED)) return this.has(FLAG.RETHROW) ? Promise.reject(this.failure) : RESOLVED;
    if (this.decisionMade === undefined) {
      // An arrow at `new Promise` is inlined with the constructor: no closure is made.
      this.decisionMade = new Promise<void>((resolve, reject) => {
        this.resolveDecision = resolve;
        this.rejectDecision = reject;
      });
    }
    return this.decisionMade;
  }

  /** The handler threw, rejected, or passed an error on. */
  fail(error: unknown): void {
    if (this.phase === RUNNING && !this.target.raw.headersSent) {
      this.phase = FAILED;
      this.failure = error;
      this.mark(FLAG.FAILURE_THROWN);
      this.mark(FLAG.FAILURE_COUNTS, this.guard.failed(errorStatus(error), error));
      if (this.has(FLAG.FAILURE_COUNTS)) this.rejectHandler(error);
      else this.resolveHandler();
      return;
    }
    const started = this.phase === COMMITTED || this.phase === RUNNING;
    if (started && !this.target.raw.writableEnded && !this.has(FLAG.CLOSED)) {
      // An answer broken off halfway can be neither finished nor replaced: end the connection.
      this.failure = error;
      this.mark(FLAG.FAILURE_COUNTS, this.guard.failed(errorStatus(error), error));
      this.destroyConnection();
    }
    // Otherwise it comes after the answer was decided: ignored, by design.
  }

  /**
   * The handler starts its answer with `status`. Returns true when the adapter must hold
   * that answer back (it is a failure and a fallback or the cache may replace it).
   */
  respond(status: number): boolean {
    if (this.phase !== RUNNING) return false;
    const failed = this.guard.failed(status, undefined);
    if (failed && this.guard.degradable) {
      this.phase = FAILED;
      this.failure = withoutStack(() => new FailedResponseError(status));
      this.mark(FLAG.FAILURE_THROWN, false);
      this.mark(FLAG.FAILURE_COUNTS);
      this.rejectHandler(this.failure);
      return true;
    }
    this.phase = COMMITTED;
    if (failed) this.failedStatus = status;
    this.markDecided();
    return false;
  }

  /**
   * The answer `respond()` let stand never went out: the framework's write threw before the
   * headers did (Fastify's `send` refusing a payload). Its failure comes next (`fail`).
   */
  protected uncommit(): void {
    if (this.phase !== COMMITTED || this.target.raw.headersSent) return;
    this.phase = RUNNING;
    this.failedStatus = 0;
  }

  /** Shows the cache a complete answer of the handler; it keeps what it may. */
  offer(status: number, body: string | Uint8Array, header: HeaderReader): void {
    const cache = this.guard.cache;
    const key = this.cacheKey();
    if (cache !== undefined && key !== undefined) cache.offer(key, status, body, header);
  }

  /** For a target whose `release(error, true)` hands the error back to the framework through `decision()` (Koa). */
  protected rethrowOnDecision(): void {
    this.mark(FLAG.RETHROW);
  }

  private cacheKey(): string | undefined {
    if (this.key === null) this.key = this.guard.cache?.keyFor(this.request);
    return this.key;
  }

  private committed(): boolean {
    return this.phase === COMMITTED || this.phase === RELEASED || (this.phase === RUNNING && this.target.raw.headersSent);
  }

  /** Runs the handler for a policy that admitted the call in its own time; settles when the handler's part ends. */
  runDeferred(call: Call): Promise<typeof DONE> {
    if (this.phase !== WAITING) return Promise.reject(new TypeError('bulwark: a route handler cannot run twice'));
    if (this.has(FLAG.CLIENT_GONE)) return Promise.reject(this.scope.reason);
    const settled = new Promise<typeof DONE>((resolve, reject) => {
      this.resolveRun = resolve;
      this.rejectRun = reject;
    });
    this.startHandler(call);
    return settled;
  }

  /** The policy admitted the call at once: the handler runs, and its end goes to `handled`. */
  private startDirect(handled: FusedCall | null, call: Call): void {
    this.handled = handled;
    this.startHandler(call);
  }

  private startHandler(call: Call): void {
    this.call = call;
    this.phase = RUNNING;
    // Whatever throws from here on is the handler's failure, so that the guards that
    // admitted the call always hear how it ended.
    try {
      if (this.has(FLAG.SIGNAL_READ)) this.watchCall();
      const rateLimit = this.context.rateLimit;
      if (rateLimit !== undefined) this.target.setHeaders(rateLimitHeaders(rateLimit));
      if (this.starter !== undefined) this.starter();
      else this.target.start!();
    } catch (error) {
      this.fail(error);
    }
  }

  /** The handler's part of the call is still open (its outcome not yet handed to the policy). */
  private get handlerOpen(): boolean {
    return this.handled === undefined ? this.rejectRun !== undefined : this.phase !== WAITING && !this.has(FLAG.POLICY_DONE);
  }

  /**
   * The policy's part ended without a promise to tell (a refusal at once, or the direct
   * path): `rejected` with `outcome`. The common case, a handler whose answer stands, is
   * settled here and now; anything that needs the guard to answer waits for a microtask,
   * as it would behind a promise, so that an adapter reporting from inside the handler's
   * write finishes that write first.
   */
  private policySettled(rejected: boolean, outcome: unknown): void {
    if (!rejected && this.answerStands) {
      this.markDecided();
      return;
    }
    // A promise rather than queueMicrotask, which fake timers (sinon's) take over.
    void RESOLVED.then(() => this.conclude(rejected, outcome));
  }

  /**
   * A guard's own scope (a timeout's): when it aborts, the guard answers in place of the
   * handler, so the handler's writes must stop at that very moment, not a tick later. Only
   * a handler that holds the signal can write at that moment (an abort listener); any
   * other write comes after the policy's rejection has reached `conclude`.
   */
  private watchCall(): void {
    if (this.has(FLAG.WATCHING_CALL)) return;
    // Not the request's own scope, which only the client going away aborts (`onClose`).
    const call = this.call;
    const scope = call === this.root ? undefined : call?.scope;
    if (scope === undefined || scope === this.root?.madeScope) return;
    this.mark(FLAG.WATCHING_CALL);
    scope.onAbort((reason) => this.onCallAbort(reason));
  }

  private resolveHandler(): void {
    this.endHandler(DONE, false);
  }

  private rejectHandler(error: unknown): void {
    this.endHandler(error, true);
  }

  /** The handler's part of the call ended: tell the policy, once, by the path it took. */
  private endHandler(outcome: unknown, failed: boolean): void {
    if (this.handled === undefined) {
      const settle = failed ? this.rejectRun : this.resolveRun;
      this.resolveRun = this.rejectRun = undefined;
      settle?.(outcome as typeof DONE);
      return;
    }
    if (this.has(FLAG.POLICY_DONE)) return;
    this.mark(FLAG.POLICY_DONE);
    this.handled?.finish(outcome, failed);
    this.policySettled(failed, outcome);
  }

  private onCallAbort(reason: unknown): void {
    if (!isGuardRejection(reason) || this.has(FLAG.CLOSED)) return;
    if (this.phase === RUNNING && !this.target.raw.headersSent) {
      this.phase = GUARDED;
      this.target.takeOver();
    } else if (this.committed() && !this.target.raw.writableEnded) {
      // A timeout covers the whole answer; once it started, it cannot be changed.
      this.destroyConnection();
    }
  }

  private destroyConnection(): void {
    this.mark(FLAG.DESTROYED_BY_GUARD);
    this.target.raw.destroy();
  }

  /**
   * Arranges for `onClose()` to run once the response is over: by default a `close`
   * listener on it. An adapter with a cheaper way overrides this: Koa joins the watch Koa
   * already keeps (`markEndHeard`); Fastify, and Express around a wrapped handler, watch the
   * connection (`watchConnection`) and call `checkpoint()` where the response may have ended.
   */
  protected listen(raw: RawResponse): void {
    this.hearEnd(raw);
  }

  /**
   * Hears the client go away through the response's connection, one listener per
   * connection, for an adapter that calls `checkpoint()` wherever the response may end.
   * Only an HTTP/1 `ServerResponse` has a connection of its own: over HTTP/2 a client
   * cancels one stream and the connection stays, so that response, and one queued behind
   * another (no socket yet), is listened to instead.
   */
  protected watchConnection(raw: RawResponse): void {
    // Read once: on Express's reshaped response every read misses V8's caches (~1k instructions).
    if (raw instanceof ServerResponse && this.watchSocket(raw.socket)) return;
    this.hearEnd(raw);
  }

  /** The response's `close` calls `onClose()`. */
  private hearEnd(raw: RawResponse): void {
    this.mark(FLAG.HEARS_END);
    // A bound method rather than an arrow function: no closure context, and no run through
    // V8's lazy-compile stub, on every request.
    listenClose(raw, this.onClose.bind(this));
  }

  /** For an adapter that hears the response end its own way, which calls `onClose()`. */
  protected markEndHeard(): void {
    this.mark(FLAG.HEARS_END);
  }

  /**
   * Hears of the client going away through `socket`, one listener per connection, until
   * the response is over. False when the socket is closed already (or missing).
   */
  private watchSocket(socket: WatchableSocket | null | undefined): boolean {
    if (socket === null || socket === undefined || !watchSocket(socket, this)) return false;
    this.socket = socket;
    return true;
  }

  /** @internal The watched socket closed. */
  socketClosed(): void {
    if (this.socket === undefined) return;
    this.socket = undefined;
    this.onClose();
  }

  /**
   * @internal Something that may have ended the response returned: a send, the handler, a
   * takeover of the raw response (Fastify's `hijack`). With only the socket watched, nothing
   * would hear the end: a response that ended is over now; one that goes on (a stream, a
   * handler that answers later) is listened to from here on.
   */
  checkpoint(): void {
    if (this.has(FLAG.HEARS_END) || this.socket === undefined) return;
    const raw = this.target.raw;
    if (ended(raw)) this.over(true);
    else this.hearEnd(raw);
  }

  /** The response is over: it ended, or the connection went away first. Once only. */
  protected onClose(): void {
    this.over(ended(this.target.raw));
  }

  /** `onClose()`, told whether the response had ended (a checkpoint has just read it). */
  private over(answered: boolean): void {
    if (this.has(FLAG.CLOSED)) return;
    this.mark(FLAG.CLOSED);
    if (this.socket !== undefined) {
      unwatchSocket(this.socket, this);
      this.socket = undefined;
    }
    if (!answered && !this.has(FLAG.DESTROYED_BY_GUARD)) {
      this.mark(FLAG.CLIENT_GONE);
      const gone = withoutStack(() => new ClientDisconnectedError());
      // Abort first: a queued call leaves its queue, and breakers see why the call ended.
      this.scope.abort(gone);
      this.rejectHandler(gone);
      this.markDecided();
      return;
    }
    this.markDecided();
    if (!this.handlerOpen) return;
    // The response is over: the handler's part of the call ends here (a streamed answer
    // held its permit until now).
    const call = this.call;
    const raw = this.target.raw;
    if (call !== undefined && call.aborted) this.rejectHandler(call.abortReason);
    else if (this.failure !== undefined && this.has(FLAG.FAILURE_COUNTS)) this.rejectHandler(this.failure);
    else if (this.failedStatus !== 0) this.rejectHandler(withoutStack(() => new FailedResponseError(this.failedStatus)));
    else if (this.phase === RUNNING && this.guard.failed(raw.statusCode, undefined)) this.rejectHandler(withoutStack(() => new FailedResponseError(raw.statusCode)));
    else this.resolveHandler();
  }

  private onResolved(value: unknown): void {
    if (this.answerStands) this.markDecided();
    else void this.conclude(false, value);
  }

  /** The common case: the handler answered (or still answers) and its answer stands; nothing is left to do. */
  private get answerStands(): boolean {
    return (this.phase === COMMITTED || this.phase === RUNNING) && !this.has(FLAG.CLIENT_GONE);
  }

  private onRejected(error: unknown): void {
    void this.conclude(true, error);
  }

  /** The policy settled: decide what the client gets, unless the handler's answer stands. */
  private async conclude(rejected: boolean, outcome: unknown): Promise<void> {
    try {
      if (this.has(FLAG.CLIENT_GONE)) return;
      const phase = this.phase;
      if (phase === GUARDED) {
        // Taken from the handler when a guard's scope aborted with a rejection (a timeout).
        if (!rejected && outcome !== DONE) await this.answerDegraded(outcome, this.abortReason());
        else await this.answerRejection(isGuardRejection(outcome) ? outcome : (this.call?.scope?.reason as GuardRejection));
      } else if (rejected && isGuardRejection(outcome) && !this.committed()) {
        await this.answerRejection(outcome);
      } else if (phase === FAILED) {
        if (!rejected && outcome !== DONE) await this.answerDegraded(outcome, 'error');
        else await this.answerFailure();
      } else if (this.committed()) {
        // The handler's answer stands; a rejection that came while it streamed ends it.
        if (rejected && isGuardRejection(outcome) && !this.target.raw.writableEnded && !this.has(FLAG.CLOSED)) this.destroyConnection();
      } else if (phase === WAITING) {
        if (rejected) {
          // Not a rejection: a policy's own error. A failed route, and no detail reaches the client.
          this.failure = outcome;
          this.mark(FLAG.FAILURE_THROWN);
          this.mark(FLAG.FAILURE_COUNTS);
          await this.answerFailure();
        } else if (outcome !== DONE) {
          // A `fallback()` inside the policy answered: serve its value like the adapter's fallback.
          await this.answerDegraded(outcome, 'error');
        }
      }
      // RUNNING, with anything but a rejection: the handler still answers, and that stands.
    } catch {
      // Writing the answer failed (the framework threw): the connection cannot be trusted.
      if (!this.target.raw.writableEnded && !this.has(FLAG.CLOSED)) this.destroyConnection();
    } finally {
      this.markDecided();
      this.stopHandler(rejected ? outcome : undefined);
    }
  }

  private abortReason(): AnswerReason {
    const reason = this.call?.scope?.reason;
    return isGuardRejection(reason) ? reason.reason : 'error';
  }

  private async answerRejection(rejection: GuardRejection): Promise<void> {
    this.takeOverResponse();
    if (this.guard.plainRejections) {
      // Nothing to ask, nothing to await: the default answer, and no request description.
      this.deliver(rejectionAnswer(rejection, this.guard.timeoutStatus, this.context.rateLimit));
      return;
    }
    const ctx: FallbackContext = { reason: rejection.reason, error: rejection, request: this.request };
    // Rate limiting is the client's problem, not a degraded service: never replaced.
    const answer = (rejection.reason === 'rate_limited' ? undefined : await this.degrade(ctx)) ?? (await this.guard.rejectionAnswer(ctx, rejection, this.context.rateLimit));
    this.deliver(answer);
  }

  private async answerFailure(): Promise<void> {
    if (this.has(FLAG.FAILURE_COUNTS)) {
      const answer = await this.degrade({ reason: 'error', error: this.failure, request: this.request });
      if (answer !== undefined) {
        this.takeOverResponse();
        this.deliver(answer);
        return;
      }
    }
    if (this.has(FLAG.CLIENT_GONE)) return;
    this.phase = RELEASED;
    this.target.release(this.failure, this.has(FLAG.FAILURE_THROWN));
    this.checkpoint();
  }

  private async answerDegraded(data: unknown, reason: AnswerReason): Promise<void> {
    this.takeOverResponse();
    this.deliver(degradedAnswer(data, 'fallback', reason, this.context.rateLimit));
  }

  /** The cache's answer, else the fallback's; undefined when neither can answer. */
  private async degrade(ctx: FallbackContext): Promise<HttpAnswer | undefined> {
    const rateLimit = this.context.rateLimit;
    const key = this.cacheKey();
    if (key !== undefined) {
      const hit = this.guard.cache?.lookup(key);
      if (hit !== undefined && hit.found) return degradedAnswer(hit.data, 'cache', ctx.reason, rateLimit);
    }
    if (!this.guard.hasFallback) return undefined;
    try {
      return degradedAnswer(await this.guard.fallbackData(ctx), 'fallback', ctx.reason, rateLimit);
    } catch {
      // A fallback that throws leaves the rejection (or the failure) standing, detail-free.
      return undefined;
    }
  }

  private takeOverResponse(): void {
    if (this.phase === GUARDED) return;
    const wasRunning = this.phase === RUNNING || this.phase === FAILED;
    this.phase = GUARDED;
    if (wasRunning) this.target.takeOver();
  }

  private deliver(answer: HttpAnswer): void {
    if (this.has(FLAG.CLIENT_GONE)) return;
    const raw = this.target.raw;
    if (raw.headersSent) {
      if (!raw.writableEnded && !this.has(FLAG.CLOSED)) this.destroyConnection();
      return;
    }
    this.target.send(answer);
    this.checkpoint();
  }

  /** The guard answered for a handler that may still be working: tell it to stop. */
  private stopHandler(rejection: unknown): void {
    const scope = this.call?.scope;
    if (scope === undefined || scope.aborted) return;
    if (this.phase === GUARDED) scope.abort(rejection ?? this.failure);
    else if (this.phase === RELEASED && this.has(FLAG.FAILURE_COUNTS)) scope.abort(this.failure);
  }

  private markDecided(): void {
    if (this.has(FLAG.DECIDED)) return;
    this.mark(FLAG.DECIDED);
    const resolve = this.resolveDecision;
    if (resolve === undefined) return;
    const reject = this.rejectDecision!;
    this.resolveDecision = this.rejectDecision = undefined;
    if (this.has(FLAG.RETHROW)) reject(this.failure);
    else resolve();
  }
}

/**
 * The call a request starts with. Its cancellation scope (aborted when the client goes
 * away) is made on first use: most requests end without anything asking for one.
 */
class RequestCall extends Call {
  constructor(context: CallContext, scope: Scope | undefined) {
    super(scope, 1, context);
  }

  override get scope(): Scope {
    return (this.cancellation ??= new Scope());
  }

  /** The scope, if something made it. */
  get madeScope(): Scope | undefined {
    return this.cancellation;
  }
}

const on = EventEmitter.prototype.on;

/**
 * `raw.on('close', listener)`, taking `on` from EventEmitter itself when the response is
 * one: a response whose shape V8 cannot cache (Express's) would otherwise pay a lookup
 * through its whole prototype chain for `on`.
 */
function listenClose(raw: RawResponse, listener: () => void): void {
  if (raw instanceof EventEmitter) on.call(raw, 'close', listener);
  else raw.on('close', listener);
}

const RESOLVED = Promise.resolve();

/** The context of an exchange that has not run, and of routes whose guards never use one. */
const EMPTY_CONTEXT: CallContext = Object.freeze({});

