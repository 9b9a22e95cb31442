// Koa 3 route guard. The HTTP behaviour lives in lib/http; this file only translates Koa:
// `await next()`, and a context that Koa writes out once the middleware promise settles.

import type { Context, Middleware, Next } from 'koa';
import { Exchange, exposeSignal, httpGuard, httpRequest, REPRESENTATION_HEADERS, type GuardOptions, type HttpAnswer, type ResponseTarget } from '../lib/http.js';
import type { Policy } from '../lib/policy.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';

declare module 'koa' {
  interface ExtendableContext {
    /** Aborts when the guard's timeout fires or the client goes away (guarded routes only). */
    signal: AbortSignal;
  }
}

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
 */
export function guard(policy: Policy, options?: GuardOptions): Middleware {
  const compiled = httpGuard('koa guard', policy, options);
  return function bulwarkGuard(ctx: Context, next: Next): Promise<void> {
    const target = new KoaTarget(ctx);
    const exchange = new Exchange(compiled, httpRequest(ctx.ip, ctx.method, ctx.originalUrl, ctx.headers), target);
    exposeSignal(ctx, exchange);
    exchange.run(() => {
      // Downstream may outlive the answer (a timeout answers at once): its late outcome is
      // reported, and ignored, here rather than surfacing as an unhandled rejection.
      next().then(
        () => {
          if (!exchange.accepting) return;
          if (exchange.caching) offer(exchange, ctx);
          exchange.respond(ctx.status);
        },
        (error: unknown) => exchange.fail(error),
      );
    });
    return exchange.decision().then(() => {
      if (target.thrown) throw target.error;
    });
  };
}

class KoaTarget implements ResponseTarget {
  thrown = false;
  error: unknown = undefined;
  /** True while the guard writes its answer through a context the handler can no longer change. */
  private owning = false;

  constructor(private readonly ctx: Context) {}

  get raw(): Context['res'] {
    return this.ctx.res;
  }

  send(answer: HttpAnswer): void {
    const ctx = this.ctx;
    this.owning = true;
    try {
      for (const name of REPRESENTATION_HEADERS) ctx.remove(name);
      ctx.status = answer.status;
      ctx.set(answer.headers);
      ctx.body = typeof answer.body === 'string' ? answer.body : Buffer.from(answer.body);
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

  release(error: unknown, thrown: boolean): void {
    // A held failing answer is still in the context, as the handler left it.
    if (!thrown) return;
    this.thrown = true;
    this.error = error;
  }

  setHeaders(headers: Record<string, string>): void {
    this.ctx.set(headers);
  }
}

const FROZEN_PROPERTIES = ['body', 'status', 'message', 'type', 'length', 'lastModified', 'etag'];
const FROZEN_METHODS = ['set', 'append', 'remove', 'redirect', 'attachment', 'vary', 'flushHeaders'];

function findDescriptor(object: object, name: string): PropertyDescriptor | undefined {
  for (let o: object | null = object; o !== null; o = Object.getPrototypeOf(o) as object | null) {
    const descriptor = Object.getOwnPropertyDescriptor(o, name);
    if (descriptor !== undefined) return descriptor;
  }
  return undefined;
}

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

// The ready-made health route handler (issue 6) goes here.
