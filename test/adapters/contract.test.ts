// The HTTP contract (SPEC §3), written once and run against Express 5, Koa 3 and Fastify 5
// over real sockets on 127.0.0.1.

import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { Readable } from 'node:stream';
import { expect } from 'chai';
import fc from 'fast-check';
import { bulkhead } from '../../lib/bulkhead.js';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { isClientDisconnected, TimeoutError } from '../../lib/errors.js';
import { pipeline } from '../../lib/pipeline.js';
import { fallback } from '../../lib/fallback.js';
import { rateLimit } from '../../lib/rate-limit.js';
import { retry } from '../../lib/retry.js';
import { timeout } from '../../lib/timeout.js';
import { abandon, eventually, harnesses, RawConnection, request, sleep, watchedServers, type Harness, type RouteSpec, type TestServer } from './support.js';

const ok = { path: '/ok', policy: pipeline(), handler: (kit: Parameters<RouteSpec['handler']>[0]) => kit.json(200, { ok: true }) } satisfies RouteSpec;

for (const harness of harnesses) {
  describe(`HTTP contract: ${harness.name}`, function () {
    this.timeout(5000);
    const current = watchedServers();

    async function start(...routes: RouteSpec[]): Promise<TestServer> {
      current.server = await harness.start(routes);
      return current.server;
    }

    /** Nothing logged, warned or left unhandled, and the framework saw no error. */
    function expectQuiet(s: TestServer): void {
      expect(current.watchdog.events, 'console/process events').to.deep.equal([]);
      expect(s.errors, 'framework errors').to.deep.equal([]);
      expect(s.logs, 'framework warnings').to.deep.equal([]);
    }

    describe('rejection without fallback', () => {
      it('answers an open breaker with 503, Retry-After from its remaining time, and the JSON body; the handler is not called', async () => {
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 30_000 });
        let calls = 0;
        const s = await start({
          path: '/data',
          policy: breaker,
          handler: (kit) => {
            calls++;
            kit.json(500, { detail: 'db down' });
          },
        });
        expect((await request(s, '/data')).status).to.equal(500);
        const answer = await request(s, '/data');
        expect(answer.status).to.equal(503);
        expect(answer.headers['retry-after']).to.equal('30');
        expect(answer.headers['content-type']).to.equal('application/json');
        expect(answer.text).to.equal('{"error":"Service Unavailable","reason":"circuit_open","retryAfter":30}');
        expect(calls).to.equal(1);
        expectQuiet(s);
      });

      it('answers a full bulkhead with 503, Retry-After: 1 and reason bulkhead_full', async () => {
        const s = await start({
          path: '/slow',
          policy: bulkhead({ limit: 1 }),
          handler: async (kit) => {
            await sleep(150);
            kit.json(200, { done: true });
          },
        });
        const first = request(s, '/slow');
        await sleep(20);
        const second = await request(s, '/slow');
        expect(second.status).to.equal(503);
        expect(second.headers['retry-after']).to.equal('1');
        expect(second.json).to.deep.equal({ error: 'Service Unavailable', reason: 'bulkhead_full', retryAfter: 1 });
        expect((await first).status).to.equal(200);
      });

      it('answers a timeout with 503 by default and 504 with timeoutStatus: 504', async () => {
        const slow = async (kit: Parameters<RouteSpec['handler']>[0]): Promise<void> => {
          await sleep(150);
          kit.json(200, {});
        };
        const s = await start({ path: '/503', policy: timeout(40), handler: slow }, { path: '/504', policy: timeout(40), options: { timeoutStatus: 504 }, handler: slow });
        const a = await request(s, '/503');
        expect(a.status).to.equal(503);
        expect(a.text).to.equal('{"error":"Service Unavailable","reason":"timeout","retryAfter":1}');
        const b = await request(s, '/504');
        expect(b.status).to.equal(504);
        expect(b.headers['retry-after']).to.equal('1');
        expect(b.text).to.equal('{"error":"Gateway Timeout","reason":"timeout","retryAfter":1}');
      });

      it('renders with onReject (problem+json), adding Retry-After unless it set one', async () => {
        const open = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        open.forceOpen();
        const s = await start(
          {
            path: '/problem',
            policy: open,
            options: {
              onReject: (ctx, rejection) => ({
                status: rejection.status,
                headers: { 'Content-Type': 'application/problem+json' },
                body: { type: `https://errors.example/${ctx.reason}`, title: 'Unavailable', instance: ctx.request.path },
              }),
            },
            handler: (kit) => kit.json(200, {}),
          },
          {
            path: '/own-retry',
            policy: open,
            options: { onReject: () => ({ status: 503, headers: { 'Retry-After': '120' }, body: 'come back later' }) },
            handler: (kit) => kit.json(200, {}),
          },
        );
        const a = await request(s, '/problem');
        expect(a.status).to.equal(503);
        expect(a.headers['content-type']).to.equal('application/problem+json');
        expect(a.headers['retry-after']).to.equal('1');
        expect(a.json).to.deep.equal({ type: 'https://errors.example/circuit_open', title: 'Unavailable', instance: '/problem' });
        const b = await request(s, '/own-retry');
        expect(b.status).to.equal(503);
        expect(b.headers['retry-after']).to.equal('120');
        expect(b.headers['content-type']).to.match(/^text\/plain/);
        expect(b.text).to.equal('come back later');
      });

      it('falls back to the default rejection when onReject throws', async () => {
        const open = circuitBreaker();
        open.forceOpen();
        const s = await start({
          path: '/x',
          policy: open,
          options: {
            onReject: () => {
              throw new Error('renderer broke: secret');
            },
          },
          handler: (kit) => kit.json(200, {}),
        });
        const a = await request(s, '/x');
        expect(a.status).to.equal(503);
        expect(a.json).to.deep.equal({ error: 'Service Unavailable', reason: 'circuit_open', retryAfter: 1 });
      });
    });

    describe('what counts as failure', () => {
      it('trips the breaker on 5xx and thrown errors, answers 503 while open, and recovers after openMs', async () => {
        const breaker = circuitBreaker({ consecutiveFailures: 2, openMs: 300 });
        let healthy = false;
        let calls = 0;
        const s = await start({
          path: '/flaky',
          policy: breaker,
          handler: (kit) => {
            calls++;
            if (healthy) return kit.json(200, { ok: true });
            if (calls === 1) return kit.json(502, { error: 'bad gateway' });
            throw new Error('upstream exploded');
          },
        });
        expect((await request(s, '/flaky')).status).to.equal(502);
        expect((await request(s, '/flaky')).status).to.equal(500);
        expect(breaker.state).to.equal('open');
        const rejected = await request(s, '/flaky');
        expect(rejected.status).to.equal(503);
        expect((rejected.json as { reason: string }).reason).to.equal('circuit_open');
        expect(calls).to.equal(2);
        healthy = true;
        await sleep(330);
        expect((await request(s, '/flaky')).status).to.equal(200);
        expect(breaker.state).to.equal('closed');
        expect(breaker.stats().totals).to.include({ failures: 2, successes: 1 });
      });

      it('counts 4xx answers and errors thrown with a 4xx status as successes', async () => {
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        const s = await start(
          { path: '/missing', policy: breaker, handler: (kit) => kit.json(404, { error: 'not found' }) },
          {
            path: '/thrown-404',
            policy: breaker,
            handler: () => {
              throw Object.assign(new Error('no such thing'), { status: 404, statusCode: 404, expose: true });
            },
          },
        );
        for (let i = 0; i < 3; i++) expect((await request(s, '/missing')).status).to.equal(404);
        expect((await request(s, '/thrown-404')).status).to.equal(404);
        expect(breaker.state).to.equal('closed');
        expect(breaker.stats().totals).to.include({ failures: 0, successes: 4 });
      });

      it('follows a custom isFailure', async () => {
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        const s = await start({ path: '/conflict', policy: breaker, options: { isFailure: (status) => status === 409 }, handler: (kit) => kit.json(409, {}) });
        expect((await request(s, '/conflict')).status).to.equal(409);
        expect(breaker.state).to.equal('open');
      });
    });

    describe('bulkhead permits', () => {
      it('queues up to queue, rejects beyond, and ends at rest with active 0 and queued 0', async () => {
        const gate = bulkhead({ limit: 1, queue: 1 });
        let running = 0;
        let most = 0;
        const s = await start({
          path: '/work',
          policy: gate,
          handler: async (kit) => {
            most = Math.max(most, ++running);
            await sleep(120);
            running--;
            kit.json(200, { ok: true });
          },
        });
        const answers = await Promise.all([request(s, '/work'), sleep(10).then(() => request(s, '/work')), sleep(20).then(() => request(s, '/work'))]);
        expect(answers.map((a) => a.status).sort()).to.deep.equal([200, 200, 503]);
        expect(most).to.equal(1);
        await eventually(() => gate.active === 0 && gate.queued === 0, 1000, 'bulkhead at rest');
      });

      it('holds the permit while an answer streams, and releases it when the stream ends', async () => {
        const gate = bulkhead({ limit: 1 });
        const s = await start({
          path: '/stream',
          policy: gate,
          handler: (kit) => {
            const body = new Readable({ read() {} });
            kit.stream(200, body, { 'content-type': 'text/plain' });
            body.push('first ');
            setTimeout(() => {
              body.push('last');
              body.push(null);
            }, 200);
          },
        });
        const streaming = request(s, '/stream');
        await sleep(50);
        expect(gate.active).to.equal(1);
        expect((await request(s, '/stream')).status).to.equal(503);
        const streamed = await streaming;
        expect(streamed.text).to.equal('first last');
        await eventually(() => gate.active === 0, 1000, 'permit released');
      });
    });

    describe('client disconnect', () => {
      it('aborts the handler signal with ClientDisconnectedError, frees the slot, counts neither success nor failure', async () => {
        const gate = bulkhead({ limit: 1 });
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        let reason: unknown;
        const s = await start({
          path: '/wait',
          policy: pipeline(gate, breaker),
          handler: async (kit) => {
            await new Promise<void>((resolve) => kit.signal.addEventListener('abort', () => resolve(), { once: true }));
            reason = kit.signal.reason;
          },
        });
        await abandon(s, '/wait', 40);
        await eventually(() => reason !== undefined && gate.active === 0, 1000, 'abort seen and slot freed');
        expect(isClientDisconnected(reason)).to.equal(true);
        expect(breaker.stats().totals).to.include({ successes: 0, failures: 0, ignored: 1 });
        expect(breaker.state).to.equal('closed');
      });

      it('takes a client that leaves while queued out of the queue; its handler never runs', async () => {
        const gate = bulkhead({ limit: 1, queue: 5 });
        let started = 0;
        const s = await start({
          path: '/q',
          policy: gate,
          handler: async (kit) => {
            started++;
            await sleep(150);
            kit.json(200, { ok: true });
          },
        });
        const holder = request(s, '/q');
        await sleep(20);
        await Promise.all([abandon(s, '/q', 30), abandon(s, '/q', 30)]);
        await eventually(() => gate.queued === 0, 1000, 'queue emptied');
        expect(gate.stats().abandoned).to.equal(2);
        expect((await holder).status).to.equal(200);
        await sleep(30);
        expect(started).to.equal(1);
        expect(gate.active).to.equal(0);
        expect(gate.queued).to.equal(0);
        expectQuiet(s);
      });

      // A connection carries many requests: whatever hears the client go away must be there
      // for the third request as for the first, and must not mistake an earlier request's
      // end for this one's.
      it('hears a client leave during a later request on a keep-alive connection', async () => {
        const gate = bulkhead({ limit: 1 });
        let reason: unknown;
        const s = await start(
          { path: '/quick', policy: gate, handler: (kit) => kit.json(200, { quick: true }) },
          {
            path: '/wait',
            policy: gate,
            handler: async (kit) => {
              await new Promise<void>((resolve) => kit.signal.addEventListener('abort', () => resolve(), { once: true }));
              reason = kit.signal.reason;
            },
          },
        );
        const connection = await RawConnection.open(s.port);
        for (let i = 0; i < 3; i++) {
          connection.send('/quick');
          expect((await connection.read()).body).to.equal('{"quick":true}');
          expect(gate.active, `permit of request ${i + 1} returned`).to.equal(0);
        }
        connection.send('/wait');
        await eventually(() => gate.active === 1, 1000, 'handler running');
        connection.close();
        await eventually(() => reason !== undefined && gate.active === 0, 1000, 'abort seen and slot freed');
        expect(isClientDisconnected(reason)).to.equal(true);
        expect(gate.stats()).to.include({ admitted: 4 });
        expectQuiet(s);
      });

      it('answers pipelined requests in order, and frees every permit when the client leaves with some unanswered', async () => {
        const gate = bulkhead({ limit: 4 });
        const signals: AbortSignal[] = [];
        const s = await start({
          path: '/p',
          policy: gate,
          handler: async (kit) => {
            const step = kit.header('x-step');
            if (step === 'hang') {
              signals.push(kit.signal);
              await new Promise<void>((resolve) => kit.signal.addEventListener('abort', () => resolve(), { once: true }));
              return;
            }
            await sleep(step === '1' ? 40 : 5);
            kit.json(200, { step });
          },
        });
        const socket = await rawSocket(s.port);
        const pipelined = (step: string): string => `GET /p HTTP/1.1\r\nHost: 127.0.0.1\r\nx-step: ${step}\r\n\r\n`;
        let received = '';
        socket.on('data', (chunk: Buffer) => void (received += chunk.toString()));
        socket.write(pipelined('1') + pipelined('2') + pipelined('hang') + pipelined('hang'));
        await eventually(() => received.includes('{"step":"2"}'), 1000, 'first two answers');
        expect(received.indexOf('{"step":"1"}')).to.be.lessThan(received.indexOf('{"step":"2"}'));
        await sleep(20);
        socket.destroy();
        await eventually(() => gate.active === 0, 1000, 'every permit returned');
        expect(signals.every((signal) => signal.aborted && isClientDisconnected(signal.reason)), 'hanging handlers aborted').to.equal(true);
        expectQuiet(s);
      });

      it('frees the permit of an answer that streams when the client leaves halfway', async () => {
        const gate = bulkhead({ limit: 1 });
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        let reason: unknown;
        const s = await start({
          path: '/endless',
          policy: pipeline(gate, breaker),
          handler: (kit) => {
            const body = new Readable({ read() {} });
            kit.signal.addEventListener('abort', () => (reason = kit.signal.reason), { once: true });
            kit.stream(200, body, { 'content-type': 'text/plain' });
            body.push('first ');
          },
        });
        const socket = await rawSocket(s.port);
        let received = '';
        socket.on('data', (chunk: Buffer) => void (received += chunk.toString()));
        socket.write('GET /endless HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
        await eventually(() => received.includes('first'), 1000, 'first chunk');
        expect(gate.active).to.equal(1);
        socket.destroy();
        await eventually(() => gate.active === 0, 1000, 'permit released');
        expect(isClientDisconnected(reason)).to.equal(true);
        expect(breaker.stats().totals).to.include({ successes: 0, failures: 0 });
      });
    });

    describe('exactly one response after a timeout', () => {
      async function oneAnswer(s: TestServer, path: string, lateMs: number): Promise<void> {
        const connection = await RawConnection.open(s.port);
        try {
          connection.send(path);
          const first = await connection.read();
          expect(first.status).to.equal(503);
          expect(first.body).to.equal('{"error":"Service Unavailable","reason":"timeout","retryAfter":1}');
          await sleep(lateMs);
          expect(connection.pending, 'bytes after the answer').to.equal(0);
          expect(connection.closed, 'connection closed').to.equal(false);
          connection.send('/ok');
          const second = await connection.read();
          expect(second.status).to.equal(200);
          expect(second.body).to.equal('{"ok":true}');
        } finally {
          connection.close();
        }
      }

      it('drops a late write', async () => {
        let wrote = false;
        const s = await start(ok, {
          path: '/late-write',
          policy: timeout(40),
          handler: async (kit) => {
            await sleep(120);
            kit.json(200, { late: true }, { 'x-late': 'yes' });
            wrote = true;
          },
        });
        await oneAnswer(s, '/late-write', 150);
        expect(wrote).to.equal(true);
        expectQuiet(s);
      });

      it('ignores a late throw', async () => {
        let threw = false;
        const s = await start(ok, {
          path: '/late-throw',
          policy: timeout(40),
          handler: async () => {
            await sleep(120);
            threw = true;
            throw new Error('too late: secret');
          },
        });
        await oneAnswer(s, '/late-throw', 150);
        expect(threw).to.equal(true);
        expectQuiet(s);
      });

      it('ignores a write made as the signal aborts', async () => {
        const s = await start(ok, {
          path: '/on-abort',
          policy: timeout(40),
          handler: async (kit) => {
            await new Promise<void>((resolve) => kit.signal.addEventListener('abort', () => resolve(), { once: true }));
            kit.json(500, { error: 'aborted' });
          },
        });
        await oneAnswer(s, '/on-abort', 60);
        expectQuiet(s);
      });

      it('closes the connection when the timeout fires after the headers went out (slow stream)', async () => {
        let reason: unknown;
        const gate = bulkhead({ limit: 1 });
        const s = await start({
          path: '/slow-stream',
          policy: pipeline(gate, timeout(60)),
          handler: (kit) => {
            const body = new Readable({ read() {} });
            kit.signal.addEventListener('abort', () => {
              reason = kit.signal.reason;
            });
            kit.stream(200, body, { 'content-type': 'text/plain' });
            body.push('partial');
          },
        });
        const connection = await RawConnection.open(s.port);
        connection.send('/slow-stream');
        await eventually(() => connection.closed, 1000, 'connection closed by the guard');
        expect(reason).to.be.instanceOf(TimeoutError);
        await eventually(() => gate.active === 0, 1000, 'permit released');
        connection.close();
      });
    });

    describe('fallback', () => {
      it('answers a rejection with a static fallback', async () => {
        const open = circuitBreaker();
        open.forceOpen();
        const s = await start({ path: '/static', policy: open, options: { fallback: { items: [] } }, handler: (kit) => kit.json(200, {}) });
        const a = await request(s, '/static');
        expect(a.status).to.equal(200);
        expect(a.text).to.equal('{"data":{"items":[]},"source":"fallback","status":"degraded","reason":"circuit_open"}');
        expect(a.headers['cache-control']).to.equal('no-store');
        expect(a.headers['content-type']).to.match(/^application\/json\b/);
      });

      it('calls a functional (async) fallback with reason, error and the normalised request', async () => {
        const seen: Array<{ reason: string; error: unknown; path: string; method: string }> = [];
        const s = await start({
          path: '/fn',
          policy: timeout(40),
          options: {
            fallback: async (ctx) => {
              seen.push({ reason: ctx.reason, error: ctx.error, path: ctx.request.path, method: ctx.request.method });
              await sleep(5);
              return `degraded ${ctx.reason}`;
            },
          },
          handler: async (kit) => {
            await sleep(150);
            kit.json(200, {});
          },
        });
        const a = await request(s, '/fn?x=1');
        expect(a.json).to.deep.equal({ data: 'degraded timeout', source: 'fallback', status: 'degraded', reason: 'timeout' });
        expect(seen).to.have.length(1);
        expect(seen[0]).to.include({ reason: 'timeout', path: '/fn', method: 'GET' });
        expect(seen[0]!.error).to.be.instanceOf(TimeoutError);
      });

      it('replaces a thrown error and a 5xx answer (reason error), and no handler detail leaks', async () => {
        const s = await start(
          {
            path: '/throws',
            policy: pipeline(),
            options: { fallback: 'cached copy' },
            handler: () => {
              throw new Error('secret-db-password');
            },
          },
          { path: '/500', policy: pipeline(), options: { fallback: 'cached copy' }, handler: (kit) => kit.json(500, { stack: 'secret-db-password' }) },
        );
        for (const path of ['/throws', '/500']) {
          const a = await request(s, path);
          expect(a.status).to.equal(200);
          expect(a.text).to.equal('{"data":"cached copy","source":"fallback","status":"degraded","reason":"error"}');
          expect(a.text).not.to.contain('secret');
        }
        expectQuiet(s);
      });

      it('never replaces a 429 with the fallback, and sends RateLimit headers on every answer', async () => {
        const limiter = rateLimit({ limit: 2, windowMs: 60_000 });
        const s = await start({ path: '/limited', policy: limiter, options: { fallback: 'nope' }, handler: (kit) => kit.json(200, { ok: true }) });
        const first = await request(s, '/limited');
        expect(first.status).to.equal(200);
        expect(first.headers).to.include({ 'ratelimit-limit': '2', 'ratelimit-remaining': '1' });
        // A sliding window is whole again at most two windows from now.
        expect(Number(first.headers['ratelimit-reset'])).to.be.within(1, 120);
        expect((await request(s, '/limited')).headers['ratelimit-remaining']).to.equal('0');
        const limited = await request(s, '/limited');
        expect(limited.status).to.equal(429);
        expect(limited.headers).to.include({ 'ratelimit-limit': '2', 'ratelimit-remaining': '0' });
        const retryAfter = Number(limited.headers['retry-after']);
        expect(retryAfter).to.be.within(1, 120);
        expect(limited.json).to.deep.equal({ error: 'Too Many Requests', reason: 'rate_limited', retryAfter });
      });

      it('keys the rate limit by the IP the framework resolves: a spoofed X-Forwarded-For does not help', async () => {
        const s = await start({ path: '/xff', policy: rateLimit({ limit: 2, windowMs: 60_000 }), handler: (kit) => kit.json(200, {}) });
        const statuses: number[] = [];
        for (const forwarded of ['1.1.1.1', '2.2.2.2', '3.3.3.3']) statuses.push((await request(s, '/xff', { headers: { 'x-forwarded-for': forwarded } })).status);
        expect(statuses).to.deep.equal([200, 200, 429]);
      });

      it('renders a 429 through onReject and keeps the RateLimit headers on degraded answers', async () => {
        const s = await start(
          {
            path: '/render',
            policy: rateLimit({ limit: 1, windowMs: 60_000 }),
            options: { onReject: (ctx) => ({ status: 429, body: { title: ctx.reason } }) },
            handler: (kit) => kit.json(200, {}),
          },
          {
            path: '/degraded',
            policy: rateLimit({ limit: 5, windowMs: 60_000 }),
            options: { fallback: 'fb' },
            handler: () => {
              throw new Error('down');
            },
          },
        );
        await request(s, '/render');
        const rendered = await request(s, '/render');
        expect(rendered.status).to.equal(429);
        expect(rendered.json).to.deep.equal({ title: 'rate_limited' });
        expect(rendered.headers['ratelimit-limit']).to.equal('1');
        expect(Number(rendered.headers['retry-after'])).to.be.at.least(1);
        const degraded = await request(s, '/degraded');
        expect(degraded.status).to.equal(200);
        expect((degraded.json as { source: string }).source).to.equal('fallback');
        expect(degraded.headers).to.include({ 'ratelimit-limit': '5', 'ratelimit-remaining': '4' });
      });

      it('serves the value of a fallback() guard inside the policy as a degraded answer', async () => {
        const open = circuitBreaker();
        open.forceOpen();
        const s = await start(
          { path: '/inner-open', policy: pipeline(fallback('inner'), open), handler: (kit) => kit.json(200, {}) },
          { path: '/inner-500', policy: pipeline(fallback('inner'), timeout(1000)), handler: (kit) => kit.json(500, { secret: 'x' }) },
        );
        for (const path of ['/inner-open', '/inner-500']) {
          const answer = await request(s, path);
          expect(answer.status).to.equal(200);
          expect(answer.json).to.deep.equal({ data: 'inner', source: 'fallback', status: 'degraded', reason: 'error' });
        }
      });

      it('lets the rejection stand, detail-free, when the fallback throws; and the original failure too', async () => {
        const open = circuitBreaker();
        open.forceOpen();
        const broken = (): never => {
          throw new Error('fallback exploded: secret');
        };
        const s = await start(
          { path: '/rejected', policy: open, options: { fallback: broken }, handler: (kit) => kit.json(200, {}) },
          { path: '/failed', policy: pipeline(), options: { fallback: broken }, handler: (kit) => kit.json(502, { error: 'upstream' }) },
        );
        const a = await request(s, '/rejected');
        expect(a.status).to.equal(503);
        expect(a.text).to.equal('{"error":"Service Unavailable","reason":"circuit_open","retryAfter":1}');
        const b = await request(s, '/failed');
        expect(b.status).to.equal(502);
        expect(b.json).to.deep.equal({ error: 'upstream' });
        expect(a.text + b.text).not.to.contain('secret');
      });
    });

    describe('cache', () => {
      function cachedRoute(state: { fail: boolean; calls: number }, options: RouteSpec['options'] = { cache: { ttlMs: 60_000, maxEntries: 10 } }, headers?: Record<string, string>): RouteSpec {
        return {
          path: '/item',
          policy: pipeline(),
          options,
          handler: (kit) => {
            state.calls++;
            if (state.fail) return kit.json(503, { error: 'upstream down' });
            return kit.json(200, { id: 1, auth: kit.header('authorization') ?? null }, headers);
          },
        };
      }

      it('serves the last good answer per URL when the route fails', async () => {
        const state = { fail: false, calls: 0 };
        const s = await start(cachedRoute(state));
        expect((await request(s, '/item?v=1')).json).to.deep.equal({ id: 1, auth: null });
        state.fail = true;
        const a = await request(s, '/item?v=1');
        expect(a.status).to.equal(200);
        expect(a.text).to.equal('{"data":{"id":1,"auth":null},"source":"cache","status":"degraded","reason":"error"}');
        // Nothing cached for another URL, and no fallback: the original failure stands.
        const b = await request(s, '/item?v=2');
        expect(b.status).to.equal(503);
        expect(b.json).to.deep.equal({ error: 'upstream down' });
        expectQuiet(s);
      });

      it('uses the fallback while nothing is cached', async () => {
        const state = { fail: true, calls: 0 };
        const s = await start(cachedRoute(state, { cache: { ttlMs: 60_000, maxEntries: 10 }, fallback: { id: 0 } }));
        const a = await request(s, '/item');
        expect(a.json).to.deep.equal({ data: { id: 0 }, source: 'fallback', status: 'degraded', reason: 'error' });
      });

      it('never stores an answer to a request with Authorization or Cookie', async () => {
        const state = { fail: false, calls: 0 };
        const s = await start(cachedRoute(state));
        await request(s, '/item', { headers: { authorization: 'Bearer alice' } });
        await request(s, '/item', { headers: { cookie: 'session=alice' } });
        state.fail = true;
        const a = await request(s, '/item');
        expect(a.status).to.equal(503);
        expect(a.text).not.to.contain('alice');
      });

      for (const control of ['private, max-age=60', 'no-store']) {
        it(`never stores an answer marked Cache-Control: ${control}`, async () => {
          const state = { fail: false, calls: 0 };
          const s = await start(cachedRoute(state, undefined, { 'cache-control': control }));
          await request(s, '/item');
          state.fail = true;
          expect((await request(s, '/item')).status).to.equal(503);
        });
      }

      it('with a key function, the user decides (here: per user, Authorization included)', async () => {
        const state = { fail: false, calls: 0 };
        const s = await start(cachedRoute(state, { cache: { ttlMs: 60_000, maxEntries: 10, key: (req) => `${req.path}:${String(req.headers.authorization)}` } }));
        await request(s, '/item', { headers: { authorization: 'alice' } });
        state.fail = true;
        const alice = await request(s, '/item', { headers: { authorization: 'alice' } });
        expect(alice.json).to.deep.equal({ data: { id: 1, auth: 'alice' }, source: 'cache', status: 'degraded', reason: 'error' });
        expect((await request(s, '/item', { headers: { authorization: 'bob' } })).status).to.equal(503);
      });

      it('serves the cache for a rejection too, and forgets after ttlMs', async () => {
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
        let fail = false;
        const s = await start({
          path: '/c',
          policy: breaker,
          options: { cache: { ttlMs: 400, maxEntries: 10 } },
          handler: (kit) => (fail ? kit.json(500, {}) : kit.json(200, 'plain')),
        });
        await request(s, '/c');
        fail = true;
        expect((await request(s, '/c')).json).to.deep.equal({ data: 'plain', source: 'cache', status: 'degraded', reason: 'error' });
        expect(breaker.state).to.equal('open');
        expect((await request(s, '/c')).json).to.deep.equal({ data: 'plain', source: 'cache', status: 'degraded', reason: 'circuit_open' });
        await sleep(430);
        const expired = await request(s, '/c');
        expect(expired.status).to.equal(503);
        expect((expired.json as { reason: string }).reason).to.equal('circuit_open');
      });
    });

    describe('mount', () => {
      it('refuses a policy that contains a retry with a TypeError', async () => {
        let error: unknown;
        try {
          await start({ path: '/r', policy: pipeline(bulkhead({ limit: 1 }), pipeline(timeout(100), retry({ attempts: 2 }))), handler: (kit) => kit.json(200, {}) });
        } catch (caught) {
          error = caught;
        }
        expect(error).to.be.instanceOf(TypeError);
        expect(String((error as Error).message)).to.match(/retry/);
      });

      it('refuses invalid options with a TypeError naming the option', async () => {
        let error: unknown;
        try {
          await start({ path: '/r', policy: pipeline(), options: { timeoutStatus: 500 as 503 }, handler: (kit) => kit.json(200, {}) });
        } catch (caught) {
          error = caught;
        }
        expect(error).to.be.instanceOf(TypeError);
        expect(String((error as Error).message)).to.match(/timeoutStatus must be 503 or 504, got 500/);
      });
    });

    describe('property: random mixes of outcomes', () => {
      it('returns every permit and the breaker counts exactly what happened', async function () {
        this.timeout(20_000);
        type Action = 'finish' | 'throw' | 'fail5xx' | 'timeout' | 'disconnect' | 'client4xx';
        const action = fc.constantFrom<Action>('finish', 'throw', 'fail5xx', 'timeout', 'disconnect', 'client4xx');
        await fc.assert(
          fc.asyncProperty(fc.array(fc.tuple(action, fc.integer({ min: 0, max: 15 })), { minLength: 1, maxLength: 6 }), async (plan) => {
            const gate = bulkhead({ limit: 2, queue: 6 });
            const breaker = circuitBreaker({ window: { kind: 'count', size: 100 }, minimumCalls: 100, failureRateThreshold: 100, openMs: 10_000 });
            const s = await harness.start([
              {
                path: '/p/:i',
                policy: pipeline(gate, breaker, timeout(50)),
                handler: async (kit) => {
                  const [step, ms] = plan[Number(kit.header('x-step'))]!;
                  await sleep(ms);
                  switch (step) {
                    case 'finish':
                      return kit.json(200, { ok: true });
                    case 'client4xx':
                      return kit.json(404, {});
                    case 'fail5xx':
                      return kit.json(500, {});
                    case 'throw':
                      throw new Error('boom');
                    default:
                      // timeout and disconnect: wait for the signal
                      await new Promise<void>((resolve) => kit.signal.addEventListener('abort', () => resolve(), { once: true }));
                      return kit.json(500, { late: true });
                  }
                },
              },
            ]);
            try {
              await Promise.all(
                plan.map(async ([step], index) => {
                  if (step === 'disconnect') return abandonWithHeader(s, index);
                  const answer = await request(s, `/p/${index}`, { headers: { 'x-step': String(index) } });
                  const expected = { finish: 200, client4xx: 404, fail5xx: 500, throw: 500, timeout: 503 }[step];
                  expect(answer.status, `${step} #${index}`).to.equal(expected);
                }),
              );
              await eventually(() => gate.active === 0 && gate.queued === 0, 2000, 'bulkhead at rest');
              const count = (...steps: Action[]): number => plan.filter(([step]) => steps.includes(step)).length;
              const totals = breaker.stats().totals;
              expect(totals.successes).to.equal(count('finish', 'client4xx'));
              // A disconnect is ignored, or never seen (it left the queue), or, when a stalled
              // process handles the expired timeout before the socket's close, a timeout failure.
              const timedOutDisconnects = totals.failures - count('throw', 'fail5xx', 'timeout');
              expect(timedOutDisconnects).to.be.within(0, count('disconnect'));
              expect(totals.ignored + timedOutDisconnects).to.be.at.most(count('disconnect'));
            } finally {
              await s.close();
            }
          }),
          { numRuns: Number(process.env.PROPERTY_RUNS ?? 8) },
        );
      });
    });
  });
}

async function rawSocket(port: number): Promise<Socket> {
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  await once(socket, 'connect');
  return socket;
}

async function abandonWithHeader(server: TestServer, index: number): Promise<void> {
  const socket = await rawSocket(server.port);
  socket.write(`GET /p/${index} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-step: ${index}\r\n\r\n`);
  await sleep(25);
  socket.destroy();
}

export type { Harness };
