// A small Fastify service in front of a flaky catalog: breaker + bulkhead + timeout on the
// route, and degraded answers from the cache (or a fallback) when the catalog fails.
//
//   npx tsx examples/fastify.ts            serves on PORT (default 3000)
//   npx tsx examples/fastify.ts --smoke    runs a scripted check and exits

import Fastify from 'fastify';
import bulwark from '../adapters/fastify.js';
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

const app = Fastify({ logger: !smoke });
// Register (and await) the plugin before the routes it guards.
await app.register(bulwark);

app.get<{ Params: { id: string } }>(
  '/products/:id',
  {
    config: {
      bulwark: {
        policy: catalog,
        cache: { ttlMs: 60_000, maxEntries: 1_000 },
        fallback: ({ request }) => ({ id: request.path.split('/').pop(), name: 'temporarily unavailable' }),
      },
    },
  },
  async (request, reply) => {
    const answer = await fetch(`${upstream.url}/products/${request.params.id}`, { signal: request.signal });
    return reply.code(answer.ok ? 200 : 502).send(await answer.json());
  },
);

const address = await app.listen({ port: smoke ? 0 : Number(process.env.PORT ?? 3000), host: '127.0.0.1' });
if (smoke) {
  const passed = await runSmoke(address, upstream);
  await app.close();
  await upstream.close();
  process.exit(passed ? 0 : 1);
}
