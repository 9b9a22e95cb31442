// Express 5 route guard. The HTTP behaviour lives in lib/http; this file only translates
// Express: its `next`, its route stack, and the response the handler writes to directly.

import type { NextFunction, Request, RequestHandler, Response } from 'express';
import { Exchange, exposeSignal, httpGuard, httpRequest, ResponseGate, writeAnswer, type GuardOptions, type HttpAnswer, type ResponseTarget } from '../lib/http.js';
import type { Policy } from '../lib/policy.js';

export type { FallbackContext, GuardOptions, RejectResponse } from '../lib/http.js';

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /** Aborts when the guard's timeout fires or the client goes away (guarded routes only). */
      signal: AbortSignal;
    }
  }
}

/** Where a request's innermost running guard is kept, for the route's wrapped handlers. */
const CURRENT = Symbol('bulwark.express.current');
/** The handler a reporting wrapper stands for. */
const ORIGINAL = Symbol('bulwark.express.original');

type Handle = ((req: Request, res: Response, next: NextFunction) => unknown) & { [ORIGINAL]?: Handle };
interface Layer {
  handle: Handle;
}
interface GuardedRequest extends Request {
  [CURRENT]?: ExpressTarget;
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
 */
export function guard(policy: Policy, options?: GuardOptions): RequestHandler {
  const compiled = httpGuard('express guard', policy, options);
  const wrapped = new WeakMap<object, number>();
  return function bulwarkGuard(req: GuardedRequest, res: Response, next: NextFunction): void {
    // Errors of the handlers after a route-level middleware go to the next error layer,
    // never back to it: wrap them (once per route) so that they report to the guard.
    const route = req.route as { stack?: Layer[] } | undefined;
    const stack = route?.stack;
    if (stack !== undefined && wrapped.get(stack) !== stack.length) {
      wrapLayersAfter(stack, bulwarkGuard);
      wrapped.set(stack, stack.length);
    }
    const target = new ExpressTarget(res, next);
    const exchange = new Exchange(compiled, httpRequest(req.ip, req.method, req.originalUrl, req.headers), target);
    target.exchange = exchange;
    exposeSignal(req, exchange);
    exchange.run(() => {
      req[CURRENT] = target;
      if (compiled.degradable) target.watch();
      next();
    });
  };
}

class ExpressTarget implements ResponseTarget {
  exchange!: Exchange;
  private gate: ResponseGate | undefined = undefined;
  private reporting: NextFunction | undefined = undefined;

  constructor(
    readonly raw: Response,
    private readonly next: NextFunction,
  ) {}

  watch(): void {
    this.gate = new ResponseGate(this.raw, this.exchange, 'watch');
  }

  send(answer: HttpAnswer): void {
    if (this.gate !== undefined) this.gate.send(answer);
    else writeAnswer(this.raw, answer);
  }

  takeOver(): void {
    if (this.gate !== undefined) this.gate.drop();
    else this.gate = new ResponseGate(this.raw, this.exchange, 'drop');
  }

  release(error: unknown, thrown: boolean): void {
    if (thrown) this.next(error);
    else this.gate?.release();
  }

  setHeaders(headers: Record<string, string>): void {
    for (const name in headers) this.raw.setHeader(name, headers[name]!);
  }

  /** The `next` the guarded handlers get: errors report to the guard; late calls are dropped. */
  nextFor(next: NextFunction): NextFunction {
    return (this.reporting ??= (error?: unknown): void => {
      const exchange = this.exchange;
      if (error === undefined || error === null || error === 'route' || error === 'router') {
        if (!exchange.superseded && !exchange.released) next(error as undefined);
      } else {
        exchange.fail(error);
      }
    });
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
  const wrapper: Handle = function bulwarkReporting(this: unknown, req: GuardedRequest, res: Response, next: NextFunction): unknown {
    const target = req[CURRENT];
    if (target === undefined) return handle.call(this, req, res, next);
    let result: unknown;
    try {
      result = handle.call(this, req, res, target.nextFor(next));
    } catch (error) {
      target.exchange.fail(error);
      return undefined;
    }
    if (typeof (result as PromiseLike<unknown> | null)?.then === 'function') {
      (result as PromiseLike<unknown>).then(undefined, (error: unknown) => target.exchange.fail(error ?? new Error('Rejected promise')));
    }
    return undefined;
  };
  wrapper[ORIGINAL] = handle;
  return wrapper;
}

// The ready-made health route handler (issue 6) goes here.
