// Fastify specifics: the plugin and route config, Fastify's own handlerTimeout next to the
// guard's, late sends with a real logger, handler styles (return, send, return reply).

import http2 from 'node:http2';
import { Readable, Writable } from 'node:stream';
import { expect } from 'chai';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import bulwark from '../../adapters/fastify.js';
import { bulkhead } from '../../lib/bulkhead.js';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { isClientDisconnected } from '../../lib/errors.js';
import { pipeline } from '../../lib/pipeline.js';
import { timeout } from '../../lib/timeout.js';
import { eventually, RawConnection, request, sleep, Watchdog, type TestServer } from './support.js';

describe('fastify adapter', function () {
  this.timeout(5000);
  let app: FastifyInstance | undefined;
  let logs: Array<{ level: number; msg?: string; err?: { code?: string } }>;
  let watchdog: Watchdog;

  async function build(): Promise<FastifyInstance> {
    logs = [];
    const stream = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        logs.push(JSON.parse(chunk.toString()) as (typeof logs)[number]);
        callback();
      },
    });
    app = Fastify({ logger: { level: 'info', stream }, forceCloseConnections: true });
    await app.register(bulwark);
    app.get('/ok', async () => ({ ok: true }));
    return app;
  }

  async function listen(instance: FastifyInstance): Promise<TestServer> {
    await instance.listen({ port: 0, host: '127.0.0.1' });
    const port = (instance.server.address() as { port: number }).port;
    return { port, url: `http://127.0.0.1:${port}`, errors: [], logs: [], close: () => instance.close() };
  }

  beforeEach(() => {
    watchdog = new Watchdog().start();
  });

  afterEach(async () => {
    watchdog.stop();
    await app?.close();
    app = undefined;
  });

  const warnings = (): unknown[] => logs.filter((entry) => entry.level >= 40);

  it('drops a late reply.send without FST_ERR_REP_ALREADY_SENT, with a real logger', async () => {
    const instance = await build();
    instance.get('/late', { config: { bulwark: { policy: timeout(40) } } }, async (_request, reply) => {
      await sleep(100);
      reply.send({ late: true });
      return reply;
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    connection.send('/late');
    expect((await connection.read()).status).to.equal(503);
    await sleep(120);
    expect(connection.pending).to.equal(0);
    connection.send('/ok');
    expect((await connection.read()).status).to.equal(200);
    connection.close();
    expect(warnings()).to.deep.equal([]);
    expect(watchdog.events).to.deep.equal([]);
  });

  it('with Fastify handlerTimeout shorter than the guard: one answer, and request.signal says why first', async () => {
    const instance = await build();
    let reason: unknown;
    instance.get('/fst', { handlerTimeout: 30, config: { bulwark: { policy: timeout(200), fallback: 'fb' } } }, async (request, reply) => {
      await new Promise<void>((resolve) => request.signal.addEventListener('abort', () => resolve(), { once: true }));
      reason = request.signal.reason;
      reply.send({ late: true });
      return reply;
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    connection.send('/fst');
    const answer = await connection.read();
    expect(answer.status).to.equal(200);
    expect(JSON.parse(answer.body)).to.deep.equal({ data: 'fb', source: 'fallback', status: 'degraded', reason: 'error' });
    await sleep(50);
    expect(connection.pending).to.equal(0);
    connection.close();
    expect((reason as { code?: string }).code).to.equal('FST_ERR_HANDLER_TIMEOUT');
    expect(warnings()).to.deep.equal([]);
  });

  it('with Fastify handlerTimeout shorter and no fallback: Fastify\'s 503 stands, once', async () => {
    const instance = await build();
    instance.get('/fst-plain', { handlerTimeout: 30, config: { bulwark: { policy: timeout(200) } } }, async (request) => {
      await new Promise<void>((resolve) => request.signal.addEventListener('abort', () => resolve(), { once: true }));
      return { late: true };
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    connection.send('/fst-plain');
    const answer = await connection.read();
    expect(answer.status).to.equal(503);
    expect(JSON.parse(answer.body)).to.include({ code: 'FST_ERR_HANDLER_TIMEOUT' });
    await sleep(50);
    expect(connection.pending).to.equal(0);
    connection.close();
    expect(logs.some((entry) => entry.msg?.includes('already sent') || entry.err?.code === 'FST_ERR_REP_ALREADY_SENT')).to.equal(false);
  });

  it('with Fastify handlerTimeout longer than the guard: the guard answers once', async () => {
    const instance = await build();
    let reason: unknown;
    instance.get('/ours', { handlerTimeout: 150, config: { bulwark: { policy: timeout(30) } } }, async (request) => {
      await new Promise<void>((resolve) => request.signal.addEventListener('abort', () => resolve(), { once: true }));
      reason = request.signal.reason;
      await sleep(200);
      return { late: true };
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    connection.send('/ours');
    expect((await connection.read()).status).to.equal(503);
    await sleep(300);
    expect(connection.pending).to.equal(0);
    connection.close();
    expect((reason as Error).name).to.equal('TimeoutError');
    expect(warnings()).to.deep.equal([]);
  });

  it('supports every handler style: return a value, reply.send, return reply, sync', async () => {
    const instance = await build();
    const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 10_000 });
    const config = { bulwark: { policy: breaker } };
    instance.get('/return', { config }, async () => ({ style: 'return' }));
    instance.get('/send', { config }, (_request, reply) => {
      setTimeout(() => reply.send({ style: 'send' }), 10);
    });
    instance.get('/reply', { config }, async (_request, reply) => {
      reply.send({ style: 'reply' });
      return reply;
    });
    instance.get('/sync', { config }, () => ({ style: 'sync' }));
    const s = await listen(instance);
    for (const style of ['return', 'send', 'reply', 'sync']) {
      expect((await request(s, `/${style}`)).json).to.deep.equal({ style });
    }
    expect(breaker.stats().totals.successes).to.equal(4);
    expect(warnings()).to.deep.equal([]);
  });

  it('lets Fastify answer a handler error nothing replaces (its error handler, its status)', async () => {
    const instance = await build();
    instance.setErrorHandler((error, _request, reply) => {
      void reply.code(500).send({ handled: (error as Error).message });
    });
    instance.get('/throws', { config: { bulwark: { policy: pipeline() } } }, async () => {
      throw new Error('boom');
    });
    const s = await listen(instance);
    expect((await request(s, '/throws')).json).to.deep.equal({ handled: 'boom' });
  });

  it('guards routes of child plugins registered after it, and leaves unconfigured routes alone', async () => {
    const instance = await build();
    const open = circuitBreaker();
    open.forceOpen();
    await instance.register(async (child) => {
      child.get('/child', { config: { bulwark: { policy: open } } }, async () => ({ child: true }));
      child.get('/plain', async () => ({ plain: true }));
    });
    const s = await listen(instance);
    expect((await request(s, '/child')).status).to.equal(503);
    expect((await request(s, '/plain')).json).to.deep.equal({ plain: true });
  });

  it('refuses a config.bulwark that is not an object, at registration', async () => {
    const instance = await build();
    expect(() => instance.get('/bad', { config: { bulwark: 'nope' as never } }, async () => ({}))).to.throw(TypeError, /config\.bulwark/);
  });

  it('leaves Fastify its own request.signal and reply.send on unguarded routes, and patches only this app\'s replies', async () => {
    const instance = await build();
    const seen: Record<string, unknown> = {};
    instance.get('/plain', async (request, reply) => {
      seen.signal = request.signal;
      seen.aborted = request.signal.aborted;
      seen.proto = Object.getPrototypeOf(reply);
      return { plain: true };
    });
    instance.get('/guarded', { config: { bulwark: { policy: timeout(1000) } } }, async (request, reply) => {
      seen.guardedSignal = request.signal;
      seen.guardedProto = Object.getPrototypeOf(reply);
      return { guarded: true };
    });
    const other = Fastify({ logger: false });
    let otherReplyProto: object | undefined;
    other.get('/other', async (_request, reply) => {
      otherReplyProto = Object.getPrototypeOf(reply) as object;
      return {};
    });
    const s = await listen(instance);
    expect((await request(s, '/guarded')).json).to.deep.equal({ guarded: true });
    expect((await request(s, '/plain')).json).to.deep.equal({ plain: true });
    expect(seen.signal).to.be.instanceOf(AbortSignal).and.not.equal(seen.guardedSignal);
    expect(seen.aborted).to.equal(false);
    await other.inject({ url: '/other' });
    await other.close();
    const owner = (proto: object): object => {
      let o: object | null = proto;
      while (o !== null && !Object.hasOwn(o, 'send')) o = Object.getPrototypeOf(o) as object | null;
      return o!;
    };
    // The guard's `send` sits on this app's Reply prototype, never on Fastify's shared one.
    expect(owner(seen.guardedProto as object)).to.not.equal(owner(otherReplyProto!));
    expect(warnings()).to.deep.equal([]);
  });
  // What makes a guarded Fastify request cheap: the client going away is heard through one
  // listener per connection, and a reply that ends within send needs no listener at all.
  it('listens to the connection once, not to each guarded response', async () => {
    const instance = await build();
    const counts: Array<{ response: number; socket: number }> = [];
    const count = (request: FastifyRequest, reply: FastifyReply): void =>
      void counts.push({ response: reply.raw.listenerCount('close'), socket: request.raw.socket.listenerCount('close') });
    instance.get('/plain', async (request, reply) => {
      count(request, reply);
      return {};
    });
    instance.get('/guarded', { config: { bulwark: { policy: timeout(1000) } } }, async (request, reply) => {
      count(request, reply);
      return {};
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    try {
      for (const path of ['/plain', '/guarded', '/guarded', '/guarded']) {
        connection.send(path);
        expect((await connection.read()).status).to.equal(200);
      }
    } finally {
      connection.close();
    }
    const [plain, ...guarded] = counts;
    for (const seen of guarded) expect(seen.response, 'close listeners on a guarded response').to.equal(plain!.response);
    expect(guarded.map((seen) => seen.socket)).to.deep.equal([plain!.socket + 1, plain!.socket + 1, plain!.socket + 1]);
  });
  // app.inject (light-my-request) is how most Fastify apps are tested: its socket is a
  // stand-in that never closes, so the end of each reply must be heard without it.
  it('answers and returns every permit under app.inject, for a plain, a streamed and a timed-out reply', async () => {
    const instance = await build();
    const gate = bulkhead({ limit: 1 });
    instance.get('/plain', { config: { bulwark: { policy: gate } } }, async () => ({ ok: true }));
    instance.get('/stream', { config: { bulwark: { policy: gate } } }, async (_request, reply) => {
      const body = new Readable({ read() {} });
      setTimeout(() => {
        body.push('streamed');
        body.push(null);
      }, 20);
      return reply.send(body);
    });
    instance.get('/slow', { config: { bulwark: { policy: pipeline(gate, timeout(30)) } } }, async () => {
      await sleep(80);
      return { late: true };
    });
    const seen: Array<[number, string, number]> = [];
    for (const url of ['/plain', '/stream', '/slow', '/plain']) {
      const answer = await instance.inject({ url });
      seen.push([answer.statusCode, answer.body.slice(0, 20), gate.active]);
    }
    expect(seen).to.deep.equal([
      [200, '{"ok":true}', 0],
      [200, 'streamed', 0],
      [503, '{"error":"Service Un', 0],
      [200, '{"ok":true}', 0],
    ]);
    await sleep(80);
    expect(gate.active).to.equal(0);
    expect(warnings()).to.deep.equal([]);
  });
  it('returns the permit of a hijacked reply when its raw response ends, while the handler still works', async () => {
    const instance = await build();
    const gate = bulkhead({ limit: 1 });
    let finished = 0;
    instance.get('/hijacked', { config: { bulwark: { policy: gate } } }, async (_request, reply) => {
      reply.hijack();
      reply.raw.end('done');
      await sleep(300);
      finished++;
    });
    const s = await listen(instance);
    const connection = await RawConnection.open(s.port);
    try {
      for (let i = 0; i < 3; i++) {
        connection.send('/hijacked');
        const answer = await connection.read();
        expect([answer.status, answer.body]).to.deep.equal([200, 'done']);
      }
    } finally {
      connection.close();
    }
    expect(finished, 'the handlers were still working').to.equal(0);
    expect(gate.stats()).to.include({ admitted: 3, rejected: 0 });
  });
  // Fastify's send throws for some payloads (an object on a text/plain reply); its own
  // handler wrapper turns that into the error answer, and so must the guard.
  it('answers a payload Fastify refuses with Fastify\'s 500 (or the fallback), counted as a failure, returned or sent', async () => {
    const instance = await build();
    const breaker = circuitBreaker({ consecutiveFailures: 10, openMs: 10_000 });
    instance.get('/returned', { config: { bulwark: { policy: breaker } } }, async (_request, reply) => {
      reply.type('text/plain');
      return { not: 'text' };
    });
    instance.get('/sent', { config: { bulwark: { policy: breaker } } }, (_request, reply) => {
      reply.type('text/plain');
      reply.send({ not: 'text' });
    });
    instance.get('/degraded', { config: { bulwark: { policy: breaker, fallback: 'stand-in' } } }, async (_request, reply) => {
      reply.type('text/plain');
      return { not: 'text' };
    });
    const s = await listen(instance);
    for (const path of ['/returned', '/sent']) {
      const answer = await request(s, path);
      expect(answer.status, path).to.equal(500);
      expect(answer.json, path).to.include({ code: 'FST_ERR_REP_INVALID_PAYLOAD_TYPE' });
    }
    const degraded = await request(s, '/degraded');
    expect([degraded.status, degraded.json]).to.deep.equal([200, { data: 'stand-in', source: 'fallback', status: 'degraded', reason: 'error' }]);
    expect(breaker.stats().totals).to.include({ failures: 3, successes: 0 });
    expect(watchdog.events).to.deep.equal([]);
  });
  // Over HTTP/2 a connection carries many streams, and a client cancels one of them
  // without closing it: each response is listened to, not the connection.
  it('over HTTP/2, hears a cancelled stream: the signal aborts and the permit comes back', async () => {
    const gate = bulkhead({ limit: 1 });
    const h2 = Fastify({ http2: true, logger: false });
    let reason: unknown;
    try {
      await h2.register(bulwark);
      h2.get('/ok', { config: { bulwark: { policy: gate } } }, async () => ({ ok: true }));
      h2.get('/wait', { config: { bulwark: { policy: gate } } }, async (request) => {
        await new Promise<void>((resolve) => request.signal.addEventListener('abort', () => resolve(), { once: true }));
        reason = request.signal.reason;
      });
      await h2.listen({ port: 0, host: '127.0.0.1' });
      const client = http2.connect(`http://127.0.0.1:${(h2.server.address() as { port: number }).port}`);
      try {
        const get = (path: string): Promise<string> =>
          new Promise((resolve, reject) => {
            const stream = client.request({ ':path': path });
            let body = '';
            stream.on('data', (chunk: Buffer) => void (body += chunk.toString()));
            stream.on('end', () => resolve(body));
            stream.on('error', reject);
          });
        expect(await get('/ok')).to.equal('{"ok":true}');
        const waiting = client.request({ ':path': '/wait' });
        waiting.on('error', () => {});
        await eventually(() => gate.active === 1, 1000, 'handler running');
        waiting.close(http2.constants.NGHTTP2_CANCEL);
        await eventually(() => gate.active === 0 && reason !== undefined, 1000, 'permit back');
        expect(isClientDisconnected(reason)).to.equal(true);
        expect(await get('/ok'), 'the connection still serves').to.equal('{"ok":true}');
      } finally {
        client.close();
      }
    } finally {
      await h2.close();
    }
  });
});
