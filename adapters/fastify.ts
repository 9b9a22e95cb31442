// Fastify 5 plugin. The HTTP behaviour lives in lib/http; this file only translates
// Fastify: route options, the reply, and the `request.signal` it already has.

import type { FastifyInstance, FastifyPluginCallback, FastifyReply, FastifyRequest, RouteHandlerMethod, RouteOptions } from 'fastify';
import fp from 'fastify-plugin';
import { Exchange, exchangeOf, exposeSignal, httpGuard, httpRequest, REPRESENTATION_HEADERS, type GuardOptions, type HttpAnswer, type HttpGuard, type ResponseTarget } from '../lib/http.js';
import type { Policy } from '../lib/policy.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';

/**
 * A route's `config.bulwark`: the policy and the options of the HTTP contract.
 *
 * @example app.get('/items', { config: { bulwark: { policy, timeoutStatus: 504 } satisfies FastifyGuardConfig } }, handler);
 */
export interface FastifyGuardConfig extends GuardOptions {
  policy: Policy;
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Guards this route (register the bulwark plugin before the route). */
    bulwark?: FastifyGuardConfig;
  }
}

const GUARDED = Symbol('bulwark.fastify.guarded');

type Handler = RouteHandlerMethod & { [GUARDED]?: true };
type OnSend = (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (error: Error | null, payload?: unknown) => void) => void;

const plugin: FastifyPluginCallback = function bulwark(fastify, _options, done) {
  fastify.addHook('onRoute', (route: RouteOptions) => {
    const config = (route.config as { bulwark?: unknown } | undefined)?.bulwark;
    if (config === undefined || (route.handler as Handler)[GUARDED]) return;
    if (typeof config !== 'object' || config === null || Array.isArray(config)) {
      throw new TypeError(`fastify bulwark: config.bulwark of ${String(route.method)} ${route.url} must be an object ({ policy, ...options }), got ${typeof config}`);
    }
    const { policy, ...options } = config as FastifyGuardConfig;
    const compiled = httpGuard(`fastify bulwark (${String(route.method)} ${route.url})`, policy, options);
    route.handler = guardHandler(route.handler, compiled);
    if (compiled.cache !== undefined) {
      const existing = route.onSend;
      route.onSend = [...(existing === undefined ? [] : Array.isArray(existing) ? existing : [existing]), offerToCache] as RouteOptions['onSend'];
    }
  });
  done();
};

/**
 * The bulwark plugin: guards every route registered after it whose `config.bulwark` holds
 * `{ policy, ...options }`. Await its registration before declaring the routes (Fastify's
 * `onRoute` hook sees only routes added after the plugin loaded).
 *
 * @example
 * await app.register(bulwark);
 * app.get('/products/:id', { config: { bulwark: { policy, fallback: { items: [] } } } }, async (request) => {
 *   return catalog.get(request.params.id, { signal: request.signal });
 * });
 */
const bulwark = fp(plugin, { fastify: '5.x', name: 'bulwark' });
export default bulwark;
export { bulwark };

function guardHandler(handler: RouteHandlerMethod, compiled: HttpGuard): Handler {
  const guarded: Handler = function bulwarkHandler(this: FastifyInstance, request: FastifyRequest, reply: FastifyReply): undefined {
    const target = new FastifyTarget(reply);
    const exchange = new Exchange(compiled, httpRequest(request.ip, request.method, request.url, request.headers), target);
    target.exchange = exchange;
    // Fastify's own getter aborts on its handlerTimeout and client close; this one also on the guard's timeout.
    exposeSignal(request, exchange);
    exchange.run(() => {
      target.intercept();
      const result = handler.call(this, request, reply) as unknown;
      if (typeof (result as PromiseLike<unknown> | null)?.then === 'function') {
        (result as PromiseLike<unknown>).then((payload) => target.returned(payload), (error: unknown) => exchange.fail(error));
      } else if (result !== undefined) {
        reply.send(result);
      }
    });
    // Fastify does nothing more with an `undefined` result: the exchange sends what is sent.
    return undefined;
  };
  guarded[GUARDED] = true;
  return guarded;
}

class FastifyTarget implements ResponseTarget {
  exchange!: Exchange;
  private readonly send0: FastifyReply['send'];
  private held: unknown = undefined;

  constructor(private readonly reply: FastifyReply) {
    this.send0 = reply.send;
  }

  get raw(): FastifyReply['raw'] {
    return this.reply.raw;
  }

  /** Routes the handler's `reply.send` through the exchange (a late one never reaches Fastify). */
  intercept(): void {
    const reply = this.reply;
    const send0 = this.send0;
    reply.send = (payload?: unknown): FastifyReply => {
      const exchange = this.exchange;
      if (exchange.accepting) {
        if (payload instanceof Error) {
          exchange.fail(payload);
          return reply;
        }
        if (exchange.respond(reply.statusCode)) {
          this.held = payload;
          return reply;
        }
      } else if (exchange.superseded || (exchange.released && reply.sent)) {
        // Late: the guard answers, or the failure's answer is out already.
        return reply;
      }
      return send0.call(reply, payload);
    };
  }

  /** What an async handler resolved with, sent the way Fastify would. */
  returned(payload: unknown): void {
    const reply = this.reply;
    if (payload !== undefined || (this.exchange.accepting && !reply.sent && !reply.raw.headersSent)) reply.send(payload);
  }

  send(answer: HttpAnswer): void {
    const reply = this.reply;
    clearErrorFlag(reply);
    for (const name of REPRESENTATION_HEADERS) reply.removeHeader(name);
    reply.code(answer.status).headers(answer.headers);
    // Bytes, so that Fastify sends the content type as given (it adds a charset to JSON-ish strings).
    this.send0.call(reply, Buffer.from(answer.body));
  }

  takeOver(): void {
    // The intercepted `reply.send` drops the handler's sends from now on.
  }

  release(error: unknown, thrown: boolean): void {
    if (thrown) this.send0.call(this.reply, error instanceof Error ? error : new Error(String(error)));
    else {
      clearErrorFlag(this.reply);
      this.send0.call(this.reply, this.held);
    }
  }

  setHeaders(headers: Record<string, string>): void {
    this.reply.headers(headers);
  }
}

let isErrorFlag: symbol | null | undefined;

/**
 * Fastify marks a reply before it sends an error through `reply.send` (its handlerTimeout
 * does); the guard took that send, so the mark must go before the guard's own answer,
 * which Fastify would otherwise treat as the error.
 */
function clearErrorFlag(reply: FastifyReply): void {
  isErrorFlag ??= Object.getOwnPropertySymbols(reply).find((symbol) => symbol.description === 'fastify.reply.isError') ?? null;
  if (isErrorFlag === null) return;
  const flags = reply as unknown as Record<symbol, unknown>;
  if (flags[isErrorFlag] === true) flags[isErrorFlag] = false;
}

/** onSend hook of routes with `cache`: shows the cache the handler's serialised answer. */
const offerToCache: OnSend = (request, reply, payload, done) => {
  const exchange = exchangeOf(request);
  if (exchange !== undefined && exchange.committedByHandler && exchange.caching && (typeof payload === 'string' || payload instanceof Uint8Array)) {
    exchange.offer(reply.statusCode, payload, (name) => reply.getHeader(name) as string | number | string[] | undefined);
  }
  done(null, payload);
};

// The ready-made health route handler (issue 6) goes here.
