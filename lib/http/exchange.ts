// One request through a guarded route: runs the handler under the policy, listens to what
// the handler and the connection do, and decides the single answer the client gets. The
// adapters report events (the handler threw, the handler is answering with this status)
// and carry out the decisions (send this answer, let that failure stand) on their framework.

import { Scope } from '../cancellation.js';
import { ClientDisconnectedError, isGuardRejection, withoutStack, type GuardRejection } from '../errors.js';
import { Call, runPolicy, type CallContext } from '../policy.js';
import { degradedAnswer, rateLimitHeaders, type AnswerReason, type HttpAnswer } from './answers.js';
import type { HeaderReader, HttpRequest } from './cache.js';
import { errorStatus, type FallbackContext, type HttpGuard } from './options.js';

/** The part of Node's `ServerResponse` the exchange watches. */
export interface RawResponse {
  readonly headersSent: boolean;
  readonly writableEnded: boolean;
  readonly statusCode: number;
  on(event: 'close', listener: () => void): unknown;
  destroy(error?: Error): unknown;
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

const EXCHANGE = Symbol('bulwark.exchange');

// One accessor for every request (never a closure per request): the framework's request
// object points at its exchange, and `signal` reads the exchange's lazily made signal.
// Assigning `signal` (a middleware of the app's own) replaces it with a plain value.
const SIGNAL_PROPERTY: PropertyDescriptor = {
  configurable: true,
  enumerable: true,
  get(this: { [EXCHANGE]?: Exchange }): AbortSignal | undefined {
    return this[EXCHANGE]?.signal;
  },
  set(this: object, value: unknown): void {
    Object.defineProperty(this, 'signal', { value, writable: true, configurable: true, enumerable: true });
  },
};

/**
 * Gives a framework's request object (Express `req`, Koa `ctx`, Fastify `request`) a
 * `signal` property that reads `exchange.signal`, shadowing any the framework has.
 *
 * @example exposeSignal(req, exchange); // req.signal aborts on timeout and client disconnect
 */
export function exposeSignal(holder: object, exchange: Exchange): void {
  (holder as { [EXCHANGE]?: Exchange })[EXCHANGE] = exchange;
  Object.defineProperty(holder, 'signal', SIGNAL_PROPERTY);
}

/**
 * The exchange `exposeSignal` attached to a request object, if any.
 *
 * @example exchangeOf(request)?.caching; // in a Fastify onSend hook
 */
export function exchangeOf(holder: object): Exchange | undefined {
  return (holder as { [EXCHANGE]?: Exchange })[EXCHANGE];
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

/**
 * The per-request state machine shared by the adapters.
 *
 * @example
 * // inside an adapter, per request:
 * const exchange = new Exchange(compiled, request, target);
 * exchange.run(() => next());           // the handler runs when the policy admits it
 * // the adapter reports: exchange.fail(error), exchange.respond(status), exchange.offer(…)
 */
export class Exchange {
  /** Root of the request's cancellation: aborted when the client goes away. */
  readonly scope = new Scope();
  readonly context: CallContext;
  private call: Call | undefined = undefined;
  private phase: Phase = WAITING;
  private start: (() => void) | undefined = undefined;
  private resolveRun: ((value: typeof DONE) => void) | undefined = undefined;
  private rejectRun: ((error: unknown) => void) | undefined = undefined;
  /** The handler's failure (what it threw, or a `FailedResponseError`). */
  private failure: unknown = undefined;
  private failureThrown = false;
  private failureCounts = false;
  /** A failing status the handler's answer went out with (counted when the response ends). */
  private failedStatus = 0;
  private closed = false;
  private clientGone = false;
  private destroyedByGuard = false;
  private decided = false;
  private onDecided: (() => void) | undefined = undefined;
  private key: string | undefined | null = null;

  constructor(
    readonly guard: HttpGuard,
    readonly request: HttpRequest,
    private readonly target: ResponseTarget,
  ) {
    this.context = { request };
  }

  /** The handler's signal: aborts on timeout and when the client goes away. Made on first read. */
  get signal(): AbortSignal {
    return this.call === undefined ? this.scope.signal : this.call.signal;
  }

  /** True while the handler runs and has not answered: its first write decides (`respond`). */
  get accepting(): boolean {
    return this.phase === RUNNING && !this.closed;
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
   * Runs the route through the policy. `start` runs the rest of the route (the handler); it
   * is called at most once, when the policy admits the call.
   */
  run(start: () => void): void {
    this.start = start;
    this.target.raw.on('close', this.onClose);
    let outcome: Promise<unknown>;
    try {
      outcome = runPolicy(this.guard.policy, this.runHandler, new Call(this.scope, 1, this.context));
    } catch (error) {
      outcome = Promise.reject(error);
    }
    outcome.then(this.onResolved, this.onRejected);
  }

  /** Resolves when the answer is decided: the handler's stands, or the guard's is set (Koa waits for it). */
  decision(): Promise<void> {
    if (this.decided) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.onDecided = resolve;
    });
  }

  /** The handler threw, rejected, or passed an error on. */
  fail(error: unknown): void {
    if (this.phase === RUNNING && !this.target.raw.headersSent) {
      this.phase = FAILED;
      this.failure = error;
      this.failureThrown = true;
      this.failureCounts = this.guard.failed(errorStatus(error), error);
      if (this.failureCounts) this.rejectHandler(error);
      else this.resolveHandler();
      return;
    }
    const started = this.phase === COMMITTED || this.phase === RUNNING;
    if (started && !this.target.raw.writableEnded && !this.closed) {
      // An answer broken off halfway can be neither finished nor replaced: end the connection.
      this.failure = error;
      this.failureCounts = this.guard.failed(errorStatus(error), error);
      this.destroy();
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
      this.failureThrown = false;
      this.failureCounts = true;
      this.rejectHandler(this.failure);
      return true;
    }
    this.phase = COMMITTED;
    if (failed) this.failedStatus = status;
    this.markDecided();
    return false;
  }

  /** Shows the cache a complete answer of the handler; it keeps what it may. */
  offer(status: number, body: string | Uint8Array, header: HeaderReader): void {
    const cache = this.guard.cache;
    const key = this.cacheKey();
    if (cache !== undefined && key !== undefined) cache.offer(key, status, body, header);
  }

  private cacheKey(): string | undefined {
    if (this.key === null) this.key = this.guard.cache?.keyFor(this.request);
    return this.key;
  }

  private committed(): boolean {
    return this.phase === COMMITTED || this.phase === RELEASED || (this.phase === RUNNING && this.target.raw.headersSent);
  }

  private readonly runHandler = (call: Call): Promise<typeof DONE> => {
    if (this.phase !== WAITING) return Promise.reject(new TypeError('bulwark: a route handler cannot run twice'));
    if (this.clientGone) return Promise.reject(this.scope.reason);
    this.call = call;
    const scope = call.scope;
    // A guard's own scope (a timeout's): when it aborts, the guard answers in place of the
    // handler, so the handler's writes must stop at that very moment, not a tick later.
    if (scope !== undefined && scope !== this.scope) scope.onAbort(this.onCallAbort);
    const rateLimit = this.context.rateLimit;
    if (rateLimit !== undefined) this.target.setHeaders(rateLimitHeaders(rateLimit));
    this.phase = RUNNING;
    const settled = new Promise<typeof DONE>((resolve, reject) => {
      this.resolveRun = resolve;
      this.rejectRun = reject;
    });
    try {
      this.start?.();
    } catch (error) {
      this.fail(error);
    }
    return settled;
  };

  private resolveHandler(): void {
    const resolve = this.resolveRun;
    this.resolveRun = this.rejectRun = undefined;
    resolve?.(DONE);
  }

  private rejectHandler(error: unknown): void {
    const reject = this.rejectRun;
    this.resolveRun = this.rejectRun = undefined;
    reject?.(error);
  }

  private readonly onCallAbort = (reason: unknown): void => {
    if (!isGuardRejection(reason) || this.closed) return;
    if (this.phase === RUNNING && !this.target.raw.headersSent) {
      this.phase = GUARDED;
      this.target.takeOver();
    } else if (this.committed() && !this.target.raw.writableEnded) {
      // A timeout covers the whole answer; once it started, it cannot be changed.
      this.destroy();
    }
  };

  private destroy(): void {
    this.destroyedByGuard = true;
    this.target.raw.destroy();
  }

  private readonly onClose = (): void => {
    this.closed = true;
    const raw = this.target.raw;
    if (!raw.writableEnded && !this.destroyedByGuard) {
      this.clientGone = true;
      const gone = withoutStack(() => new ClientDisconnectedError());
      // Abort first: a queued call leaves its queue, and breakers see why the call ended.
      this.scope.abort(gone);
      this.rejectHandler(gone);
      this.markDecided();
      return;
    }
    this.markDecided();
    if (this.rejectRun === undefined) return;
    // The response is over: the handler's part of the call ends here (a streamed answer
    // held its permit until now).
    const scope = this.call?.scope;
    if (scope !== undefined && scope.aborted) this.rejectHandler(scope.reason);
    else if (this.failure !== undefined && this.failureCounts) this.rejectHandler(this.failure);
    else if (this.failedStatus !== 0) this.rejectHandler(withoutStack(() => new FailedResponseError(this.failedStatus)));
    else if (this.phase === RUNNING && this.guard.failed(raw.statusCode, undefined)) this.rejectHandler(withoutStack(() => new FailedResponseError(raw.statusCode)));
    else this.resolveHandler();
  };

  private readonly onResolved = (value: unknown): Promise<void> => this.conclude(false, value);
  private readonly onRejected = (error: unknown): Promise<void> => this.conclude(true, error);

  /** The policy settled: decide what the client gets, unless the handler's answer stands. */
  private async conclude(rejected: boolean, outcome: unknown): Promise<void> {
    try {
      if (this.clientGone) return;
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
        if (rejected && isGuardRejection(outcome) && !this.target.raw.writableEnded && !this.closed) this.destroy();
      } else if (phase === WAITING) {
        if (rejected) {
          // Not a rejection: a policy's own error. A failed route, and no detail reaches the client.
          this.failure = outcome;
          this.failureThrown = true;
          this.failureCounts = true;
          await this.answerFailure();
        } else if (outcome !== DONE) {
          // A `fallback()` inside the policy answered: serve its value like the adapter's fallback.
          await this.answerDegraded(outcome, 'error');
        }
      }
      // RUNNING, with anything but a rejection: the handler still answers, and that stands.
    } catch {
      // Writing the answer failed (the framework threw): the connection cannot be trusted.
      if (!this.target.raw.writableEnded && !this.closed) this.destroy();
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
    this.takeOver();
    const ctx: FallbackContext = { reason: rejection.reason, error: rejection, request: this.request };
    // Rate limiting is the client's problem, not a degraded service: never replaced.
    const answer = (rejection.reason === 'rate_limited' ? undefined : await this.degrade(ctx)) ?? (await this.guard.rejectionAnswer(ctx, rejection, this.context.rateLimit));
    this.send(answer);
  }

  private async answerFailure(): Promise<void> {
    if (this.failureCounts) {
      const answer = await this.degrade({ reason: 'error', error: this.failure, request: this.request });
      if (answer !== undefined) {
        this.takeOver();
        this.send(answer);
        return;
      }
    }
    if (this.clientGone) return;
    this.phase = RELEASED;
    this.target.release(this.failure, this.failureThrown);
  }

  private async answerDegraded(data: unknown, reason: AnswerReason): Promise<void> {
    this.takeOver();
    this.send(degradedAnswer(data, 'fallback', reason, this.context.rateLimit));
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

  private takeOver(): void {
    if (this.phase === GUARDED) return;
    const wasRunning = this.phase === RUNNING || this.phase === FAILED;
    this.phase = GUARDED;
    if (wasRunning) this.target.takeOver();
  }

  private send(answer: HttpAnswer): void {
    if (this.clientGone) return;
    const raw = this.target.raw;
    if (raw.headersSent) {
      if (!raw.writableEnded && !this.closed) this.destroy();
      return;
    }
    this.target.send(answer);
  }

  /** The guard answered for a handler that may still be working: tell it to stop. */
  private stopHandler(rejection: unknown): void {
    const scope = this.call?.scope;
    if (scope === undefined || scope.aborted) return;
    if (this.phase === GUARDED) scope.abort(rejection ?? this.failure);
    else if (this.phase === RELEASED && this.failureCounts) scope.abort(this.failure);
  }

  private markDecided(): void {
    if (this.decided) return;
    this.decided = true;
    const resolve = this.onDecided;
    this.onDecided = undefined;
    resolve?.();
  }
}
