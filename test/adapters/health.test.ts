// The ready-made health route of each adapter, over real sockets: 200 while every guard is
// fine, 503 while a breaker is open, the health as JSON, never cached.

import http from 'node:http';
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import { expect } from 'chai';
import express from 'express';
import Fastify, { type FastifyInstance } from 'fastify';
import Koa from 'koa';
import { healthRoute as expressHealth } from '../../adapters/express.js';
import { healthRoute as fastifyHealth } from '../../adapters/fastify.js';
import { healthRoute as koaHealth } from '../../adapters/koa.js';
import { bulkhead } from '../../lib/bulkhead.js';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { health } from '../../lib/health.js';
import { pipeline } from '../../lib/pipeline.js';
import type { Policies } from '../../lib/observe.js';
import { request, serveOnLoopback, type TestServer } from './support.js';

interface Mount {
  name: string;
  /** Serves `healthRoute(policies)` at GET /health. */
  start(policies: Policies): Promise<TestServer>;
  /** Makes the route (without serving it). */
  make(policies: unknown): unknown;
}

const mounts: Mount[] = [
  {
    name: 'express',
    async start(policies) {
      const app = express();
      app.get('/health', expressHealth(policies));
      return serveOnLoopback(http.createServer(app));
    },
    make: (policies) => expressHealth(policies as Policies),
  },
  {
    name: 'koa',
    async start(policies) {
      const app = new Koa();
      const router = new Router();
      router.get('/health', koaHealth(policies));
      app.use(router.routes());
      return serveOnLoopback(http.createServer(app.callback()));
    },
    make: (policies) => koaHealth(policies as Policies),
  },
  {
    name: 'fastify',
    async start(policies) {
      const app: FastifyInstance = Fastify({ logger: false, forceCloseConnections: true });
      app.get('/health', fastifyHealth(policies));
      await app.listen({ port: 0, host: '127.0.0.1' });
      const port = (app.server.address() as AddressInfo).port;
      return { port, url: `http://127.0.0.1:${port}`, errors: [], logs: [], close: () => app.close() };
    },
    make: (policies) => fastifyHealth(policies as Policies),
  },
];

for (const mount of mounts) {
  describe(`healthRoute: ${mount.name}`, () => {
    let server: TestServer | undefined;
    afterEach(async () => {
      await server?.close();
      server = undefined;
    });

    it('answers 200 with the health as JSON while every guard is fine, never cached', async () => {
      const breaker = circuitBreaker({ name: 'prices' });
      const gate = bulkhead({ name: 'pool', limit: 2 });
      server = await mount.start([pipeline(gate, breaker)]);
      const answer = await request(server, '/health');
      expect(answer.status).to.equal(200);
      expect(answer.headers['content-type']).to.equal('application/json');
      expect(answer.headers['cache-control']).to.equal('no-store');
      expect(answer.json).to.deep.equal(JSON.parse(JSON.stringify(health([pipeline(gate, breaker)]))));
      expect((answer.json as { guards: Array<{ name: string; state: string }> }).guards.map(({ name, state }) => `${name}:${state}`)).to.deep.equal(['pool:ok', 'prices:closed']);
    });

    it('answers 503 while a breaker is open, and 200 again once it closes; it reads the guards on every request', async () => {
      const breaker = circuitBreaker({ name: 'prices' });
      server = await mount.start(breaker);
      expect((await request(server, '/health')).status).to.equal(200);
      breaker.forceOpen();
      const degraded = await request(server, '/health');
      expect(degraded.status).to.equal(503);
      expect(degraded.headers['content-type']).to.equal('application/json');
      expect(degraded.json).to.include({ status: 'degraded' });
      expect((degraded.json as { guards: Array<{ state: string }> }).guards[0]!.state).to.equal('open');
      breaker.reset();
      const healed = await request(server, '/health');
      expect(healed.status).to.equal(200);
      expect(healed.json).to.include({ status: 'ok' });
    });

    it('refuses what is not a policy when the route is made', () => {
      expect(() => mount.make(42)).to.throw(TypeError, /healthRoute: policies/);
      expect(() => mount.make([circuitBreaker(), {}])).to.throw(TypeError, /healthRoute: policies\[1\]/);
    });
  });
}
