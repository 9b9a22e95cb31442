// Express specifics: late `next()` after the guard answered, the route stack wrapping,
// `app.use` mounts (response interception), nested guards.

import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { expect } from 'chai';
import express, { type NextFunction, type Request, type Response } from 'express';
import { guard } from '../../adapters/express.js';
import { bulkhead } from '../../lib/bulkhead.js';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { pipeline } from '../../lib/pipeline.js';
import { timeout } from '../../lib/timeout.js';
import { eventually, RawConnection, request, sleep, Watchdog, type TestServer } from './support.js';

describe('express adapter', function () {
  this.timeout(5000);
  let server: http.Server | undefined;
  let watchdog: Watchdog;
  let errors: unknown[];

  async function serve(app: express.Express): Promise<TestServer> {
    app.get('/ok', (_req, res) => void res.json({ ok: true }));
    app.use((error: unknown, _req: Request, res: Response, _next: NextFunction) => {
      errors.push(error);
      res.status(500).json({ error: 'internal' });
    });
    server = http.createServer(app);
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

  /** Asks for `paths` in turn on one connection: each answered 200, its permit returned. */
  async function answersInTurn(s: TestServer, paths: string[], gate: { readonly active: number }): Promise<void> {
    const connection = await RawConnection.open(s.port);
    try {
      for (const path of paths) {
        connection.send(path);
        expect((await connection.read()).status, path).to.equal(200);
        expect(gate.active, `permit of ${path} returned`).to.equal(0);
      }
    } finally {
      connection.close();
    }
  }

  async function expectOneTimeoutAnswer(s: TestServer, path: string): Promise<void> {
    const connection = await RawConnection.open(s.port);
    try {
      connection.send(path);
      const first = await connection.read();
      expect(first.status).to.equal(503);
      expect(first.body).to.equal('{"error":"Service Unavailable","reason":"timeout","retryAfter":1}');
      await sleep(150);
      expect(connection.pending).to.equal(0);
      connection.send('/ok');
      expect((await connection.read()).status).to.equal(200);
      expect(connection.closed).to.equal(false);
    } finally {
      connection.close();
    }
  }

  for (const late of ['next()', 'next(err)', 'next("route")'] as const) {
    it(`swallows a late ${late} after a timeout answered`, async () => {
      const app = express();
      let called = false;
      app.get('/late', guard(timeout(40)), async (_req, _res, next) => {
        await sleep(100);
        called = true;
        if (late === 'next()') next();
        else if (late === 'next(err)') next(new Error('late failure'));
        else next('route');
      });
      app.get('/late', (_req, res) => void res.status(418).json({ second: 'route' }));
      const s = await serve(app);
      await expectOneTimeoutAnswer(s, '/late');
      expect(called).to.equal(true);
      expect(errors).to.deep.equal([]);
      expect(watchdog.events).to.deep.equal([]);
    });
  }

  it('reports next(err) from the handler to the guard (breaker counts it, fallback answers)', async () => {
    const app = express();
    const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 10_000 });
    app.get('/next-err', guard(breaker, { fallback: 'fb' }), (_req, _res, next) => next(new Error('secret')));
    const s = await serve(app);
    const answer = await request(s, '/next-err');
    expect(answer.json).to.deep.equal({ data: 'fb', source: 'fallback', status: 'degraded', reason: 'error' });
    expect(breaker.stats().totals.failures).to.equal(1);
    expect(errors).to.deep.equal([]);
  });

  it('passes a handler error on to the error layers when nothing replaces it', async () => {
    const app = express();
    const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 10_000 });
    const failure = new Error('boom');
    app.get(
      '/route-error',
      guard(breaker),
      () => {
        throw failure;
      },
      (error: unknown, _req: Request, res: Response, _next: NextFunction) => void res.status(500).json({ handledBy: 'route', same: error === failure }),
    );
    const s = await serve(app);
    const answer = await request(s, '/route-error');
    expect(answer.status).to.equal(500);
    expect(answer.json).to.deep.equal({ handledBy: 'route', same: true });
    expect(breaker.stats().totals.failures).to.equal(1);
  });

  it('lets a handler fall through with next() (404 is not a failure) and releases its permit', async () => {
    const app = express();
    const gate = bulkhead({ limit: 1 });
    const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
    app.get('/through', guard(pipeline(gate, breaker)), (_req, _res, next) => next());
    const s = await serve(app);
    expect((await request(s, '/through')).status).to.equal(404);
    await eventually(() => gate.active === 0, 1000, 'permit released');
    expect(breaker.state).to.equal('closed');
  });

  describe('mounted with app.use (no route to wrap)', () => {
    it('replaces the error layer 500 with the degraded answer, and counts the failure', async () => {
      const app = express();
      const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 10_000 });
      app.use('/api', guard(breaker, { fallback: { items: [] } }));
      app.get('/api/items', () => {
        throw new Error('secret');
      });
      const s = await serve(app);
      const answer = await request(s, '/api/items');
      expect(answer.status).to.equal(200);
      expect(answer.json).to.deep.equal({ data: { items: [] }, source: 'fallback', status: 'degraded', reason: 'error' });
      expect(breaker.stats().totals.failures).to.equal(1);
    });

    it('drops late writes after a timeout', async () => {
      const app = express();
      app.use('/api', guard(timeout(40)));
      app.get('/api/slow', async (_req, res) => {
        await sleep(100);
        res.set('x-late', '1').json({ late: true });
      });
      const s = await serve(app);
      await expectOneTimeoutAnswer(s, '/api/slow');
      expect(watchdog.events).to.deep.equal([]);
    });

    it('caches through the response and serves it when the route fails', async () => {
      const app = express();
      let fail = false;
      app.use(guard(pipeline(), { cache: { ttlMs: 10_000, maxEntries: 5 } }));
      app.get('/text', (_req, res) => {
        if (fail) res.status(500).send('down');
        else res.type('text/plain').send('hello');
      });
      const s = await serve(app);
      expect((await request(s, '/text')).text).to.equal('hello');
      fail = true;
      expect((await request(s, '/text')).json).to.deep.equal({ data: 'hello', source: 'cache', status: 'degraded', reason: 'error' });
    });
  });

  it('nests guards: the inner one reports what it lets stand to the outer one', async () => {
    const app = express();
    const outer = circuitBreaker({ name: 'outer', consecutiveFailures: 5, openMs: 10_000 });
    const inner = circuitBreaker({ name: 'inner', consecutiveFailures: 5, openMs: 10_000 });
    app.get('/nested', guard(outer, { fallback: 'outer fallback' }), guard(inner), () => {
      throw new Error('deep');
    });
    const s = await serve(app);
    expect((await request(s, '/nested')).json).to.deep.equal({ data: 'outer fallback', source: 'fallback', status: 'degraded', reason: 'error' });
    expect(inner.stats().totals.failures).to.equal(1);
    expect(outer.stats().totals.failures).to.equal(1);
    expect(errors).to.deep.equal([]);
  });

  it('ends the connection of an answer broken off halfway (written, then thrown), counting the failure and freeing the permit', async () => {
    const app = express();
    const gate = bulkhead({ limit: 1 });
    const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 10_000 });
    app.get('/broken', guard(pipeline(gate, breaker)), async (_req, res) => {
      res.write('partial');
      await sleep(10);
      throw new Error('broke mid-answer');
    });
    const s = await serve(app);
    const connection = await RawConnection.open(s.port);
    connection.send('/broken');
    await eventually(() => connection.closed, 1000, 'connection closed');
    await eventually(() => gate.active === 0, 1000, 'permit released');
    expect(breaker.stats().totals.failures).to.equal(1);
    expect(errors).to.deep.equal([]);
  });

  it('gives the handler req.signal, aborted with the TimeoutError', async () => {
    const app = express();
    let reason: unknown;
    app.get('/signal', guard(timeout(30)), async (req, res) => {
      await new Promise<void>((resolve) => req.signal.addEventListener('abort', () => resolve(), { once: true }));
      reason = req.signal.reason;
      res.json({});
    });
    const s = await serve(app);
    expect((await request(s, '/signal')).status).to.equal(503);
    expect((reason as Error).name).to.equal('TimeoutError');
  });

  it('keeps req.signal the guard\'s even when a middleware set one before it; unguarded routes have none, and may set their own', async () => {
    const app = express();
    const before = new AbortController().signal;
    const seen: Record<string, unknown> = {};
    app.use((req, _res, next) => {
      if (req.path === '/preset') req.signal = before;
      next();
    });
    app.get('/preset', guard(timeout(30)), async (req, res) => {
      seen.preset = req.signal;
      await new Promise<void>((resolve) => req.signal.addEventListener('abort', () => resolve(), { once: true }));
      seen.reason = req.signal.reason;
      res.json({});
    });
    app.get('/plain', (req, res) => {
      seen.plain = req.signal;
      req.signal = before;
      seen.assigned = req.signal;
      res.json({});
    });
    const s = await serve(app);
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
  });
  it('reads back a signal the handler assigns inside the guard, and gives the guard\'s to the next request', async () => {
    const app = express();
    const mine = new AbortController().signal;
    const seen: unknown[] = [];
    app.get('/assign', guard(timeout(1000)), (req, res) => {
      seen.push(req.signal);
      req.signal = mine;
      seen.push(req.signal);
      res.json({});
    });
    const s = await serve(app);
    for (let i = 0; i < 2; i++) expect((await request(s, '/assign')).status).to.equal(200);
    expect(seen[0]).to.be.instanceOf(AbortSignal).and.not.equal(mine);
    expect(seen[1]).to.equal(mine);
    expect(seen[2]).to.be.instanceOf(AbortSignal).and.not.equal(mine);
    expect(seen[3]).to.equal(mine);
  });

  // As a layer of its own, too, the guard hears the client through the connection and the
  // answer's end where the handlers after it return or settle.
  it('as a route layer, listens to the connection once and returns the permit wherever the answer ends', async () => {
    const app = express();
    const gate = bulkhead({ limit: 1 });
    const counts: Array<{ path: string; response: number; socket: number; active: number }> = [];
    const count = (req: Request, res: Response): void =>
      void counts.push({ path: req.path, response: res.listenerCount('close'), socket: req.socket.listenerCount('close'), active: gate.active });
    const answer = (req: Request, res: Response): void => {
      count(req, res);
      res.json({});
    };
    app.get('/plain', answer);
    app.get('/sync', guard(gate), answer);
    app.get('/async', guard(gate), async (req, res) => {
      await sleep(5);
      answer(req, res);
    });
    app.get('/passes', guard(gate), (_req, _res, next) => next(), answer);
    app.get('/later', guard(gate), (req, res) => {
      setTimeout(() => answer(req, res), 5);
    });
    // Answers, then goes on awaiting something that never comes.
    app.get('/answers-and-waits', guard(gate), async (req, res) => {
      answer(req, res);
      await new Promise(() => {});
    });
    // The handler is another route's, which the guard's route does not wrap.
    app.get('/beyond', guard(gate));
    app.get('/beyond', answer);
    const s = await serve(app);
    const paths = ['/plain', '/sync', '/async', '/passes', '/later', '/answers-and-waits', '/beyond'];
    await answersInTurn(s, [...paths, ...paths.slice(1)], gate);
    const [plain, ...guarded] = counts;
    expect(guarded.map((seen) => [seen.path, seen.socket, seen.active])).to.deep.equal([...paths.slice(1), ...paths.slice(1)].map((path) => [path, plain!.socket + 1, 1]));
    // A handler whose answer goes on after it returned (async, or answering from a callback)
    // gets the one listener on its response.
    const responseListeners = guarded.map((seen) => [seen.path, seen.response - plain!.response]);
    const listened = ['/async', '/later'];
    expect(responseListeners).to.deep.equal([...paths.slice(1), ...paths.slice(1)].map((path) => [path, listened.includes(path) ? 1 : 0]));
  });

  describe('guard().wrap(handler)', () => {
    it('counts a sync throw, a rejection and next(err) of the handler, and passes next() on outside the guard', async () => {
      const app = express();
      const breaker = circuitBreaker({ consecutiveFailures: 3, openMs: 10_000 });
      const protect = guard(breaker);
      let afterSignal: unknown = 'unset';
      app.get('/ok/:id', protect.wrap((req, res) => void res.json({ id: req.params.id, signal: req.signal instanceof AbortSignal })));
      app.get('/throws', protect.wrap(() => {
        throw new Error('db down');
      }));
      app.get('/rejects', protect.wrap(async () => {
        throw new Error('db down');
      }));
      app.get('/next-error', protect.wrap((_req, _res, next) => next(new Error('db down'))));
      app.get('/passes', protect.wrap((_req, _res, next) => next()), (req, res) => {
        afterSignal = req.signal;
        res.json({ after: true });
      });
      const s = await serve(app);
      expect((await request(s, '/ok/7')).json).to.deep.equal({ id: '7', signal: true });
      expect((await request(s, '/passes')).json).to.deep.equal({ after: true });
      expect(afterSignal, 'the later handler sees the guard through req.signal').to.be.instanceOf(AbortSignal);
      for (const path of ['/throws', '/rejects', '/next-error']) expect((await request(s, path)).status, path).to.equal(500);
      expect(errors).to.have.length(3);
      const rejected = await request(s, '/ok/8');
      expect(rejected.status).to.equal(503);
      expect(rejected.json).to.include({ reason: 'circuit_open' });
      expect(breaker.stats().totals).to.include({ successes: 2, failures: 3, rejections: 1 });
    });

    it('nests: a wrapped guard inside another, the inner timeout answering and the outer permit returned', async () => {
      const app = express();
      const outer = bulkhead({ limit: 1 });
      app.get('/nested', guard(outer).wrap(guard(timeout(30)).wrap(async (req, res) => {
        await new Promise<void>((resolve) => req.signal.addEventListener('abort', () => resolve(), { once: true }));
        res.json({ late: true });
      })));
      const s = await serve(app);
      const answer = await request(s, '/nested');
      expect(answer.status).to.equal(503);
      expect(answer.json).to.include({ reason: 'timeout' });
      await eventually(() => outer.active === 0, 1000, 'outer permit returned');
      expect(errors).to.deep.equal([]);
    });

    // Around a wrapped handler the guard hears the client through the connection, and an
    // answer over by the handler's return there: only an answer that goes on (the async
    // handler's) gets a listener on its response.
    it('listens to the connection once, not to each response, and returns the permit of a sync and an async handler', async () => {
      const app = express();
      const gate = bulkhead({ limit: 1 });
      const counts: Array<{ response: number; socket: number; active: number }> = [];
      const count = (req: Request, res: Response): void =>
        void counts.push({ response: res.listenerCount('close'), socket: req.socket.listenerCount('close'), active: gate.active });
      app.get('/plain', (req, res) => {
        count(req, res);
        res.json({});
      });
      app.get('/sync', guard(gate).wrap((req, res) => {
        count(req, res);
        res.json({});
      }));
      app.get('/async', guard(gate).wrap(async (req, res) => {
        await sleep(5);
        count(req, res);
        res.json({});
      }));
      const s = await serve(app);
      await answersInTurn(s, ['/plain', '/sync', '/async', '/sync', '/async'], gate);
      const [plain, ...guarded] = counts;
      expect(guarded.map((seen) => seen.response)).to.deep.equal([plain!.response, plain!.response + 1, plain!.response, plain!.response + 1]);
      expect(guarded.map((seen) => seen.socket)).to.deep.equal([plain!.socket + 1, plain!.socket + 1, plain!.socket + 1, plain!.socket + 1]);
      expect(guarded.map((seen) => seen.active)).to.deep.equal([1, 1, 1, 1]);
    });

    it('leaves what the route runs after a wrapped handler to the guard before it', async () => {
      const app = express();
      app.get(
        '/after',
        guard(pipeline(), { fallback: 'outer' }),
        guard(pipeline(), { fallback: 'inner' }).wrap((_req, _res, next) => next()),
        () => {
          throw new Error('a later layer failed');
        },
      );
      const s = await serve(app);
      const answer = await request(s, '/after');
      expect([answer.status, answer.json]).to.deep.equal([200, { data: 'outer', source: 'fallback', status: 'degraded', reason: 'error' }]);
    });

    it('refuses what is not a function, naming it', () => {
      expect(() => guard(pipeline()).wrap(42 as unknown as () => void)).to.throw(TypeError, 'express guard: wrap(handler) takes a request handler, got number');
    });
  });
});
