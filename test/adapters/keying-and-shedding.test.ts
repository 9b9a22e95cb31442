// Rate-limit keying by the client IP as each framework resolves it (trust-proxy settings,
// IPv6 /64, IPv4-mapped IPv6), and load shedding under a blocked event loop, over real
// sockets in Express, Koa and Fastify.

import { expect } from 'chai';
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import Fastify from 'fastify';
import Koa from 'koa';
import { guard as expressGuard } from '../../adapters/express.js';
import bulwark from '../../adapters/fastify.js';
import { guard as koaGuard } from '../../adapters/koa.js';
import { loadShedder } from '../../lib/load-shedder.js';
import { sharedSampler } from '../../lib/pressure-sampler.js';
import type { Policy } from '../../lib/policy.js';
import { rateLimit } from '../../lib/rate-limit.js';

interface Server {
  url: string;
  close(): Promise<void>;
}

type Start = (policy: Policy, trustProxy: boolean) => Promise<Server>;

async function listen(server: http.Server): Promise<Server> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const frameworks: Array<[string, Start]> = [
  [
    'express',
    (policy, trustProxy) => {
      const app = express();
      if (trustProxy) app.set('trust proxy', true);
      app.get('/r', expressGuard(policy), (req, res) => void res.json({ ip: req.ip }));
      return listen(http.createServer(app));
    },
  ],
  [
    'koa',
    (policy, trustProxy) => {
      const app = new Koa();
      app.proxy = trustProxy;
      app.silent = true;
      const limited = koaGuard(policy);
      app.use(async (ctx, next) => {
        if (ctx.path !== '/r') return next();
        await limited(ctx, async () => {
          ctx.body = { ip: ctx.ip };
        });
      });
      return listen(http.createServer(app.callback()));
    },
  ],
  [
    'fastify',
    async (policy, trustProxy) => {
      const app = Fastify({ trustProxy, forceCloseConnections: true });
      await app.register(bulwark);
      app.get('/r', { config: { bulwark: { policy } } }, async (request) => ({ ip: request.ip }));
      await app.listen({ port: 0, host: '127.0.0.1' });
      return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, close: () => app.close() };
    },
  ],
];

async function status(server: Server, forwardedFor?: string): Promise<number> {
  const res = await fetch(`${server.url}/r`, { headers: forwardedFor === undefined ? {} : { 'x-forwarded-for': forwardedFor } });
  await res.arrayBuffer();
  return res.status;
}

for (const [name, start] of frameworks) {
  describe(`client keying and shedding over HTTP: ${name}`, function () {
    this.timeout(10_000);
    let server: Server | undefined;
    afterEach(async () => {
      await server?.close();
      server = undefined;
      // The process-wide sampler would otherwise keep sampling for 30 s, and re-arm its
      // timer inside later tests that fake the timers.
      sharedSampler.stop();
    });

    it('keys by X-Forwarded-For only when the app trusts its proxy', async () => {
      server = await start(rateLimit({ limit: 1, windowMs: 60_000 }), true);
      expect(await status(server, '203.0.113.1')).to.equal(200);
      expect(await status(server, '203.0.113.1')).to.equal(429);
      expect(await status(server, '203.0.113.2'), 'another client, another budget').to.equal(200);
    });

    it('ignores X-Forwarded-For when the app does not trust a proxy', async () => {
      server = await start(rateLimit({ limit: 1, windowMs: 60_000 }), false);
      expect(await status(server, '203.0.113.1')).to.equal(200);
      expect(await status(server, '203.0.113.2'), 'a spoofed header is the same client').to.equal(429);
    });

    it('keys IPv6 clients by their /64 and IPv4-mapped IPv6 by the IPv4 address', async () => {
      server = await start(rateLimit({ limit: 1, windowMs: 60_000 }), true);
      expect(await status(server, '2001:db8:1:2::1')).to.equal(200);
      expect(await status(server, '2001:db8:1:2:ffff:ffff:ffff:9'), 'same /64').to.equal(429);
      expect(await status(server, '2001:db8:1:3::1'), 'another /64').to.equal(200);
      expect(await status(server, '::ffff:198.51.100.7')).to.equal(200);
      expect(await status(server, '198.51.100.7'), 'the same IPv4 client').to.equal(429);
    });

    it('sheds with 503 overloaded while the event loop is blocked, and recovers by itself', async () => {
      server = await start(loadShedder({ name: `shed-${name}`, maxEventLoopDelayMs: 100, sampleIntervalMs: 20 }), false);
      expect(await status(server)).to.equal(200);
      const blockedUntil = performance.now() + 300;
      while (performance.now() < blockedUntil) {
        // A synchronous stall, as a CPU-bound handler or a huge JSON.parse would make.
      }
      const shed = await fetch(`${server.url}/r`);
      expect(shed.status).to.equal(503);
      expect(shed.headers.get('retry-after')).to.equal('1');
      expect(await shed.json()).to.deep.include({ reason: 'overloaded' });
      let recovered = false;
      for (let i = 0; i < 50 && !recovered; i++) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        recovered = (await status(server)) === 200;
      }
      expect(recovered, 'admits again once the loop is responsive').to.equal(true);
    });
  });
}
