// A client that leaves while a slow middleware ahead of the guard works: by the time the
// guard runs, the connection's close is past. Nothing may then hold a permit for good.

import http from 'node:http';
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import { expect } from 'chai';
import express from 'express';
import Fastify from 'fastify';
import Koa from 'koa';
import bulwark from '../../adapters/fastify.js';
import { guard as expressGuard } from '../../adapters/express.js';
import { guard as koaGuard } from '../../adapters/koa.js';
import { bulkhead, type Bulkhead } from '../../lib/bulkhead.js';
import { abandon, request, serveOnLoopback, sleep, watchedServers, type TestServer } from './support.js';

/** A server whose guarded GET /slow runs behind 80 ms of middleware; `ran` counts handler runs. */
type Mount = (gate: Bulkhead, ran: { count: number }) => Promise<TestServer>;

const mounts: Record<string, Mount> = {
  async express(gate, ran) {
    const app = express();
    const slow = async (_req: express.Request, _res: express.Response, next: express.NextFunction): Promise<void> => {
      await sleep(80);
      next();
    };
    const handler = (_req: express.Request, res: express.Response): void => {
      ran.count++;
      res.json({ ok: true });
    };
    app.get('/slow', slow, expressGuard(gate), handler);
    app.get('/slow-wrapped', slow, expressGuard(gate).wrap(handler));
    return serveOnLoopback(http.createServer(app));
  },
  async koa(gate, ran) {
    const app = new Koa();
    const router = new Router();
    const slow = async (_ctx: Koa.Context, next: Koa.Next): Promise<void> => {
      await sleep(80);
      await next();
    };
    const handler = (ctx: Koa.Context): void => {
      ran.count++;
      ctx.body = { ok: true };
    };
    router.get('/slow', slow, koaGuard(gate), handler);
    router.get('/slow-wrapped', slow, koaGuard(gate).wrap(handler));
    app.use(router.routes());
    return serveOnLoopback(http.createServer(app.callback()));
  },
  async fastify(gate, ran) {
    const app = Fastify({ logger: false, forceCloseConnections: true });
    await app.register(bulwark);
    const options = { config: { bulwark: { policy: gate } }, preHandler: async () => void (await sleep(80)) };
    const handler = async (): Promise<{ ok: boolean }> => {
      ran.count++;
      return { ok: true };
    };
    app.get('/slow', options, handler);
    app.get('/slow-wrapped', options, handler);
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    return { port, url: `http://127.0.0.1:${port}`, errors: [], logs: [], close: () => app.close() };
  },
};

for (const [name, mount] of Object.entries(mounts)) {
  describe(`client gone before the guard ran: ${name}`, function () {
    this.timeout(5000);
    const current = watchedServers();

    for (const path of ['/slow', '/slow-wrapped']) {
      it(`${path}: holds no permit, runs no handler, and the next request gets the only place`, async () => {
        const gate = bulkhead({ limit: 1 });
        const ran = { count: 0 };
        const server = (current.server = await mount(gate, ran));
        await abandon(server, path, 20);
        await sleep(150);
        expect(gate.active, 'permits held').to.equal(0);
        expect(ran.count, 'handler runs').to.equal(0);
        const answer = await request(server, path);
        expect(answer.status).to.equal(200);
        expect(ran.count).to.equal(1);
        expect(gate.active).to.equal(0);
        expect(current.watchdog.events).to.deep.equal([]);
      });
    }
  });
}
