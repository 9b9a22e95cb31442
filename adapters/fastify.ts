// Fastify 5 plugin. The HTTP behaviour lives in lib/http; this file only translates
// Fastify: route options, the reply, and the `request.signal` it already has.

import type { FastifyInstance, FastifyPluginCallback, FastifyReply, FastifyRequest, RouteHandlerMethod, RouteOptions } from 'fastify';
import fp from 'fastify-plugin';
import { Exchange, EXCHANGE_KEY, exchangeOf, exposeSignal, httpGuard, httpRequest, REPRESENTATION_HEADERS, type GuardOptions, type HttpAnswer, type HttpGuard, type HttpRequest, type RawResponse, type ResponseTarget } from '../lib/http.js';
import { healthResponse } from '../lib/health.js';
import { policyList, type Policies } from '../lib/observe.js';
import type { Policy } from '../lib/policy.js';
import { isThenable, observe, type Observer } from '../lib/settlers.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';
export type { Policies } from '../lib/observe.js';

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
/** On a patched Reply prototype: Fastify's own `send`, which the guard's answers use. */
const ORIGINAL_SEND = Symbol('bulwark.fastify.send');

type Handler = RouteHandlerMethod & { [GUARDED]?: true };
type OnSend = (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (error: Error | null, payload?: unknown) => void) => void;
type Send = (this: FastifyReply, payload?: unknown) => FastifyReply;
type GuardedReply = FastifyReply & { [EXCHANGE_KEY]?: FastifyExchange | null; [ORIGINAL_SEND]: Send };

const plugin: FastifyPluginCallback = function bulwark(fastify, _options, done) {
  // Declared up front, every request and reply object has the slot from its constructor on
  // (one shape for all); it also gives the replies of guarded routes a prototype of this
  // app's own, where the guard's `send` goes (never Fastify's shared one).
  if (!fastify.hasRequestDecorator(EXCHANGE_KEY)) fastify.decorateRequest(EXCHANGE_KEY, null);
  if (!fastify.hasReplyDecorator(EXCHANGE_KEY)) fastify.decorateReply(EXCHANGE_KEY, null);
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
    // Read through the reply, which inherits it from a patched prototype: a property load,
    // where Object.getPrototypeOf on every request went through V8's runtime.
    if ((reply as GuardedReply)[ORIGINAL_SEND] === undefined) patchReply(Object.getPrototypeOf(reply) as GuardedReply);
    const exchange = new FastifyExchange(compiled, this, handler, request, reply);
    (reply as GuardedReply)[EXCHANGE_KEY] = exchange;
    // Fastify's own getter aborts on its handlerTimeout and client close; this one also on the guard's timeout.
    exposeSignal(request, exchange);
    exchange.run();
    // Fastify does nothing more with an `undefined` result: the exchange sends what is sent.
    return undefined;
  };
  guarded[GUARDED] = true;
  return guarded;
}

/**
 * Routes `reply.send` through the request's exchange, once per Reply prototype rather than
 * per request, so that a late send never reaches Fastify. Replies without an exchange (the
 * app's other routes) go straight to Fastify's `send`. `reply.hijack()` tells the exchange
 * too: a hijacked reply is written to the raw response, past every `send`.
 */
function patchReply(prototype: GuardedReply): void {
  if (prototype[ORIGINAL_SEND] !== undefined) return;
  const original = prototype.send as Send;
  Object.defineProperty(prototype, ORIGINAL_SEND, { value: original });
  Object.defineProperty(prototype, 'send', {
    configurable: true,
    writable: true,
    value: function send(this: GuardedReply, payload?: unknown): FastifyReply {
      const exchange = this[EXCHANGE_KEY];
      return exchange === undefined || exchange === null ? original.call(this, payload) : exchange.handlerSend(payload);
    },
  });
  const originalHijack = prototype.hijack as (this: FastifyReply) => FastifyReply;
  Object.defineProperty(prototype, 'hijack', {
    configurable: true,
    writable: true,
    value: function hijack(this: GuardedReply): FastifyReply {
      // The handler will end the raw response itself, past every `send`.
      this[EXCHANGE_KEY]?.checkpoint();
      return originalHijack.call(this);
    },
  });
}

/** One request of a guarded route: the exchange, and how it acts on Fastify. */
class FastifyExchange extends Exchange implements ResponseTarget, Observer {
  private held: unknown = undefined;

