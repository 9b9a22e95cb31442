// The server of `npm run bench:overload`: one Fastify route, GET /work, whose handler burns
// WORK_MS of CPU synchronously, bare or behind one overload guard. Started by
// bench/overload.ts, a fresh process per run. Over IPC it sends { type: 'ready', port }, and
// answers 'mark' (start of the measured window) and 'stats' (what it did since the mark).
// Usage: overload-server.ts <bare | load-shedder | adaptive-concurrency | under-pressure>
// Env: WORK_MS (5), MAX_DELAY_MS (event-loop delay limit of loadShedder and under-pressure,
// default WORK_MS), SAMPLE_MS (their sampling interval, default 50).
import { performance } from 'node:perf_hooks';
import underPressure from '@fastify/under-pressure';
import { adaptiveConcurrency, loadShedder, type Policy } from 'bulwark';
import bulwark from 'bulwark/fastify';
import Fastify from 'fastify';

export type OverloadVariant = 'bare' | 'load-shedder' | 'adaptive-concurrency' | 'under-pressure';

const variant = (process.argv[2] ?? 'bare') as OverloadVariant;
const workMs = Number(process.env.WORK_MS ?? 5);
const maxDelayMs = Number(process.env.MAX_DELAY_MS ?? workMs);
const sampleMs = Number(process.env.SAMPLE_MS ?? 50);

/**
 * The work: `ms` of this process's CPU time, synchronously, as a template render or a JSON
 * transform of a large document would be. CPU time rather than wall-clock time, so that a
 * request is the same amount of work on a shared machine (its wall-clock time grows then,
 * as a real CPU-bound handler's would).
 */
function burn(ms: number): void {
  const start = process.cpuUsage();
  const us = ms * 1000;
  for (;;) {
    const used = process.cpuUsage(start);
    if (used.user + used.system >= us) return;
  }
}

const app = Fastify({ logger: false, keepAliveTimeout: 60_000 });
let policy: Policy | undefined;
let guardStats: () => Record<string, unknown> = () => ({});

switch (variant) {
  case 'bare':
    break;
  case 'load-shedder': {
    const shedder = loadShedder({ maxEventLoopDelayMs: maxDelayMs, sampleIntervalMs: sampleMs });
    policy = shedder;
    guardStats = () => ({ ...shedder.stats() });
    break;
  }
  case 'adaptive-concurrency': {
    const limiter = adaptiveConcurrency();
    policy = limiter;
    guardStats = () => ({ ...limiter.stats() });
    break;
  }
  case 'under-pressure':
    await app.register(underPressure, { maxEventLoopDelay: maxDelayMs, sampleInterval: sampleMs, retryAfter: 1 });
    break;
  default:
    throw new Error(`unknown variant ${variant as string}`);
}
if (policy !== undefined) await app.register(bulwark);

let served = 0;
app.get('/work', policy === undefined ? {} : { config: { bulwark: { policy } } }, (_request, reply) => {
  burn(workMs);
  served++;
  reply.send({ ok: true });
});

await app.listen({ port: 0, host: '127.0.0.1' });
const address = app.server.address();
process.send?.({ type: 'ready', port: typeof address === 'object' && address !== null ? address.port : 0 });

let markedAt = performance.now();
let elu0 = performance.eventLoopUtilization();
let cpu0 = process.cpuUsage();
let servedAtMark = 0;
let guardAtMark: Record<string, unknown> = {};
process.on('message', (message: { type: string }) => {
  if (message.type === 'mark') {
    markedAt = performance.now();
    elu0 = performance.eventLoopUtilization();
    cpu0 = process.cpuUsage();
    servedAtMark = served;
    guardAtMark = guardStats();
    process.send?.({ type: 'marked' });
  } else if (message.type === 'stats') {
    const cpu = process.cpuUsage(cpu0);
    process.send?.({
      type: 'stats',
      guard: guardStats(),
      guardAtMark,
      served: served - servedAtMark,
      windowMs: performance.now() - markedAt,
      eventLoopUtilization: performance.eventLoopUtilization(elu0).utilization,
      cpuMs: (cpu.user + cpu.system) / 1000,
    });
  }
});
process.on('disconnect', () => process.exit(0));
