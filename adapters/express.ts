// Express 5 route guard. The HTTP behaviour lives in lib/http; this file only translates
// Express: its `next`, its route stack, and the response the handler writes to directly.

import type { NextFunction, Request, RequestHandler, Response } from 'express';
import type { ParamsDictionary } from 'express-serve-static-core';
import { Exchange, EXCHANGE_KEY, httpGuard, httpRequest, provideSignal, ResponseGate, writeAnswer, type GuardOptions, type HttpAnswer, type HttpGuard, type HttpRequest, type RawResponse, type ResponseTarget } from '../lib/http.js';
import { healthResponse } from '../lib/health.js';
import { policyList, type Policies } from '../lib/observe.js';
import { isThenable, observe, type Observer } from '../lib/settlers.js';
import type { Policy } from '../lib/policy.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';
export type { Policies } from '../lib/observe.js';

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /** Aborts when the guard's timeout fires or the client goes away (guarded routes only). */
      signal: AbortSignal;
    }
  }
}

/**
 * Where a request's innermost running guard is kept, for the route's wrapped handlers: on
 * the route's `next`, the one function every layer of the route is handed for a request.
 */
const CURRENT = Symbol('bulwark.express.current');
/** On the `next` a wrapper hands a nested guard: the route's own `next` behind it. */
const ROUTE_NEXT = Symbol('bulwark.express.routeNext');
/** The handler a reporting wrapper stands for. */
const ORIGINAL = Symbol('bulwark.express.original');

type Handle = ((req: Request, res: Response, next: RouteNext) => unknown) & { [ORIGINAL]?: Handle };
type RouteNext = NextFunction & { [CURRENT]?: ExpressExchange; [ROUTE_NEXT]?: RouteNext };
interface Layer {
  handle: Handle;
}
/**
 * What `req.signal` reads goes in `res.locals`, Express's place for per-request state.
 * Express gives `req` and `res` a new shape on every request (it swaps their prototypes),
 * so V8 cannot cache anything about them: adding a property to either costs tens of
 * thousands of instructions, and every property read of them a lookup through their
 * prototype chain. The guard reads and writes them as little as it can.
 */
interface Locals {
  [EXCHANGE_KEY]?: ExpressExchange;
}

function localsOf(res: Response): Locals {
  return (res.locals ??= Object.create(null) as Response['locals']) as Locals;
}

/** The exchange of the request's innermost guard, for `req.signal`. */
function exchangeOfRequest(req: object): ExpressExchange | undefined {
  return ((req as Request).res?.locals as Locals | undefined)?.[EXCHANGE_KEY];
}

/**
 * Guards an Express route: the rest of the route runs through `policy`; a rejection or a
 * failure becomes the answer of the HTTP contract (503/429, or a degraded 200 with
 * `fallback`/`cache`). The handler reads its `AbortSignal` as `req.signal`.
 *
 * @example
 * const policy = pipeline(bulkhead({ limit: 20, queue: 50 }), timeout(2000), circuitBreaker({ name: 'catalog' }));
 * app.get('/products/:id', guard(policy, { cache: { ttlMs: 60_000, maxEntries: 1000 } }), async (req, res) => {
 *   res.json(await catalog.get(req.params.id, { signal: req.signal }));
 * });
 * // The same, with the handler inside the guard rather than after it (a little faster):
 * app.get('/products/:id', guard(policy).wrap(async (req, res) => {
 *   res.json(await catalog.get(req.params.id, { signal: req.signal }));
 * }));
 */