  constructor(
    compiled: HttpGuard,
    private readonly instance: FastifyInstance,
    private readonly handler: RouteHandlerMethod,
    private readonly req: FastifyRequest,
    private readonly reply: FastifyReply,
  ) {
    super(compiled);
  }

  get raw(): FastifyReply['raw'] {
    return this.reply.raw;
  }

  describe(): HttpRequest {
    const request = this.req;
    return httpRequest(request.ip, request.method, request.url, request.headers);
  }

  /**
   * The client going away is heard through the connection while the handler works; the end
   * of the response, right after the send that ends it (`checkpoint`). Fastify's replies go
   * out within `send`, so most requests never need a listener of their own.
   */
  protected override listen(raw: RawResponse): void {
    this.watchConnection(raw);
  }

  start(): void {
    const result = this.handler.call(this.instance, this.req, this.reply) as unknown;
    // Heard through bound functions rather than two arrow closures and their context.
    if (isThenable(result)) {
      observe(result, this);
      return;
    }
    if (result !== undefined) this.reply.send(result);
    this.checkpoint();
  }

  /** @internal An async handler settled. */
  settled(outcome: unknown, failed: boolean): void {
    if (failed) this.fail(outcome);
    else this.returned(outcome);
    this.checkpoint();
  }

  /** The handler's `reply.send`: decides, holds or drops it (a late one never reaches Fastify). */
  handlerSend(payload: unknown): FastifyReply {
    const reply = this.reply;
    if (this.accepting) {
      if (payload instanceof Error) {
        this.fail(payload);
        return reply;
      }
      if (this.respond(reply.statusCode)) {
        this.held = payload;
        return reply;
      }
    } else if (this.superseded || (this.released && reply.sent)) {
      // Late: the guard answers, or the failure's answer is out already.
      return reply;
    }
    try {
      (reply as GuardedReply)[ORIGINAL_SEND].call(reply, payload);
    } catch (error) {
      // Thrown to the handler, as Fastify would; what it let stand was never written.
      this.uncommit();
      throw error;
    }
    this.checkpoint();
    return reply;
  }

  /** What an async handler resolved with, sent the way Fastify would. */
  private returned(payload: unknown): void {
    const reply = this.reply;
    if (payload === undefined && !(this.accepting && !reply.sent && !reply.raw.headersSent)) return;
    try {
      reply.send(payload);
    } catch (error) {
      // Fastify's send refuses some payloads by throwing (an object for a text/plain reply):
      // the route failed, as it would without the guard, and no rejection goes unhandled.
      this.fail(error);
    }
  }

  send(answer: HttpAnswer): void {
    const reply = this.reply;
    clearErrorFlag(reply);
    // Only what is there: deleting a header Fastify does not hold still costs a lookup and a delete.
    for (const name of REPRESENTATION_HEADERS) if (reply.hasHeader(name)) reply.removeHeader(name);
    writeAnswer(reply, answer, (reply as GuardedReply)[ORIGINAL_SEND]);
  }

  takeOver(): void {
    // The patched `reply.send` drops the handler's sends from now on.
  }

  release(error: unknown, thrown: boolean): void {
    const reply = this.reply as GuardedReply;
    if (thrown) reply[ORIGINAL_SEND].call(reply, error instanceof Error ? error : new Error(String(error)));
    else {
      clearErrorFlag(reply);
      reply[ORIGINAL_SEND].call(reply, this.held);
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

/**
 * A ready-made health route: answers `health(policies)` as JSON, `200` while every guard is
 * fine and `503` while a breaker is open or a load shedder sheds, with `Cache-Control:
 * no-store`. Point a readiness probe or a load balancer at it. The policies are checked
 * (and an iterable of them read) when the route is made. It needs no plugin.
 *
 * @example app.get('/health', healthRoute([catalogPolicy, searchPolicy]));
 */
export function healthRoute(policies: Policies): RouteHandlerMethod {
  const list = policyList('fastify healthRoute', policies);
  return function bulwarkHealth(_request: FastifyRequest, reply: FastifyReply): void {
    writeAnswer(reply, healthResponse(list), reply.send);
  };
}

/** Sends `answer` through `send` (Fastify's own, past the guard's patch, for the guard's answers). */
function writeAnswer(reply: FastifyReply, answer: HttpAnswer, send: Send): void {
  reply.code(answer.status).headers(answer.headers);
  // Bytes, so that Fastify sends the content type as given (it adds a charset to JSON-ish strings).
  send.call(reply, Buffer.from(answer.body));
}
