// Koa 3 route guard. The HTTP behaviour lives in lib/http; this file only translates Koa:
// `await next()`, and a context that Koa writes out once the middleware promise settles.

import type { Context, DefaultContext, DefaultState, Middleware, Next } from 'koa';
import { Exchange, exposeSignal, findDescriptor, httpGuard, httpRequest, REPRESENTATION_HEADERS, type GuardOptions, type HttpAnswer, type HttpGuard, type HttpRequest, type RawResponse, type ResponseTarget } from '../lib/http.js';
import { healthResponse } from '../lib/health.js';
import { policyList, type Policies } from '../lib/observe.js';
import { isThenable, observe, type Observer } from '../lib/settlers.js';
import type { Policy } from '../lib/policy.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';
export type { Policies } from '../lib/observe.js';

declare module 'koa' {
  interface ExtendableContext {
    /** Aborts when the guard's timeout fires or the client goes away (guarded routes only). */
    signal: AbortSignal;
  }
}

/** Marks a `guard()` middleware, which fuses with the middleware after it. */
const FUSES = Symbol('bulwark.koa.fuses');

/**
 * Guards a Koa route: the middleware after it runs through `policy`; a rejection or a
 * failure becomes the answer of the HTTP contract (503/429, or a degraded 200 with
 * `fallback`/`cache`). Downstream reads its `AbortSignal` as `ctx.signal`.
 *
 * @example
 * const policy = pipeline(bulkhead({ limit: 20 }), timeout(2000), circuitBreaker({ name: 'catalog' }));
 * router.get('/products/:id', guard(policy, { fallback: { items: [] } }), async (ctx) => {
 *   ctx.body = await catalog.get(ctx.params.id, { signal: ctx.signal });
 * });
 * // The same, with the handler inside the guard rather than after it. On @koa/router the
 * // form above becomes this one at the route's first request (see `KoaGuard.wrap`):
 * router.get('/products/:id', guard(policy, { fallback: { items: [] } }).wrap(async (ctx) => {
 *   ctx.body = await catalog.get(ctx.params.id, { signal: ctx.signal });
 * }));
 */
export function guard(policy: Policy, options?: GuardOptions): KoaGuard {
  const compiled = httpGuard('koa guard', policy, options);
  const around = (handler: Middleware): Middleware =>
    function bulwarkGuarded(ctx: Context, next: Next): Promise<void> {
      return runGuarded(new KoaExchange(compiled, ctx, next, handler));
    };
  // The router layers this guard has looked at, fused or found unfusable.
  const examined = new WeakSet<object>();
  const middleware = function bulwarkGuard(ctx: Context, next: Next): Promise<void> {
    fuseInto((ctx as RoutedContext).matched, middleware, around, examined);
    return runGuarded(new KoaExchange(compiled, ctx, next, undefined));
  };
  return Object.assign(middleware, {
    [FUSES]: true as const,
    wrap<StateT = DefaultState, ContextT = DefaultContext, BodyT = unknown>(handler: Middleware<StateT, ContextT, BodyT>): Middleware<StateT, ContextT, BodyT> {
      if (typeof handler !== 'function') throw new TypeError(`koa guard: wrap(handler) takes a middleware function, got ${typeof handler}`);
      return around(handler as Middleware) as Middleware<StateT, ContextT, BodyT>;
    },
  });
}

/** A context that @koa/router routed: the layers that matched its path. */
interface RoutedContext {
  matched?: unknown;
}

/**
 * On @koa/router, replaces `guard, handler` in each matched route layer's stack with
 * `guard.wrap(handler)`, which behaves the same (the handler gets `ctx` and the route's
 * `next`, inside the guard) and spares the router a step of its chain on every later
 * request. The router copies a layer's stack into each request's chain, so requests
 * already on their way keep theirs. A guard that is its layer's last middleware, or one
 * mounted with `app.use`, stays as it is.
 */
