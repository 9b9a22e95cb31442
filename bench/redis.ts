// Rate-limit decisions through Redis: bulwark's redisStore against rate-limiter-flexible's
// RateLimiterRedis, at concurrency 1, 16 and 128. Both use their own ioredis connection to
// the same Redis; each round is taken in slices, the contenders alternating (the order flips
// every slice), so that drift of a shared machine hits all alike; the table reports the
// median of the rounds.
//
// A second table gives what each decision cost in CPU time: this process's (Node), the
// Redis server's (INFO cpu: script, protocol and system calls) and the script's alone
// (INFO commandstats, evalsha). Throughput on a busy machine swings with what else runs;
// CPU time per decision much less, so it says where a difference comes from. The counters
// are read between rounds, so a Redis that other clients use at the same time inflates the
// Redis columns.
//
// Run with `npm run bench:redis` (Redis at REDIS_URL, default redis://127.0.0.1:6379).
// ROUNDS (default 5), ROUND_MS (default 1000) and SLICES (default 5) tune the run.
import { execFileSync } from 'node:child_process';
import { cpus, loadavg } from 'node:os';
import { Redis } from 'ioredis';
import { RateLimiterRedis } from 'rate-limiter-flexible';
import { redisStore } from '../lib/stores/redis.js';
import type { RateLimitAlgorithm, RateLimitRule } from '../lib/stores/types.js';
import { median } from './median.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const ROUNDS = Number(process.env.ROUNDS ?? 5);
const ROUND_MS = Number(process.env.ROUND_MS ?? 1000);
// Each round gives every contender ROUND_MS in SLICES turns taken alternately, so that a
// change in the machine's load (a shared machine's other work starting or stopping) falls
// on all of them alike rather than on whichever had the round at that moment.
const SLICES = Number(process.env.SLICES ?? 5);
const CONCURRENCY = [1, 16, 128];
const KEYS = Array.from({ length: 1000 }, (_, i) => `client-${i}`);
const PREFIX = `bulwark-bench:${process.pid}:`;

type Decide = (key: string) => unknown;

interface Contender {
  name: string;
  decide: Decide;
}

interface Sample {
  perSecond: number;
  p99Ms: number;
  /** CPU time per decision, µs: this process, the Redis server, the scripts (evalsha). */
  nodeUs: number;
  redisUs: number;
  scriptUs: number;
}

interface RedisCounters {
  cpuUs: number;
  evalshaUs: number;
}

/** The Redis server's CPU time so far, and the time its EVALSHA calls took. */
async function redisCounters(client: Redis): Promise<RedisCounters> {
  const info = (await client.info('cpu')) + (await client.info('commandstats'));
  const field = (name: string): number => Number(info.match(new RegExp(`^${name}:([\\d.]+)`, 'm'))?.[1] ?? NaN);
  const evalsha = info.match(/^cmdstat_evalsha:calls=\d+,usec=(\d+)/m);
  return { cpuUs: (field('used_cpu_user') + field('used_cpu_sys')) * 1e6, evalshaUs: evalsha ? Number(evalsha[1]) : 0 };
}

async function connect(): Promise<Redis> {
  const client = new Redis(REDIS_URL, { lazyConnect: true });
  await client.connect();
  return client;
}

function bulwark(client: Redis, algorithm: RateLimitAlgorithm): Contender {
  const store = redisStore(client, { prefix: PREFIX });
  // A budget no key exhausts during the run: every decision is a full read-modify-write.
  const rule: RateLimitRule = Object.freeze({ name: `bench-${algorithm}`, limit: 1_000_000_000, windowMs: 60_000, algorithm });
  return { name: `bulwark redisStore (${algorithm})`, decide: (key) => store.consume(rule, key) };
}

function flexible(client: Redis): Contender {
  const limiter = new RateLimiterRedis({ storeClient: client, keyPrefix: `${PREFIX}rlf`, points: 1_000_000_000, duration: 60 });
  return { name: 'rate-limiter-flexible RateLimiterRedis', decide: (key) => limiter.consume(key) };
}

/** One contender's decisions in one round, over its slices. */
interface Tally {
  count: number;
  elapsedMs: number;
  readonly latencies: Float64Array;
  cpuUs: number;
  redisUs: number;
  scriptUs: number;
}

function tally(latencies: Float64Array): Tally {
  return { count: 0, elapsedMs: 0, latencies, cpuUs: 0, redisUs: 0, scriptUs: 0 };
}

