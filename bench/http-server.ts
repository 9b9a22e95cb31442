// One server of the HTTP benchmark, in its own process (bench/http.ts starts it pinned to
// its own core): a hello-world JSON route on one framework, bare or guarded one way. It
// tells the parent its port over IPC, and measures its own CPU time between the parent's
// `start` and `stop` messages, so that the load generator's work is never counted.
// Usage: node --import tsx bench/http-server.ts <express|koa|fastify> <variant>
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import underPressure from '@fastify/under-pressure';
import Router from '@koa/router';
import { pipeline, bulkhead, timeout, circuitBreaker, rateLimit } from 'bulwark';
import { guard as expressGuard } from 'bulwark/express';
import bulwark from 'bulwark/fastify';
import { guard as koaGuard } from 'bulwark/koa';
import * as cockatiel from 'cockatiel';
import express from 'express';
import expressRateLimit from 'express-rate-limit';
import Fastify from 'fastify';
import Koa from 'koa';
import CircuitBreaker from 'opossum';

export type Framework = 'express' | 'koa' | 'fastify';
export type Variant = 'bare' | 'bulwark' | 'bulwark-wrap' | 'bulwark-empty' | 'noop-middleware' | 'cockatiel' | 'opossum' | 'under-pressure' | 'express-rate-limit' | 'bulwark-rate-limit';

const framework = process.argv[2] as Framework;
const variant = process.argv[3] as Variant;
const hello = { hello: 'world' };

/** The guard the benchmark measures: every request admitted, timed and counted. */
const bulwarkPolicy = () => pipeline(bulkhead({ limit: 1000 }), timeout(10_000), circuitBreaker());
/** The same three guards in cockatiel, wrapped around the handler. */
const cockatielPolicy = () =>
  cockatiel.wrap(
    cockatiel.bulkhead(1000),
    cockatiel.timeout(10_000, cockatiel.TimeoutStrategy.Cooperative),
    cockatiel.circuitBreaker(cockatiel.handleAll, { halfOpenAfter: 30_000, breaker: new cockatiel.SamplingBreaker({ threshold: 0.5, duration: 60_000, minimumRps: 20 }) }),
  );
/** Never refuses in the run: both limiters do their bookkeeping on every request. */
const RATE = { limit: 1e9, windowMs: 60_000 };

function unsupported(): never {
  throw new Error(`no variant "${variant}" for ${framework}`);
}

async function expressServer(): Promise<http.Server> {
  const app = express();
  app.set('etag', false);
  const handler = (_req: express.Request, res: express.Response): void => {
    res.json(hello);
  };
  switch (variant) {
    case 'bare':
      app.get('/', handler);
      break;
    case 'bulwark':
      app.get('/', expressGuard(bulwarkPolicy()), handler);
      break;
    case 'bulwark-wrap':
      app.get('/', expressGuard(bulwarkPolicy()).wrap(handler));
      break;
    case 'bulwark-empty':
      app.get('/', expressGuard(pipeline()), handler);
      break;
    case 'noop-middleware':
      app.get('/', (_req, _res, next) => next(), handler);
      break;
    case 'cockatiel': {
      const policy = cockatielPolicy();
      app.get('/', (req, res, next) => {
        policy.execute(() => handler(req, res)).catch(next);
      });
      break;
    }
    case 'express-rate-limit':
      app.get('/', expressRateLimit({ ...RATE, standardHeaders: 'draft-6', legacyHeaders: false }), handler);
      break;
    case 'bulwark-rate-limit':
      app.get('/', expressGuard(rateLimit(RATE)), handler);
      break;
    default:
      unsupported();
  }
  return http.createServer(app);
}

async function koaServer(): Promise<http.Server> {
  const app = new Koa();
  const router = new Router();
  const handler = (ctx: Koa.Context): void => {
    ctx.body = hello;
  };
  switch (variant) {
    case 'bare':
      router.get('/', handler);
      break;
    case 'bulwark':
      router.get('/', koaGuard(bulwarkPolicy()), handler);
      break;
    case 'bulwark-wrap':
      router.get('/', koaGuard(bulwarkPolicy()).wrap(handler));
      break;
    case 'bulwark-empty':
      router.get('/', koaGuard(pipeline()), handler);
      break;
    case 'noop-middleware':
      router.get('/', (_ctx, next) => next(), handler);
      break;
    case 'cockatiel': {
      const policy = cockatielPolicy();
      router.get('/', (ctx) => policy.execute(() => handler(ctx)));
      break;
    }
    default:
      unsupported();
  }
  app.use(router.routes());
  return http.createServer(app.callback());
}

async function fastifyServer(): Promise<http.Server> {
  const app = Fastify({ logger: false });
  const handler = async (): Promise<typeof hello> => hello;
  switch (variant) {
    case 'bare':
      app.get('/', handler);
      break;
    case 'bulwark':
      await app.register(bulwark);
      app.get('/', { config: { bulwark: { policy: bulwarkPolicy() } } }, handler);
      break;
    case 'bulwark-empty':
      await app.register(bulwark);
      app.get('/', { config: { bulwark: { policy: pipeline() } } }, handler);
      break;
    case 'cockatiel': {
      const policy = cockatielPolicy();
      app.get('/', () => policy.execute(() => handler()));
      break;
    }
    case 'opossum': {
      const breaker = new CircuitBreaker(handler, { timeout: 10_000, capacity: 1000 });
      app.get('/', () => breaker.fire());
      break;
    }
    case 'under-pressure':
      await app.register(underPressure, { maxEventLoopDelay: 1000, maxHeapUsedBytes: 1e10, maxRssBytes: 1e10 });
      app.get('/', handler);
      break;
    default:
      unsupported();
  }
  await app.ready();
  return app.server;
}

const server = framework === 'express' ? await expressServer() : framework === 'koa' ? await koaServer() : framework === 'fastify' ? await fastifyServer() : unsupported();
server.listen(0, '127.0.0.1');
await once(server, 'listening');

let since: NodeJS.CpuUsage | undefined;
process.on('message', (message: { type: string }) => {
  if (message.type === 'start') {
    since = process.cpuUsage();
    process.send!({ type: 'started' });
  } else if (message.type === 'stop') {
    const used = process.cpuUsage(since);
    process.send!({ type: 'stopped', userUs: used.user, systemUs: used.system });
  }
});
// The parent going away ends the server too (a killed bench leaves nothing behind).
process.on('disconnect', () => process.exit(0));
process.send!({ type: 'ready', port: (server.address() as AddressInfo).port });