function fuseInto(matched: unknown, self: Middleware, around: (handler: Middleware) => Middleware, examined: WeakSet<object>): void {
  if (!Array.isArray(matched)) return;
  for (const layer of matched as unknown[]) {
    if (typeof layer !== 'object' || layer === null || examined.has(layer)) continue;
    const stack = (layer as { stack?: unknown }).stack;
    if (!Array.isArray(stack)) continue;
    let waiting = false;
    for (let i = stack.indexOf(self); i >= 0 && i < stack.length - 1; i = stack.indexOf(self, i + 1)) {
      const handler: unknown = stack[i + 1];
      if (typeof handler !== 'function') continue;
      // A guard right behind this one fuses with its handler first: this one then wraps both.
      // One that ends the stack never fuses: this one wraps it as it is.
      if ((handler as { [FUSES]?: true })[FUSES] === true && i + 2 < stack.length) {
        waiting = true;
        continue;
      }
      stack.splice(i, 2, around(handler as Middleware));
    }
    if (!waiting) examined.add(layer);
  }
}

/**
 * A Koa route guard (`guard()`): a middleware that runs the rest of the route through the
 * policy, or, through `wrap(handler)`, one that runs `handler` itself.
 */
export interface KoaGuard extends Middleware {
  /**
   * The guard with `handler` inside it: one middleware instead of two, which spares Koa's
   * router a step of its chain on every request (2,000–3,500 CPU instructions). `handler`
   * gets `ctx` (with `ctx.signal`) and the route's `next`, as it would after `guard()`.
   * On @koa/router, `guard(), handler` turns into this on the route's first request;
   * written out, it also saves that step where the guard cannot fuse (another router).
   */
  wrap<StateT = DefaultState, ContextT = DefaultContext, BodyT = unknown>(handler: Middleware<StateT, ContextT, BodyT>): Middleware<StateT, ContextT, BodyT>;
}

function runGuarded(exchange: KoaExchange): Promise<void> {
  exposeSignal(exchange.ctx, exchange);
  exchange.run();
  // Settles once the answer is decided (at once for a rejection or a timeout, while
  // downstream may still run); rejects with a handler error that nothing replaced.
  return exchange.decision();
}

/** One request of a guarded route: the exchange, and how it acts on Koa. */
class KoaExchange extends Exchange implements ResponseTarget, Observer {
  /** True while the guard writes its answer through a context the handler can no longer change. */
  private owning = false;

  constructor(
    compiled: HttpGuard,
    readonly ctx: Context,
    private readonly next: Next,
    /** The wrapped handler (`wrap`), else undefined: downstream is `next`. */
    private readonly handler: Middleware | undefined,
  ) {
    super(compiled);
  }

  get raw(): Context['res'] {
    return this.ctx.res;
  }

  describe(): HttpRequest {
    const ctx = this.ctx;
    return httpRequest(ctx.ip, ctx.method, ctx.originalUrl, ctx.headers);
  }

  /**
   * Koa watches every response already (with on-finished, for its error handling): joining
   * that watch's queue costs a push, where a listener of the guard's own costs some 700
   * instructions a request. Its queue runs when the response finished or its socket closed.
   */
  protected override listen(raw: RawResponse): void {
    const queue = (raw as OnFinishedResponse).__onFinished?.queue;
    if (!Array.isArray(queue)) {
      super.listen(raw);
      return;
    }
    queue.push(this.onClose.bind(this));
    this.markEndHeard();
  }

  start(): void {
    // Downstream may outlive the answer (a timeout answers at once): its late outcome is
    // reported, and ignored, here rather than surfacing as an unhandled rejection.
    const handler = this.handler;
    if (handler === undefined) {
      observe(this.next(), this);
      return;
    }
    const result = handler(this.ctx, this.next) as unknown;
    if (isThenable(result)) observe(result, this);
    else this.downstreamDone();
  }

  /** @internal Downstream ended. */
  settled(error: unknown, failed: boolean): void {
    if (failed) this.fail(error);
    else this.downstreamDone();
  }