/** Decides for `ms` at `concurrency`, adding to `into`. */
async function measure(decide: Decide, concurrency: number, ms: number, into: Tally): Promise<void> {
  const latencies = into.latencies;
  const redisBefore = await redisCounters(admin);
  const cpuBefore = process.cpuUsage();
  let next = 0;
  const stopAt = performance.now() + ms;
  const worker = async (): Promise<void> => {
    while (performance.now() < stopAt) {
      const key = KEYS[next++ % KEYS.length]!;
      const start = performance.now();
      await decide(key);
      latencies[into.count++] = performance.now() - start;
    }
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: concurrency }, worker));
  into.elapsedMs += performance.now() - start;
  const cpu = process.cpuUsage(cpuBefore);
  const redisAfter = await redisCounters(admin);
  into.cpuUs += cpu.user + cpu.system;
  into.redisUs += redisAfter.cpuUs - redisBefore.cpuUs;
  into.scriptUs += redisAfter.evalshaUs - redisBefore.evalshaUs;
}

function sample(t: Tally): Sample {
  const sorted = t.latencies.subarray(0, t.count).sort();
  return {
    perSecond: (t.count / t.elapsedMs) * 1000,
    p99Ms: sorted[Math.floor(t.count * 0.99)]!,
    nodeUs: t.cpuUs / t.count,
    redisUs: t.redisUs / t.count,
    scriptUs: t.scriptUs / t.count,
  };
}

function redisVersion(): string {
  try {
    return execFileSync('redis-server', ['--version'], { encoding: 'utf8' }).match(/v=(\S+)/)?.[1] ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

const clients = await Promise.all([connect(), connect(), connect(), connect()]);
const contenders = [bulwark(clients[0]!, 'sliding-window'), bulwark(clients[1]!, 'token-bucket'), flexible(clients[2]!)];
// Reads the server's counters between rounds, and cleans up at the end.
const admin = clients[3]!;
const load = loadavg()[0]!.toFixed(2);

const latencies = contenders.map(() => new Float64Array(4_000_000));

// Warm up: JIT, script caches, connections.
for (const [i, contender] of contenders.entries()) await measure(contender.decide, 16, ROUND_MS, tally(latencies[i]!));

const samples = new Map<string, Sample[]>();
for (const concurrency of CONCURRENCY) {
  for (let round = 0; round < ROUNDS; round++) {
    const tallies = latencies.map(tally);
    for (let slice = 0; slice < SLICES; slice++) {
      const order = (round * SLICES + slice) % 2 === 0 ? [...contenders.keys()] : [...contenders.keys()].reverse();
      for (const i of order) await measure(contenders[i]!.decide, concurrency, ROUND_MS / SLICES, tallies[i]!);
    }
    for (const [i, contender] of contenders.entries()) {
      const key = `${contender.name}@${concurrency}`;
      const list = samples.get(key) ?? [];
      list.push(sample(tallies[i]!));
      samples.set(key, list);
    }
  }
}

const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');
console.log(
  `\nRate-limit decisions through Redis ${redisVersion()} on loopback; Node ${process.version}, ${cpus().length} × ${cpus()[0]?.model.trim()}, ` +
    `load average ${load} at start; median of ${ROUNDS} interleaved rounds of ${ROUND_MS} ms (in ${SLICES} alternating slices), 1000 keys.\n`,
);
console.log('| concurrency | ' + contenders.map((c) => `${c.name}: decisions/s, p99`).join(' | ') + ' |');
console.log('|---:|' + contenders.map(() => '---:').join('|') + '|');
for (const concurrency of CONCURRENCY) {
  const cells = contenders.map((c) => {
    const list = samples.get(`${c.name}@${concurrency}`)!;
    return `${fmt(median(list.map((s) => s.perSecond)))}/s, ${median(list.map((s) => s.p99Ms)).toFixed(2)} ms`;
  });
  console.log(`| ${concurrency} | ${cells.join(' | ')} |`);
}

console.log('\nCPU time per decision, µs (median of the rounds): Node (this process) / Redis server / of which the script (evalsha).\n');
console.log('| concurrency | ' + contenders.map((c) => c.name).join(' | ') + ' |');
console.log('|---:|' + contenders.map(() => '---:').join('|') + '|');
for (const concurrency of CONCURRENCY) {
  const cells = contenders.map((c) => {
    const list = samples.get(`${c.name}@${concurrency}`)!;
    const us = (pick: (s: Sample) => number): string => median(list.map(pick)).toFixed(2);
    return `${us((s) => s.nodeUs)} / ${us((s) => s.redisUs)} / ${us((s) => s.scriptUs)}`;
  });
  console.log(`| ${concurrency} | ${cells.join(' | ')} |`);
}

// Leave nothing behind in the shared Redis.
let cursor = '0';
do {
  const [nextCursor, keys] = await admin.scan(cursor, 'MATCH', `${PREFIX}*`, 'COUNT', 1000);
  cursor = nextCursor;
  if (keys.length > 0) await admin.del(...keys);
} while (cursor !== '0');
await Promise.all(clients.map((client) => client.quit()));