export function guard(policy: Policy, options?: GuardOptions): ExpressGuard {
  const compiled = httpGuard('express guard', policy, options);
  const wrapped = new WeakMap<object, number>();
  // The route seen last, so that the WeakMap is only consulted when the route changes.
  let lastStack: Layer[] | undefined;
  let lastLength = -1;
  function bulwarkGuard(req: Request, res: Response, next: RouteNext): void {
    // Errors of the handlers after a route-level middleware go to the next error layer,
    // never back to it: wrap them (once per route) so that they report to the guard.
    const stack = (req.route as { stack?: Layer[] } | undefined)?.stack;
    if (stack !== undefined && (stack !== lastStack || stack.length !== lastLength)) {
      if (wrapped.get(stack) !== stack.length) {
        wrapLayersAfter(stack, bulwarkGuard);
        wrapped.set(stack, stack.length);
      }
      lastStack = stack;
      lastLength = stack.length;
    }
    runGuarded(new ExpressExchange(compiled, req, res, next, undefined));
  }
  return Object.assign(bulwarkGuard, {
    wrap<P = ParamsDictionary, ResBody = unknown, ReqBody = unknown>(handler: RequestHandler<P, ResBody, ReqBody>): RequestHandler<P, ResBody, ReqBody> {
      if (typeof handler !== 'function') throw new TypeError(`express guard: wrap(handler) takes a request handler, got ${typeof handler}`);
      return function bulwarkGuarded(req: Request, res: Response, next: RouteNext): void {
        runGuarded(new ExpressExchange(compiled, req, res, next, handler as unknown as Handle));
      } as unknown as RequestHandler<P, ResBody, ReqBody>;
    },
  });
}

/**
 * An Express route guard (`guard()`): a middleware that runs the rest of the route through
 * the policy, or, through `wrap(handler)`, one that runs `handler` itself.
 */
export interface ExpressGuard extends RequestHandler {
  /**
   * The guard with `handler` inside it: one layer of the route instead of two, which spares
   * Express a step of its route on every request, and the guard its look at the route's
   * stack. `handler` gets `req` (with `req.signal`), `res` and a `next` that reports errors
   * to the guard and passes the rest on, as after `guard()`. The route's later handlers, if
   * it passes on to any, run outside the guard.
   */
  wrap<P = ParamsDictionary, ResBody = unknown, ReqBody = unknown>(handler: RequestHandler<P, ResBody, ReqBody>): RequestHandler<P, ResBody, ReqBody>;
}

function runGuarded(exchange: ExpressExchange): void {
  localsOf(exchange.raw)[EXCHANGE_KEY] = exchange;
  provideSignal(exchange.req, exchangeOfRequest);
  exchange.run();
}

/** One request of a guarded route: the exchange, and how it acts on Express. */
class ExpressExchange extends Exchange implements ResponseTarget, Observer {
  private gate: ResponseGate | undefined = undefined;
  private reporting: RouteNext | undefined = undefined;

  constructor(
    compiled: HttpGuard,
    readonly req: Request,
    readonly raw: Response,
    private readonly next: RouteNext,
    /** The wrapped handler (`wrap`), else undefined: the route's next layers are the handler. */
    private readonly handler: Handle | undefined,
  ) {
    super(compiled);
  }

  describe(): HttpRequest {
    const req = this.req;
    return httpRequest(req.ip, req.method, req.originalUrl, req.headers);
  }

  start(): void {
    // Only a failing answer that a fallback or the cache may replace needs watching.
    if (this.guard.degradable) this.gate = new ResponseGate(this.raw, this, 'watch');
    const next = this.next;
    const handler = this.handler;
    if (handler === undefined) {
      // The route's later layers report to the innermost running guard, found on its `next`.
      (next[ROUTE_NEXT] ?? next)[CURRENT] = this;
      next();
      // A reporting layer that ran looked at the response where its handler returned; when
      // none did (the route's next handler lies beyond it), it is looked at here.
      if (this.reporting === undefined) this.checkpoint();
      return;
    }
    // A wrapped handler reports here directly; what the route runs after it stays with
    // whatever guarded the route before.
    runReporting(handler, undefined, this.req, this.raw, this, next);
  }

  /**
   * The client going away is heard through the socket (one listener per connection), and
   * an answer that ended by the time a guarded handler returned is over there
   * (`checkpoint`): no listener on a response whose every property access misses V8's
   * caches, unless its answer goes on after the handler returned.
   */
  protected override listen(raw: RawResponse): void {
    this.watchConnection(raw);
  }

