// A small Koa service in front of a flaky catalog: breaker + bulkhead + timeout on the
// route, and degraded answers from the cache (or a fallback) when the catalog fails.
//
//   npx tsx examples/koa.ts            serves on PORT (default 3000)
//   npx tsx examples/koa.ts --smoke    runs a scripted check and exits

import Router from '@koa/router';
import Koa from 'koa';
import { guard } from '../adapters/koa.js';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { pipeline } from '../lib/pipeline.js';
import { timeout } from '../lib/timeout.js';
import { runSmoke, startFlakyUpstream } from './flaky-upstream.js';

const smoke = process.argv.includes('--smoke');
const upstream = await startFlakyUpstream(smoke ? 'healthy' : 'flaky');

const catalog = pipeline(
  bulkhead({ name: 'catalog', limit: 10, queue: 20 }),
  timeout(500),
  circuitBreaker({ name: 'catalog', consecutiveFailures: 3, openMs: 5_000 }),
);

const router = new Router();
router.get(
  '/products/:id',
  guard(catalog, {
    cache: { ttlMs: 60_000, maxEntries: 1_000 },
    fallback: ({ request }) => ({ id: request.path.split('/').pop(), name: 'temporarily unavailable' }),
  }),
  async (ctx) => {
    const answer = await fetch(`${upstream.url}/products/${ctx.params.id}`, { signal: ctx.signal });
    ctx.status = answer.ok ? 200 : 502;
    ctx.body = await answer.json();
  },
);

const app = new Koa();
app.use(router.routes());

const server = app.listen(smoke ? 0 : Number(process.env.PORT ?? 3000), '127.0.0.1', async () => {
  const { port } = server.address() as { port: number };
  if (!smoke) return console.log(`koa example on http://127.0.0.1:${port}/products/1 (upstream is flaky)`);
  const passed = await runSmoke(`http://127.0.0.1:${port}`, upstream);
  server.closeAllConnections();
  server.close();
  await upstream.close();
  process.exit(passed ? 0 : 1);
});
