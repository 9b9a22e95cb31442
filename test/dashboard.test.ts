import { expect } from 'chai';
import { EventEmitter, once } from 'node:events';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import express from 'express';
import Fastify from 'fastify';
import Koa from 'koa';
import sinon from 'sinon';
import { dashboard, type DashboardHandler, type Snapshot } from '../adapters/dashboard.js';
import { bulkhead } from '../lib/bulkhead.js';
import { chaos } from '../lib/chaos.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { Hub } from '../lib/dashboard/hub.js';
import type { Emitter } from '../lib/events.js';
import { fallback } from '../lib/fallback.js';
import { keyed } from '../lib/keyed.js';
import { pipeline } from '../lib/pipeline.js';
import type { Policy } from '../lib/policy.js';
import { rateLimit } from '../lib/rate-limit.js';

interface SseEvent {
  event: string;
  data: unknown;
}

function parseEvents(text: string): SseEvent[] {
  const events: SseEvent[] = [];
  for (const block of text.split('\n\n')) {
    const lines = block.split('\n');
    const event = lines.find((l) => l.startsWith('event: '))?.slice(7);
    const data = lines.find((l) => l.startsWith('data: '))?.slice(6);
    if (event !== undefined && data !== undefined) events.push({ event, data: JSON.parse(data) });
  }
  return events;
}

/** A response a hub can stream to, recording what it was sent. */
class FakeResponse extends EventEmitter {
  status = 0;
  text = '';
  ended = false;
  writableNeedDrain = false;
  socket = undefined;
  writeHead(status: number): this {
    this.status = status;
    return this;
  }
  write(chunk: string): boolean {
    this.text += chunk;
    return true;
  }
  end(): this {
    this.ended = true;
    this.emit('close');
    return this;
  }
  get events(): SseEvent[] {
    return parseEvents(this.text);
  }
}

function connect(hub: Hub): { req: EventEmitter; res: FakeResponse } {
  const req = new EventEmitter();
  const res = new FakeResponse();
  hub.connect(req as IncomingMessage, res as unknown as ServerResponse);
  return { req, res };
}

function listened(policy: Policy): boolean {
  const events = (policy as unknown as { events?: Emitter<object> }).events;
  return events !== undefined && events.active;
}

const fail = (): Promise<never> => Promise.reject(new Error('down'));