  /**
   * @internal A guarded handler's promise settled. Its answer was looked at where it
   * returned (`runReporting`): over then, or listened to from then on.
   */
  settled(outcome: unknown, failed: boolean): void {
    if (failed) this.fail(outcome ?? new Error('Rejected promise'));
  }

  send(answer: HttpAnswer): void {
    if (this.gate !== undefined) this.gate.send(answer);
    else writeAnswer(this.raw, answer);
  }

  takeOver(): void {
    if (this.gate !== undefined) this.gate.drop();
    else this.gate = new ResponseGate(this.raw, this, 'drop');
  }

  release(error: unknown, thrown: boolean): void {
    if (thrown) this.next(error);
    else this.gate?.release();
  }

  setHeaders(headers: Record<string, string>): void {
    for (const name in headers) this.raw.setHeader(name, headers[name]!);
  }

  /** The `next` the guarded handlers get: errors report to the guard; late calls are dropped. */
  nextFor(next: RouteNext): NextFunction {
    let reporting = this.reporting;
    if (reporting === undefined) {
      reporting = (error?: unknown): void => {
        if (error === undefined || error === null || error === 'route' || error === 'router') {
          if (!this.superseded && !this.released) next(error as undefined);
        } else {
          this.fail(error);
        }
      };
      // A nested guard is handed this one: it marks itself current on the route's `next`.
      reporting[ROUTE_NEXT] = next;
      this.reporting = reporting;
    }
    return reporting;
  }
}

function wrapLayersAfter(stack: Layer[], self: Handle): void {
  const index = stack.findIndex((layer) => underlying(layer.handle) === self);
  if (index < 0) return;
  for (let i = index + 1; i < stack.length; i++) {
    const layer = stack[i]!;
    const handle = layer.handle;
    // Error handlers (four arguments) keep theirs: Express tells them apart by arity.
    if (typeof handle !== 'function' || handle.length > 3 || handle[ORIGINAL] !== undefined) continue;
    layer.handle = reporting(handle);
  }
}

function underlying(handle: Handle): Handle {
  let current = handle;
  while (current[ORIGINAL] !== undefined) current = current[ORIGINAL];
  return current;
}

/** One wrapper per layer, whatever the guards: it reports to the request's innermost running guard. */
function reporting(handle: Handle): Handle {
  const wrapper: Handle = function bulwarkReporting(this: unknown, req: Request, res: Response, next: RouteNext): unknown {
    const target = next[CURRENT];
    if (target === undefined) return handle.call(this, req, res, next);
    runReporting(handle, this, req, res, target, next);
    return undefined;
  };
  wrapper[ORIGINAL] = handle;
  return wrapper;
}

/**
 * Runs a handler of a guarded route: its throw, its `next(err)` and how its promise settles
 * go to `target`, which looks at the response where the handler returned.
 */
function runReporting(handle: Handle, self: unknown, req: Request, res: Response, target: ExpressExchange, next: RouteNext): void {
  let result: unknown;
  try {
    result = handle.call(self, req, res, target.nextFor(next));
  } catch (error) {
    target.fail(error);
  }
  if (isThenable(result)) observe(result, target);
  // An answer still going on (an async handler, which may answer and go on awaiting, a
  // stream, a callback) is listened to from here: its permit comes back when the answer
  // ends, not when the handler settles.
  target.checkpoint();
}

/**
 * A ready-made health route: answers `health(policies)` as JSON, `200` while every guard is
 * fine and `503` while a breaker is open or a load shedder sheds, with `Cache-Control:
 * no-store`. Point a readiness probe or a load balancer at it. The policies are checked
 * (and an iterable of them read) when the route is made.
 *
 * @example app.get('/health', healthRoute([catalogPolicy, searchPolicy]));
 */
export function healthRoute(policies: Policies): RequestHandler {
  const list = policyList('express healthRoute', policies);
  return function bulwarkHealth(_req: Request, res: Response): void {
    writeAnswer(res, healthResponse(list));
  };
}