  private downstreamDone(): void {
    if (!this.accepting) return;
    if (this.caching) offer(this, this.ctx);
    // Koa's `ctx.status` is `ctx.response.status` behind a delegate, whose shared getter
    // makes two megamorphic keyed loads; the response's own getter reads `res.statusCode`.
    this.respond(this.ctx.response.status);
  }

  send(answer: HttpAnswer): void {
    const ctx = this.ctx;
    this.owning = true;
    try {
      for (const name of REPRESENTATION_HEADERS) ctx.remove(name);
      writeAnswer(ctx, answer);
    } finally {
      this.owning = false;
    }
  }

  /**
   * Koa ignores writes once headers are sent, but between this middleware returning and
   * Koa writing, a late downstream could still change the answer: freeze the response.
   */
  takeOver(): void {
    const response = this.ctx.response as unknown as Record<string, unknown>;
    const allow = (): boolean => this.owning;
    for (const name of FROZEN_PROPERTIES) {
      const descriptor = findDescriptor(response, name);
      const set = descriptor?.set;
      if (set === undefined) continue;
      Object.defineProperty(response, name, {
        configurable: true,
        get: descriptor!.get,
        set(value: unknown) {
          if (allow()) set.call(this, value);
        },
      });
    }
    for (const name of FROZEN_METHODS) {
      const method = response[name];
      if (typeof method !== 'function') continue;
      response[name] = function frozen(this: unknown, ...args: unknown[]): unknown {
        return allow() ? (method as (...a: unknown[]) => unknown).apply(this, args) : undefined;
      };
    }
  }

  release(_error: unknown, thrown: boolean): void {
    // A held failing answer is still in the context, as the handler left it; a thrown
    // error goes back to Koa (its error handling answers and reports it).
    if (thrown) this.rethrowOnDecision();
  }

  setHeaders(headers: Record<string, string>): void {
    this.ctx.set(headers);
  }
}

/** A response that on-finished watches: the listeners waiting for it to finish, until it did. */
interface OnFinishedResponse {
  __onFinished?: { queue?: Array<(error: unknown) => void> | null } | null;
}

const FROZEN_PROPERTIES = ['body', 'status', 'message', 'type', 'length', 'lastModified', 'etag'];
const FROZEN_METHODS = ['set', 'append', 'remove', 'redirect', 'attachment', 'vary', 'flushHeaders'];

/** Shows the cache the body downstream left (JSON, text or bytes; never a stream). */
function offer(exchange: Exchange, ctx: Context): void {
  const body: unknown = ctx.body;
  let bytes: string | Uint8Array;
  if (typeof body === 'string' || body instanceof Uint8Array) bytes = body;
  else if (body === null || body === undefined || typeof (body as { pipe?: unknown }).pipe === 'function' || body instanceof Blob || body instanceof ReadableStream || body instanceof Response) return;
  else {
    try {
      bytes = JSON.stringify(body);
    } catch {
      return;
    }
  }
  exchange.offer(ctx.status, bytes, (name) => ctx.response.get(name) || undefined);
}

/**
 * A ready-made health route: answers `health(policies)` as JSON, `200` while every guard is
 * fine and `503` while a breaker is open or a load shedder sheds, with `Cache-Control:
 * no-store`. Point a readiness probe or a load balancer at it. The policies are checked
 * (and an iterable of them read) when the route is made.
 *
 * @example router.get('/health', healthRoute([catalogPolicy, searchPolicy]));
 */
export function healthRoute(policies: Policies): Middleware {
  const list = policyList('koa healthRoute', policies);
  return function bulwarkHealth(ctx: Context): void {
    writeAnswer(ctx, healthResponse(list));
  };
}

/** Puts `answer` in the context, for Koa to write. */
function writeAnswer(ctx: Context, answer: HttpAnswer): void {
  ctx.status = answer.status;
  // Headers first: Koa then leaves the content type of a string body alone.
  ctx.set(answer.headers);
  ctx.body = typeof answer.body === 'string' ? answer.body : Buffer.from(answer.body);
}