describe('dashboard hub', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers({ now: 1_700_000_000_000 });
  });
  afterEach(() => clock.restore());

  const options = { intervalMs: 1000, historyLength: 60, title: 'test' };

  it('subscribes to the guards and runs its timer only while a client is connected', async () => {
    const breaker = circuitBreaker({ name: 'prices' });
    const hub = new Hub([pipeline(breaker)], options);
    expect(listened(breaker)).to.equal(false);
    expect(clock.countTimers()).to.equal(0);

    const a = connect(hub);
    const b = connect(hub);
    expect(listened(breaker)).to.equal(true);
    expect(clock.countTimers()).to.equal(1);
    expect(hub.connections).to.equal(2);

    a.req.emit('close');
    expect(hub.connections).to.equal(1);
    expect(hub.running).to.equal(true);
    b.res.emit('close');
    expect(hub.connections).to.equal(0);
    expect(hub.running).to.equal(false);
    expect(clock.countTimers()).to.equal(0);
    expect(listened(breaker)).to.equal(false);
  });

  it('sends an init event at once, then a snapshot per interval with rates per second', async () => {
    const breaker = circuitBreaker({ name: 'prices', consecutiveFailures: 3 });
    const limiter = rateLimit({ name: 'per-client', limit: 2, windowMs: 60_000 });
    const hub = new Hub([breaker, limiter], options);
    const { res } = connect(hub);
    expect(res.status).to.equal(200);
    const [init] = res.events;
    expect(init!.event).to.equal('init');
    expect(init!.data).to.deep.include({ title: 'test', intervalMs: 1000, historyLength: 60, history: {} });
    const first = (init!.data as { snapshot: Snapshot }).snapshot;
    expect(first.guards.map((g) => [g.id, g.name, g.kind, g.state])).to.deep.equal([
      [1, 'prices', 'circuit-breaker', 'closed'],
      [2, 'per-client', 'rate-limit', 'ok'],
    ]);

    for (let i = 0; i < 4; i++) await breaker.execute(() => 'ok');
    for (let i = 0; i < 3; i++) await breaker.execute(fail).catch(() => {});
    for (let i = 0; i < 2; i++) await breaker.execute(() => 'ok').catch(() => {});
    for (let i = 0; i < 3; i++) await limiter.execute(() => 'ok').catch(() => {});
    await clock.tickAsync(1000);

    const snapshots = res.events.filter((e) => e.event === 'snapshot').map((e) => e.data as Snapshot);
    expect(snapshots).to.have.length(1);
    const [prices, perClient] = snapshots[0]!.guards;
    expect(snapshots[0]!.status).to.equal('degraded');
    expect(snapshots[0]!.t).to.equal(1_700_000_001_000);
    expect(prices).to.deep.include({ state: 'open', rate: { calls: 7, failures: 3, rejected: 2, reasons: { circuit_open: 2 } } });
    expect(perClient!.rate).to.deep.equal({ calls: 2, failures: 0, rejected: 1, reasons: { rate_limited: 1 } });

    await clock.tickAsync(2000);
    const later = res.events.filter((e) => e.event === 'snapshot').map((e) => e.data as Snapshot);
    expect(later).to.have.length(3);
    expect(later[2]!.guards[0]!.rate.calls).to.equal(0);
    hub.close();
  });

  it('keeps the history across reconnections and sends it with init', async () => {
    const breaker = circuitBreaker({ name: 'prices' });
    const hub = new Hub([breaker], options);
    const first = connect(hub);
    await breaker.execute(() => 1);
    await clock.tickAsync(1000);
    await breaker.execute(() => 1);
    await breaker.execute(() => 1);
    await clock.tickAsync(1000);
    first.req.emit('close');
    // Not watched: not counted.
    await breaker.execute(() => 1);
    await clock.tickAsync(5000);
    const second = connect(hub);
    const init = second.res.events[0]!.data as { history: Record<string, number[][]> };
    expect(init.history).to.deep.equal({ 1: [[1_700_000_001_000, 1, 0, 0], [1_700_000_002_000, 2, 0, 0]] });
    await clock.tickAsync(1000);
    const snapshot = second.res.events[1]!.data as Snapshot;
    expect(snapshot.guards[0]!.rate.calls).to.equal(0);
    hub.close();
  });

  it('counts the calls of a fallback and of chaos from their stats', async () => {
    const rescue = fallback('stale', { name: 'rescue' });
    const monkey = chaos({ name: 'monkey', fault: { rate: 1 }, enabled: false });
    await rescue.execute(fail);
    const hub = new Hub([rescue, monkey], options);
    const { res } = connect(hub);
    await rescue.execute(() => 'fresh');
    await rescue.execute(fail);
    await rescue.execute(fail);
    await monkey.execute(() => 1);
    monkey.enabled = true;
    await monkey.execute(() => 1).catch(() => {});
    await clock.tickAsync(1000);
    const [r, m] = (res.events[1]!.data as Snapshot).guards;
    expect(r!.rate).to.deep.include({ calls: 3, failures: 2 });
    expect(m!.rate).to.deep.include({ calls: 2, failures: 1 });
    hub.close();
  });

  it('skips snapshots for a client that does not keep up', async () => {
    const hub = new Hub([circuitBreaker()], options);
    const slow = connect(hub);
    const fast = connect(hub);
    slow.res.writableNeedDrain = true;
    await clock.tickAsync(3000);
    expect(slow.res.events.filter((e) => e.event === 'snapshot')).to.have.length(0);
    expect(fast.res.events.filter((e) => e.event === 'snapshot')).to.have.length(3);
    hub.close();
  });

  it('shows the policies a keyed guard creates while watched, and drops the evicted ones', async () => {
    const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}` }), { name: 'per-host', key: (_r, c) => String(c.host), maxKeys: 1 });
    const hub = new Hub([perHost], options);
    const { res } = connect(hub);
    await perHost.execute(() => 1, undefined, { host: 'a' });
    await clock.tickAsync(1000);
    await perHost.execute(() => 1, undefined, { host: 'b' });
    await clock.tickAsync(1000);
    const names = res.events.slice(1).map((e) => (e.data as Snapshot).guards.map((g) => g.name));
    expect(names).to.deep.equal([
      ['per-host', 'upstream:a'],
      ['per-host', 'upstream:b'],
    ]);
    hub.close();
  });

  it('close() ends every stream, stops, and answers later streams with 204', () => {
    const breaker = circuitBreaker();
    const hub = new Hub([breaker], options);
    const a = connect(hub);
    const b = connect(hub);
    hub.close();
    expect([a.res.ended, b.res.ended]).to.deep.equal([true, true]);
    expect(hub.connections).to.equal(0);
    expect(clock.countTimers()).to.equal(0);
    expect(listened(breaker)).to.equal(false);
    expect(connect(hub).res.status).to.equal(204);
  });

  it('handles 100 guards in one snapshot', async () => {
    const guards = Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? circuitBreaker({ name: `breaker-${i}` }) : bulkhead({ name: `bulkhead-${i}`, limit: 10 })));
    const hub = new Hub(guards, options);
    const { res } = connect(hub);
    await clock.tickAsync(1000);
    const snapshot = res.events[1]!.data as Snapshot;
    expect(snapshot.guards).to.have.length(100);
    expect(new Set(snapshot.guards.map((g) => g.id)).size).to.equal(100);
    hub.close();
  });
});

/** Reads a stream of server-sent events until `count` events arrived. */
async function readEvents(url: string, count: number): Promise<{ status: number; type: string | null; events: SseEvent[] }> {
  const controller = new AbortController();
  const response = await fetch(url, { signal: controller.signal });
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  try {
    while (parseEvents(text).length < count) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    controller.abort();
  }
  return { status: response.status, type: response.headers.get('content-type'), events: parseEvents(text) };
}

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 2000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function listen(server: http.Server): Promise<string> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function shut(server: http.Server): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  // fetch keeps its connections alive: end them rather than wait for their idle timeout.
  server.closeAllConnections();
  return closed;
}

interface Mounted {
  base: string;
  close(): Promise<void>;
}

const mounts: Record<string, (handler: DashboardHandler, path: string) => Promise<Mounted>> = {
  async 'plain node'(handler) {
    const server = http.createServer(handler);
    const base = await listen(server);
    return { base, close: () => shut(server) };
  },
  async express(handler, path) {
    const app = express();
    app.use(path, handler);
    app.get('/api', (_req, res) => {
      res.json({ ok: true });
    });
    const server = http.createServer(app);
    return { base: (await listen(server)) + path, close: () => shut(server) };
  },
  async koa(handler, path) {
    const app = new Koa();
    const router = new Router();
    router.all(`${path}{/*rest}`, (ctx) => {
      ctx.respond = false;
      handler(ctx.req, ctx.res);
    });
    app.use(router.routes());
    const server = http.createServer(app.callback());
    return { base: (await listen(server)) + path, close: () => shut(server) };
  },
  async fastify(handler, path) {
    const app = Fastify({ forceCloseConnections: true });
    const hijack = (request: { raw: IncomingMessage }, reply: { hijack(): void; raw: ServerResponse }): void => {
      reply.hijack();
      handler(request.raw, reply.raw);
    };
    app.all(path, hijack);
    app.all(`${path}/*`, hijack);
    await app.listen({ port: 0, host: '127.0.0.1' });
    return { base: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}${path}`, close: () => app.close() };
  },
};

describe('bulwark/dashboard', () => {
  for (const [framework, mount] of Object.entries(mounts)) {
    const paths = framework === 'plain node' ? [''] : ['/dashboard', '/ops/bulwark'];
    for (const path of paths) {
      it(`serves the page and the live stream in ${framework}${path ? ` under ${path}` : ''}`, async () => {
        const breaker = circuitBreaker({ name: 'prices', consecutiveFailures: 1 });
        const handler = dashboard([breaker], { intervalMs: 100, title: 'Shop <api>' });
        const { base, close } = await mount(handler, path);
        try {
          if (path !== '') {
            const redirect = await fetch(`${base}?x=1`, { redirect: 'manual' });
            expect(redirect.status).to.equal(302);
            const target = new URL(redirect.headers.get('location')!, `${base}?x=1`);
            expect(target.pathname + target.search).to.equal(`${path}/?x=1`);
          }
          const page = await fetch(`${base}/`);
          expect(page.status).to.equal(200);
          expect(page.headers.get('content-type')).to.equal('text/html; charset=utf-8');
          expect(page.headers.get('content-security-policy')).to.match(/script-src 'sha256-[A-Za-z0-9+/=]+'/);
          const html = await page.text();
          expect(html).to.include('<title>Shop &#60;api&#62;</title>');
          expect(html).to.include("new EventSource('events')");
          // Relative URLs only: nothing in the page points at the server's root.
          expect(html).to.not.match(/(?:src|href|action)=["']?\//);

          const stream = await readEvents(`${base}/events`, 1);
          expect(stream.status).to.equal(200);
          expect(stream.type).to.equal('text/event-stream; charset=utf-8');
          expect(stream.events[0]!.event).to.equal('init');
          await until(() => handler.connections === 0, 'the stream to be let go');

          const watching = readEvents(`${base}/events`, 3);
          await until(() => handler.connections === 1, 'a connection');
          await breaker.execute(fail).catch(() => {});
          const { events } = await watching;
          const states = events.map((e) => ((e.event === 'init' ? (e.data as { snapshot: Snapshot }).snapshot : e.data) as Snapshot).guards[0]!.state);
          expect(states.at(-1)).to.equal('open');
          await until(() => handler.connections === 0, 'the stream to be let go');
        } finally {
          handler.close();
          await close();
        }
      });
    }
  }

  it('leaves other paths to the app in Express, 404s files, refuses other methods', async () => {
    const handler = dashboard(circuitBreaker());
    const { base, close } = await mounts.express!(handler, '/dashboard');
    const root = base.slice(0, -'/dashboard'.length);
    try {
      const other = await fetch(`${base}/nothing`);
      expect(other.status).to.equal(404);
      expect((await fetch(`${root}/api`)).status).to.equal(200);
      const post = await fetch(`${base}/`, { method: 'POST' });
      expect(post.status).to.equal(405);
      expect(post.headers.get('allow')).to.equal('GET, HEAD');
      const head = await fetch(`${base}/`, { method: 'HEAD' });
      expect(head.status).to.equal(200);
    } finally {
      handler.close();
      await close();
    }
    const plain = dashboard(circuitBreaker());
    const server = await mounts['plain node']!(plain, '');
    try {
      expect((await fetch(`${server.base}/favicon.ico`)).status).to.equal(404);
    } finally {
      plain.close();
      await server.close();
    }
  });

  it('close() ends open streams so the server can close, and tells tabs to stop reconnecting', async () => {
    const handler = dashboard(circuitBreaker(), { intervalMs: 100 });
    const { base, close } = await mounts['plain node']!(handler, '');
    const response = await fetch(`${base}/events`);
    const reader = response.body!.getReader();
    await reader.read();
    expect(handler.connections).to.equal(1);
    handler.close();
    for (;;) if ((await reader.read()).done) break;
    expect(handler.connections).to.equal(0);
    expect((await fetch(`${base}/events`)).status).to.equal(204);
    await close();
  });

  it('checks its options', () => {
    const breaker = circuitBreaker();
    expect(() => dashboard(breaker, { intervalMs: 50 })).to.throw(TypeError, 'dashboard: intervalMs must be at least 100, got 50');
    expect(() => dashboard(breaker, { title: '' })).to.throw(TypeError, 'dashboard: title must be a non-empty string, got ""');
    expect(() => dashboard(breaker, { interval: 1 } as never)).to.throw(TypeError, 'dashboard: unknown option "interval"');
    expect(() => dashboard(null as never)).to.throw(TypeError, 'dashboard: policies must be a policy or an iterable of policies, got null');
  });
});
