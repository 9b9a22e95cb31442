// Koa specifics: an answer set on the context that a late downstream cannot change, no
// 'error' event for a late rejection, upstream middleware seeing the guard's answer.

import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import Router, { type RouterContext } from '@koa/router';
import { expect } from 'chai';
import Koa from 'koa';
import { guard } from '../../adapters/koa.js';
import { bulkhead } from '../../lib/bulkhead.js';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { pipeline } from '../../lib/pipeline.js';
import { timeout } from '../../lib/timeout.js';
import { RawConnection, request, sleep, Watchdog, type TestServer } from './support.js';

describe('koa adapter', function () {
  this.timeout(5000);
  let server: http.Server | undefined;
  let watchdog: Watchdog;
  let errors: unknown[];

  async function serve(app: Koa, router: Router): Promise<TestServer> {
    app.silent = true;
    app.on('error', (error: unknown) => errors.push(error));
    router.get('/ok', (ctx) => {
      ctx.body = { ok: true };
    });
    app.use(router.routes());
    server = http.createServer(app.callback());
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as AddressInfo).port;
    return { port, url: `http://127.0.0.1:${port}`, errors, logs: [], close: async () => {} };
  }

  beforeEach(() => {
    errors = [];
    watchdog = new Watchdog().start();
  });

  afterEach(async () => {
    watchdog.stop();
    server?.closeAllConnections();
    await new Promise<void>((resolve) => (server === undefined ? resolve() : server.close(() => resolve())));
    server = undefined;
  });

  it('keeps the timeout answer when downstream writes status, headers and body in the same tick as the abort', async () => {
    const app = new Koa();
    const router = new Router();
    router.get('/race', guard(timeout(40)), async (ctx) => {
      await new Promise<void>((resolve) => ctx.signal.addEventListener('abort', () => resolve(), { once: true }));
      // Runs in the microtasks right after the abort, before Koa writes the response.
      ctx.status = 500;
      ctx.set('x-late', 'yes');
      ctx.type = 'text/html';
      ctx.body = '<h1>late</h1>';
    });
    const s = await serve(app, router);
    const connection = await RawConnection.open(s.port);
    connection.send('/race');
    const answer = await connection.read();
    expect(answer.status).to.equal(503);
    expect(answer.headers['x-late']).to.equal(undefined);
    expect(answer.headers['content-type']).to.match(/^application\/json/);
    expect(answer.body).to.equal('{"error":"Service Unavailable","reason":"timeout","retryAfter":1}');
    await sleep(50);
    expect(connection.pending).to.equal(0);
    connection.send('/ok');
    expect((await connection.read()).status).to.equal(200);
    connection.close();
    expect(errors).to.deep.equal([]);
    expect(watchdog.events).to.deep.equal([]);
  });

  it('shows the guard answer to middleware mounted before it, and emits no error for a late rejection', async () => {
    const app = new Koa();
    const router = new Router();
    const seen: number[] = [];
    app.use(async (ctx, next) => {
      await next();
      seen.push(ctx.status);
    });
    router.get('/slow', guard(timeout(30)), async () => {
      await sleep(80);
      throw new Error('late and secret');
    });
    const s = await serve(app, router);
    expect((await request(s, '/slow')).status).to.equal(503);
    await sleep(100);
    expect(seen).to.deep.equal([503]);
    expect(errors).to.deep.equal([]);
    expect(watchdog.events).to.deep.equal([]);
  });

  it('rethrows a handler error nothing replaces, so Koa answers and reports it as usual', async () => {
    const app = new Koa();
    const router = new Router();
    const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 10_000 });
    const failure = new Error('boom');
    router.get('/throws', guard(breaker), () => {
      throw failure;
    });
    const s = await serve(app, router);
    const answer = await request(s, '/throws');
    expect(answer.status).to.equal(500);
    expect(answer.text).to.equal('Internal Server Error');
    expect(errors).to.deep.equal([failure]);
    expect(breaker.stats().totals.failures).to.equal(1);
  });

  it('replaces a failing status set on the context (and a streamed body) with the fallback', async () => {
    const app = new Koa();
    const router = new Router();
    router.get('/status', guard(pipeline(), { fallback: 'fb' }), (ctx) => {
      ctx.status = 503;
      ctx.body = { error: 'upstream' };
    });
    const s = await serve(app, router);
    const answer = await request(s, '/status');
    expect(answer.status).to.equal(200);
    expect(answer.json).to.deep.equal({ data: 'fb', source: 'fallback', status: 'degraded', reason: 'error' });
  });

  it('gives downstream ctx.signal, aborted with the TimeoutError', async () => {
    const app = new Koa();
    const router = new Router();
    let reason: unknown;
    router.get('/signal', guard(timeout(30)), async (ctx) => {
      await new Promise<void>((resolve) => ctx.signal.addEventListener('abort', () => resolve(), { once: true }));
      reason = ctx.signal.reason;
    });
    const s = await serve(app, router);
    expect((await request(s, '/signal')).status).to.equal(503);
    expect((reason as Error).name).to.equal('TimeoutError');
  });

  it('keeps ctx.signal the guard\'s even when a middleware set one before it; unguarded routes have none, and may set their own', async () => {
    const app = new Koa();
    const router = new Router();
    const before = new AbortController().signal;
    const seen: Record<string, unknown> = {};
    app.use(async (ctx, next) => {
      if (ctx.path === '/preset') ctx.signal = before;
      await next();
    });
    router.get('/preset', guard(timeout(30)), async (ctx) => {
      seen.preset = ctx.signal;
      await new Promise<void>((resolve) => ctx.signal.addEventListener('abort', () => resolve(), { once: true }));
      seen.reason = ctx.signal.reason;
      ctx.body = {};
    });
    router.get('/plain', (ctx) => {
      seen.plain = ctx.signal;
      ctx.signal = before;
      seen.assigned = ctx.signal;
      ctx.body = {};
    });
    const s = await serve(app, router);
    // The first time, the middleware's assignment comes before the guard ever ran; the
    // second time, after.
    for (let i = 0; i < 2; i++) {
      seen.preset = seen.reason = undefined;
      expect((await request(s, '/preset')).status).to.equal(503);
      expect(seen.preset).to.be.instanceOf(AbortSignal).and.not.equal(before);
      expect((seen.reason as Error).name).to.equal('TimeoutError');
    }
    expect((await request(s, '/plain')).status).to.equal(200);
    expect(seen.plain).to.equal(undefined);
    expect(seen.assigned).to.equal(before);
    expect(errors).to.deep.equal([]);
  });

  it('reads back a signal the handler assigns inside the guard (AbortSignal.any of the guard\'s and its own)', async () => {
    const app = new Koa();
    const router = new Router();
    const mine = new AbortController();
    let readBack: AbortSignal | undefined;
    let guardAborted: boolean | undefined;
    router.get('/combined', guard(timeout(1000)), async (ctx) => {
      const combined = AbortSignal.any([ctx.signal, mine.signal]);
      ctx.signal = combined;
      readBack = ctx.signal;
      mine.abort(new Error('mine'));
      guardAborted = readBack.aborted;
      ctx.body = {};
    });
    const s = await serve(app, router);
    expect((await request(s, '/combined')).status).to.equal(200);
    expect(readBack).to.be.instanceOf(AbortSignal);
    expect(guardAborted, 'the combined signal follows the handler\'s own').to.equal(true);
  });

  // A middleware that assigns ctx.signal and then awaits: requests that passed it while the
  // very first guarded request was installing the accessor carry an own signal.
  it('gives the guard\'s signal to requests that got one from a middleware while the first guarded request was on its way', async () => {
    const app = new Koa();
    const router = new Router();
    const apps = new AbortController().signal;
    const seen: unknown[] = [];
    app.use(async (ctx, next) => {
      ctx.signal = apps;
      await sleep(Number(ctx.query.wait ?? 0));
      await next();
    });
    router.get('/g', guard(timeout(1000)), async (ctx) => {
      seen.push(ctx.signal);
      ctx.body = {};
    });
    const s = await serve(app, router);
    const answers = await Promise.all([request(s, '/g?wait=0'), request(s, '/g?wait=30'), request(s, '/g?wait=60')]);
    expect(answers.map((a) => a.status)).to.deep.equal([200, 200, 200]);
    expect(seen).to.have.length(3);
    for (const signal of seen) expect(signal).to.be.instanceOf(AbortSignal).and.not.equal(apps);
  });

  describe('on @koa/router, guard() fused with the middleware after it', () => {
    const stackOf = (router: Router, path: string, methods = ['HEAD', 'GET']): unknown[] => router.stack.find((layer) => layer.path === path && layer.methods.join() === methods.join())!.stack;

    it('answers the same before and after the route\'s stack became one guarded middleware', async () => {
      const app = new Koa();
      const router = new Router();
      const breaker = circuitBreaker({ consecutiveFailures: 2, openMs: 10_000 });
      const gate = bulkhead({ limit: 1, queue: 10 });
      const protect = guard(pipeline(gate, breaker));
      router.get('/items/:id', protect, async (ctx, next) => {
        await sleep(5);
        ctx.state.id = ctx.params.id;
        ctx.state.signal = ctx.signal instanceof AbortSignal && !ctx.signal.aborted;
        await next();
      }, (ctx) => {
        ctx.body = { id: ctx.state.id as string, signal: ctx.state.signal as boolean, active: gate.active };
      });
      router.get('/fails', protect, () => {
        throw new Error('db down');
      });
      const s = await serve(app, router);
      expect(stackOf(router, '/items/:id')).to.have.length(3);
      // The first request fuses the stack and goes on through the chain it started with.
      const answers = await Promise.all(['1', '2', '3', '4'].map((id) => request(s, `/items/${id}`)));
      expect(answers.map((answer) => answer.json)).to.deep.equal(['1', '2', '3', '4'].map((id) => ({ id, signal: true, active: 1 })));
      expect(stackOf(router, '/items/:id')).to.have.length(2);
      expect((await request(s, '/items/5')).json).to.deep.equal({ id: '5', signal: true, active: 1 });
      expect((await request(s, '/fails')).status).to.equal(500);
      expect(stackOf(router, '/fails')).to.have.length(1);
      expect((await request(s, '/fails')).status).to.equal(500);
      const rejected = await request(s, '/items/6');
      expect(rejected.status).to.equal(503);
      expect(rejected.json).to.include({ reason: 'circuit_open' });
      expect(breaker.stats().totals).to.include({ successes: 5, failures: 2, rejections: 1 });
      expect(gate.active).to.equal(0);
      expect(errors).to.have.length(2);
    });

    it('fuses nested guards from the inside out, each still doing its part', async () => {
      const app = new Koa();
      const router = new Router();
      const breaker = circuitBreaker({ consecutiveFailures: 100, openMs: 10_000 });
      router.get('/slow', guard(breaker), guard(timeout(20)), async (ctx) => {
        await sleep(200);
        ctx.body = 'late';
      });
      const s = await serve(app, router);
      const lengths: number[] = [];
      for (let i = 0; i < 3; i++) {
        const answer = await request(s, '/slow');
        expect(answer.status).to.equal(503);
        expect(answer.json).to.include({ reason: 'timeout' });
        lengths.push(stackOf(router, '/slow').length);
      }
      expect(lengths).to.deep.equal([2, 1, 1]);
      // The outer guard counts the inner guard's 503 as a failure, fused or not.
      expect(breaker.stats().totals).to.include({ failures: 3 });
    });

    it('fuses with a guard behind it that ends the stack, which never fuses itself', async () => {
      const app = new Koa();
      const router = new Router();
      const outer = circuitBreaker({ consecutiveFailures: 100, openMs: 10_000 });
      router.register('/pair', ['GET'], [guard(outer), guard(timeout(20))]);
      router.get('/pair', async (ctx) => {
        await sleep(200);
        ctx.body = 'late';
      });
      const s = await serve(app, router);
      for (let i = 0; i < 2; i++) expect((await request(s, '/pair')).json).to.include({ reason: 'timeout' });
      expect(stackOf(router, '/pair', ['HEAD', 'GET']).map((middleware) => (middleware as () => void).name)).to.deep.equal(['bulwarkGuarded']);
      expect(outer.stats().totals).to.include({ failures: 2 });
    });

    it('leaves a guard that ends its layer (router.use) as it is, still guarding the route after it', async () => {
      const app = new Koa();
      const router = new Router();
      router.use('/guarded', guard(timeout(20)));
      router.get('/guarded', async (ctx) => {
        await sleep(200);
        ctx.body = 'late';
      });
      const s = await serve(app, router);
      for (let i = 0; i < 2; i++) expect((await request(s, '/guarded')).json).to.include({ reason: 'timeout' });
      expect(stackOf(router, '/guarded', [])).to.have.length(1);
    });
  });

  describe('guard().wrap(handler)', () => {
    it('runs a sync handler, an async one and the route\'s later middleware under the guard', async () => {
      const app = new Koa();
      const router = new Router();
      const breaker = circuitBreaker({ consecutiveFailures: 2, openMs: 10_000 });
      const protect = guard(breaker);
      // Annotated, the handler's ctx is the router's, with ctx.params typed.
      router.get('/sync/:id', protect.wrap((ctx: RouterContext) => {
        ctx.body = { id: ctx.params.id, signal: ctx.signal instanceof AbortSignal };
      }));
      router.get('/async/:id', protect.wrap(async (ctx, next) => {
        ctx.state.from = ctx.params.id;
        await next();
      }), (ctx) => {
        ctx.body = { after: ctx.state.from as string };
      });
      router.get('/fails', protect.wrap(() => {
        throw new Error('db down');
      }));
      const s = await serve(app, router);
      expect((await request(s, '/sync/7')).json).to.deep.equal({ id: '7', signal: true });
      expect((await request(s, '/async/8')).json).to.deep.equal({ after: '8' });
      expect((await request(s, '/fails')).status).to.equal(500);
      expect((await request(s, '/fails')).status).to.equal(500);
      const rejected = await request(s, '/sync/9');
      expect(rejected.status).to.equal(503);
      expect(rejected.json).to.include({ reason: 'circuit_open' });
      expect(breaker.stats().totals).to.include({ successes: 2, failures: 2, rejections: 1 });
    });

    it('refuses what is not a function, naming it', () => {
      expect(() => guard(pipeline()).wrap('handler' as unknown as () => void)).to.throw(TypeError, 'koa guard: wrap(handler) takes a middleware function, got string');
    });
  });
});
