// How the overload guards behave when more work arrives than a server can do (issue 4), and
// what a rate-limit decision costs in memory. Run `npm run build`, then `npm run bench:overload`.
// docs/parts/bench-overload.md explains how to read the tables.
//
// Part 1. A Fastify route burns WORK_MS of CPU synchronously per request (bench/overload-server.ts,
// a fresh process per run, pinned to core 1 when taskset works; this process, the load
// generator, to core 0). First the route's capacity C (req/s, autocannon, closed loop, 4
// connections) and its unloaded latency (the fixed-rate generator at C/4). Then 2, 4 and 8 × C
// are offered at a fixed rate by bench/overload-load.ts (open loop; see there why not
// autocannon's histogram) to the bare route and behind each guard, and the answers are split by
// status: goodput (2xx per second), latency of the admitted requests, time to answer a
// rejection. The server reports what it did over the same window (CPU time, handlers run).
// A second table offers the same rates with autocannon's `overallRate`, as a cross-check with
// the usual tool.
//
// Part 2. Rate-limit decisions per second in memory (bench/overload-limiter.ts, a fresh process
// per case, rounds interleaved, medians).
//
// Env: ROUNDS of part 1 (1), DURATION seconds per run (5), WARMUP seconds at C/2 before each run
// (1), CONNECTIONS (256), MULTIPLES ("2,4,8"), ONLY (case ids, comma-separated: bare, shedder,
// shedder-50, adaptive, under-pressure), WORK_MS (5), MAX_DELAY_MS (= WORK_MS: the event-loop
// delay limit of loadShedder and under-pressure), SAMPLE_MS (50: their sampling interval),
// CAPACITY ("<req/s>,<unloaded p99 ms>": skip measuring them), AUTOCANNON (1; 0 skips the
// cross-check), LIMITER_ROUNDS (5), PART (1 or 2; both by default), PIN (1; 0: no taskset).
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import { LoadPool, percentile, type LoadResult } from './overload-load.js';
import type { OverloadVariant } from './overload-server.js';
import { median } from './median.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const rounds = Number(process.env.ROUNDS ?? 1);
const duration = Number(process.env.DURATION ?? 5);
const warmup = Number(process.env.WARMUP ?? 1);
const connections = Number(process.env.CONNECTIONS ?? 256);
const multiples = (process.env.MULTIPLES ?? '2,4,8').split(',').map(Number);
const workMs = Number(process.env.WORK_MS ?? 5);
// The limit a latency target calls for: a request should not wait behind more than about
// one handler's work (see docs/parts/bench-overload.md).
const maxDelayMs = Number(process.env.MAX_DELAY_MS ?? workMs);
const sampleMs = Number(process.env.SAMPLE_MS ?? 50);
const withAutocannon = process.env.AUTOCANNON !== '0';
const limiterRounds = Number(process.env.LIMITER_ROUNDS ?? 5);
const part = process.env.PART;
const only = process.env.ONLY?.split(',');
const drainMs = 2000;

interface Case {
  id: string;
  variant: OverloadVariant;
  label: string;
  env: Record<string, string>;
}

const allCases: Case[] = [
  { id: 'bare', variant: 'bare', label: 'bare', env: {} },
  {
    id: 'shedder',
    variant: 'load-shedder',
    label: `bulwark loadShedder (maxEventLoopDelayMs ${maxDelayMs}, sampleIntervalMs ${sampleMs})`,
    env: { MAX_DELAY_MS: String(maxDelayMs), SAMPLE_MS: String(sampleMs) },
  },
  {
    id: 'shedder-50',
    variant: 'load-shedder',
    label: `bulwark loadShedder (maxEventLoopDelayMs 50, sampleIntervalMs ${sampleMs})`,
    env: { MAX_DELAY_MS: '50', SAMPLE_MS: String(sampleMs) },
  },
  { id: 'adaptive', variant: 'adaptive-concurrency', label: 'bulwark adaptiveConcurrency (gradient, defaults)', env: {} },
  {
    id: 'under-pressure',
    variant: 'under-pressure',
    label: `@fastify/under-pressure (maxEventLoopDelay ${maxDelayMs}, sampleInterval ${sampleMs})`,
    env: { MAX_DELAY_MS: String(maxDelayMs), SAMPLE_MS: String(sampleMs) },
  },
];
const cases = allCases.filter((c) => only === undefined || only.includes(c.id));

/** Pins this process (the load generator) to core 0 and servers to core 1, when the machine allows it. */
function pinning(): { server: string[]; note: string } {
  if (process.env.PIN === '0') return { server: [], note: 'not pinned (PIN=0)' };
  if (cpus().length < 2) return { server: [], note: 'one core: not pinned' };
  try {
    execFileSync('taskset', ['-a', '-cp', '0', String(process.pid)], { stdio: 'ignore' });
    execFileSync('taskset', ['-c', '1', 'true'], { stdio: 'ignore' });
    return { server: ['taskset', '-c', '1'], note: 'load generator pinned to core 0, server to core 1 (taskset)' };
  } catch {
    return { server: [], note: 'taskset unavailable: not pinned' };
  }
}

// ---------------------------------------------------------------------------------------------
// The server process

interface Server {
  child: ChildProcess;
  port: number;
}

/** What the server measured since the last mark. */
interface ServerStats {
  type: 'stats';
  /** The guard's stats() now, and at the mark. */
  guard: Record<string, unknown>;
  guardAtMark: Record<string, unknown>;
  /** Handlers run. */
  served: number;
  /** How long the window lasted for the server (a busy server reads the message late). */
  windowMs: number;
  eventLoopUtilization: number;
  /** CPU time (user + system) of the server process. */
  cpuMs: number;
}

const NO_STATS: ServerStats = { type: 'stats', guard: {}, guardAtMark: {}, served: NaN, windowMs: NaN, eventLoopUtilization: NaN, cpuMs: NaN };

async function startServer(c: Case): Promise<Server> {
  const args = [process.execPath, '--import', 'tsx', `${here}overload-server.ts`, c.variant];
  const [command, ...rest] = [...pin.server, ...args] as [string, ...string[]];
  const env = { ...process.env, NODE_ENV: 'production', WORK_MS: String(workMs), ...c.env };
  const child = spawn(command, rest, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (m: { type: string; port: number }) => (m.type === 'ready' ? resolve(m.port) : reject(new Error(`unexpected ${m.type}`))));
    child.once('exit', (code) => reject(new Error(`${c.id} server exited with ${code}`)));
  });
  return { child, port };
}

/** Starts the server's measured window. */
async function mark(server: Server): Promise<void> {
  const answer = once(server.child, 'message');
  server.child.send({ type: 'mark' });
  await answer;
}

async function serverStats(server: Server): Promise<ServerStats> {
  const answer = once(server.child, 'message') as Promise<[ServerStats]>;
  server.child.send({ type: 'stats' });
  const timeout = new Promise<[ServerStats]>((resolve) => {
    setTimeout(() => resolve([NO_STATS]), 10_000).unref();
  });
  const [stats] = await Promise.race([answer, timeout]);
  return stats;
}

async function stopServer(server: Server): Promise<void> {
  server.child.kill();
  await once(server.child, 'exit').catch(() => undefined);
}

/** Share of the server's CPU time that went into the handlers' own work (WORK_MS each). */
const workShare = (stats: ServerStats): number => (stats.served * workMs) / stats.cpuMs;

// ---------------------------------------------------------------------------------------------
// Figures

const sorted = (values: readonly number[] | undefined): number[] => [...(values ?? [])].sort((a, b) => a - b);
const is2xx = (status: number): boolean => status >= 200 && status < 300;
const fmt = (value: number, digits = 1): string => (Number.isFinite(value) ? value.toFixed(digits) : '–');

function byClass(latencies: Map<number, number[]>, keep: (status: number) => boolean): number[] {
  const out: number[] = [];
  for (const [status, list] of latencies) if (keep(status)) out.push(...list);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Part 1

interface Capacity {
  rps: number;
  workShare: number;
  unloadedP50: number;
  unloadedP99: number;
  unloadedRate: number;
  unloadedSamples: number;
}

async function measureCapacity(): Promise<Capacity> {
  const server = await startServer(allCases[0]!);
  try {
    // Warm the JIT, then a closed loop of 4 connections: the single-threaded server always
    // has a request to run and a few waiting, and nothing queues beyond that.
    const url = `http://127.0.0.1:${server.port}/work`;
    await autocannon({ url, connections: 4, duration: 1 });
    await mark(server);
    const closed = await autocannon({ url, connections: 4, duration });
    const atCapacity = await serverStats(server);
    const rps = closed['2xx'] / duration;
    // Unloaded latency: the generator of the overload runs, at C/4, evenly spaced, so that
    // requests almost never meet in the server; at least 10 s, for a p99 of 400+ samples.
    const pool = await LoadPool.open(server.port, 16);
    const unloadedRate = Math.max(1, Math.round(rps / 4));
    const result = await pool.run(unloadedRate, Math.max(duration, 10) * 1000, drainMs);
    pool.close();
    const ok = sorted(result.latencies.get(200));
    return { rps, workShare: workShare(atCapacity), unloadedP50: percentile(ok, 0.5), unloadedP99: percentile(ok, 0.99), unloadedRate, unloadedSamples: ok.length };
  } finally {
    await stopServer(server);
  }
}

interface OverloadRun {
  result: LoadResult;
  server: ServerStats;
}

async function overloadRun(c: Case, multiple: number, capacity: number): Promise<OverloadRun> {
  const server = await startServer(c);
  try {
    const pool = await LoadPool.open(server.port, connections);
    try {
      if (warmup > 0) await pool.run(Math.round(capacity / 2), warmup * 1000, drainMs);
      await mark(server);
      let windowStats: Promise<ServerStats> = Promise.resolve(NO_STATS);
      const result = await pool.run(Math.round(capacity * multiple), duration * 1000, drainMs, () => {
        windowStats = serverStats(server);
      });
      return { result, server: await windowStats };
    } finally {
      pool.close();
    }
  } finally {
    await stopServer(server);
  }
}

/** Every round of one (case, rate) cell, summarised: medians of rates, pooled latencies. */
interface Cell {
  c: Case;
  multiple: number;
  runs: OverloadRun[];
}

function summarise(cell: Cell, C: number, unloadedP99: number) {
  const runs = cell.runs;
  const ok = sorted(runs.flatMap((r) => byClass(r.result.latencies, is2xx)));
  const shed = sorted(runs.flatMap((r) => r.result.latencies.get(503) ?? []));
  const others = runs.reduce((n, r) => n + byClass(r.result.latencies, (s) => !is2xx(s) && s !== 503).length, 0);
  const goodput = median(runs.map((r) => r.result.goodput));
  const p99 = percentile(ok, 0.99);
  const notes: string[] = [`server CPU ${fmt(median(runs.map((r) => (100 * r.server.cpuMs) / r.server.windowMs)), 0)} %`];
  const g = runs[0]!.server;
  if (cell.c.variant === 'adaptive-concurrency') notes.push(`limit ${String(g.guardAtMark.limit)} → ${String(g.guard.limit)}, in flight at most 1`);
  const unanswered = median(runs.map((r) => r.result.unanswered));
  if (unanswered > 0) notes.push(`${unanswered.toFixed(0)} unanswered ${drainMs / 1000} s after the run (not in the latencies)`);
  const waited = median(runs.map((r) => r.result.queuedClientSide));
  if (waited > 0) notes.push(`${waited.toFixed(0)} waited for a free connection (counted in their latency)`);
  const errors = runs.reduce((n, r) => n + r.result.errors, 0);
  if (errors > 0) notes.push(`${errors} connection errors`);
  if (others > 0) notes.push(`${others} other non-2xx`);
  return {
    rate: runs[0]!.result.rate,
    goodput,
    goodputRatio: goodput / C,
    workShare: median(runs.map((r) => workShare(r.server))),
    p50: percentile(ok, 0.5),
    p99,
    p99Ratio: p99 / unloadedP99,
    shedPerSecond: median(runs.map((r) => ((r.result.latencies.get(503)?.length ?? 0) * 1000) / r.result.durationMs)),
    shedP50: percentile(shed, 0.5),
    shedP99: percentile(shed, 0.99),
    notes: notes.join('; '),
  };
}

interface CannonRun {
  c: Case;
  multiple: number;
  goodput: number;
  admitted: number[];
  rejected: number[];
  mixedP99: number;
  sent: number;
}

async function autocannonRun(c: Case, multiple: number, capacity: number): Promise<CannonRun> {
  const server = await startServer(c);
  try {
    if (warmup > 0) {
      const pool = await LoadPool.open(server.port, 16);
      await pool.run(Math.round(capacity / 2), warmup * 1000, drainMs);
      pool.close();
    }
    const admitted: number[] = [];
    const rejected: number[] = [];
    const result = await new Promise<autocannon.Result>((resolve, reject) => {
      const options = { url: `http://127.0.0.1:${server.port}/work`, connections, overallRate: Math.round(capacity * multiple), duration };
      const instance = autocannon(options, (error, done) => (error ? reject(error) : resolve(done)));
      instance.on('response', (_client, status, _bytes, ms) => {
        if (is2xx(status)) admitted.push(ms);
        else if (status === 503) rejected.push(ms);
      });
    });
    return { c, multiple, goodput: result['2xx'] / duration, admitted: sorted(admitted), rejected: sorted(rejected), mixedP99: result.latency.p99, sent: result.requests.sent };
  } finally {
    await stopServer(server);
  }
}

async function part1(): Promise<string[]> {
  process.stderr.write('capacity…\n');
  const given = process.env.CAPACITY?.split(',').map(Number);
  const capacity: Capacity =
    given === undefined
      ? await measureCapacity()
      : { rps: given[0]!, workShare: NaN, unloadedP50: NaN, unloadedP99: given[1] ?? NaN, unloadedRate: 0, unloadedSamples: 0 };
  const C = capacity.rps;
  process.stderr.write(`C = ${C.toFixed(0)} req/s, unloaded p50 ${fmt(capacity.unloadedP50, 2)} ms, p99 ${fmt(capacity.unloadedP99, 2)} ms\n`);

  const cells: Cell[] = multiples.flatMap((multiple) => cases.map((c) => ({ c, multiple, runs: [] as OverloadRun[] })));
  for (let round = 0; round < rounds; round++) {
    for (const cell of cells) {
      const run = await overloadRun(cell.c, cell.multiple, C);
      cell.runs.push(run);
      const ok = sorted(byClass(run.result.latencies, is2xx));
      process.stderr.write(`round ${round + 1}/${rounds} ${cell.multiple}×C ${cell.c.id}: goodput ${run.result.goodput.toFixed(0)}/s, admitted p99 ${fmt(percentile(ok, 0.99))} ms\n`);
    }
  }

  const out: string[] = [];
  out.push(
    `**Capacity.** Handler: ${workMs} ms of CPU, synchronously. C = **${C.toFixed(0)} req/s** (autocannon, closed loop, 4 connections, ${duration} s); ` +
      `at capacity ${fmt(capacity.workShare * 100, 0)} % of the server's CPU time went into the handlers' work.`,
  );
  out.push(
    `Unloaded latency (fixed rate ${capacity.unloadedRate} req/s = C/4, ${capacity.unloadedSamples} requests): p50 ${fmt(capacity.unloadedP50, 2)} ms, **p99 ${fmt(capacity.unloadedP99, 2)} ms**.`,
  );
  out.push(`Targets at 4×C: goodput ≥ ${(0.9 * C).toFixed(0)} req/s (0.9 C), admitted p99 ≤ ${fmt(2 * capacity.unloadedP99, 1)} ms (2 × unloaded p99).`);
  out.push('');
  out.push(
    `**Fixed-rate open loop** (${connections} keep-alive connections; ${duration} s per run after ${warmup} s at C/2; ${rounds} round${rounds === 1 ? '' : 's'}` +
      `${rounds > 1 ? ', medians of rates, latencies pooled' : ''}; latency from the moment a request is due to the last byte of its answer):`,
  );
  out.push('');
  out.push('| offered | guard | goodput req/s | ÷ C | work share | admitted p50 ms | admitted p99 ms | ÷ unloaded p99 | 503/s | 503 p50 ms | 503 p99 ms | notes |');
  out.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
  const verdicts: string[] = [];
  for (const cell of cells) {
    const s = summarise(cell, C, capacity.unloadedP99);
    out.push(
      `| ${cell.multiple}×C (${s.rate}/s) | ${cell.c.label} | ${s.goodput.toFixed(0)} | ${s.goodputRatio.toFixed(2)} | ${fmt(s.workShare, 2)} | ${fmt(s.p50)} | ${fmt(s.p99)} | ${fmt(s.p99Ratio, 2)} | ` +
        `${s.shedPerSecond.toFixed(0)} | ${fmt(s.shedP50)} | ${fmt(s.shedP99)} | ${s.notes} |`,
    );
    if (cell.multiple === 4) {
      const goodputOk = s.goodputRatio >= 0.9;
      const latencyOk = s.p99Ratio <= 2;
      verdicts.push(`- ${cell.c.label}: goodput ${s.goodputRatio.toFixed(2)} C ${goodputOk ? '✓' : '✗'}, admitted p99 ${fmt(s.p99Ratio, 2)} × unloaded ${latencyOk ? '✓' : '✗'}`);
    }
  }
  if (verdicts.length > 0) out.push('', 'At 4×C, against the targets:', '', ...verdicts);

  if (withAutocannon) {
    const cannon: CannonRun[] = [];
    for (const multiple of multiples) {
      for (const c of cases) {
        const run = await autocannonRun(c, multiple, C);
        cannon.push(run);
        process.stderr.write(`autocannon ${multiple}×C ${c.id}: goodput ${run.goodput.toFixed(0)}/s\n`);
      }
    }
    out.push('');
    out.push(
      `**autocannon \`overallRate\`** (${connections} connections, ${duration} s after ${warmup} s at C/2; each connection a closed loop with a per-second budget; ` +
        `latencies split by status from its \`response\` events, measured from when each request was sent):`,
    );
    out.push('');
    out.push('| offered | guard | sent/s | goodput req/s | ÷ C | admitted p50 ms | admitted p99 ms | 503 p50 ms | 503 p99 ms | autocannon p99 (every status) ms |');
    out.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|');
    for (const run of cannon) {
      out.push(
        `| ${run.multiple}×C | ${run.c.label} | ${(run.sent / duration).toFixed(0)} | ${run.goodput.toFixed(0)} | ${(run.goodput / C).toFixed(2)} | ` +
          `${fmt(percentile(run.admitted, 0.5))} | ${fmt(percentile(run.admitted, 0.99))} | ${fmt(percentile(run.rejected, 0.5))} | ${fmt(percentile(run.rejected, 0.99))} | ${fmt(run.mixedP99)} |`,
      );
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Part 2

const limiterCases = [
  'bulwark rateLimit, 1 key',
  'bulwark rateLimit, 10,000 keys',
  'bulwark memoryStore.consume, 1 key',
  'bulwark memoryStore.consume, 10,000 keys',
  'express-rate-limit MemoryStore.increment, 1 key',
  'express-rate-limit MemoryStore.increment, 10,000 keys',
  'rate-limiter-flexible RateLimiterMemory.consume, 1 key',
  'rate-limiter-flexible RateLimiterMemory.consume, 10,000 keys',
];

function runLimiterCase(name: string): number {
  const out = execFileSync(process.execPath, ['--import', 'tsx', `${here}overload-limiter.ts`, name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const value = Number(out.trim().split('\n').at(-1));
  if (!Number.isFinite(value)) throw new Error(`case "${name}" printed ${out}`);
  return value;
}

function part2(): string[] {
  const samples = new Map<string, number[]>();
  for (let round = 0; round < limiterRounds; round++) {
    for (const name of limiterCases) samples.set(name, [...(samples.get(name) ?? []), runLimiterCase(name)]);
    process.stderr.write(`limiter round ${round + 1}/${limiterRounds} done\n`);
  }
  const out: string[] = [];
  out.push(
    `**Rate-limit decisions in memory** (one process per case, ${limiterRounds} rounds interleaved, medians; every decision awaited; ` +
      'a limit no key reaches, so every decision admits; 10,000 keys are used in turn):',
  );
  out.push('');
  out.push('| limiter | keys | decisions/s | ns/decision | bulwark rateLimit ÷ this | bulwark memoryStore ÷ this |');
  out.push('|---|---|---:|---:|---:|---:|');
  for (const name of limiterCases) {
    const [lib, keys] = name.split(', ') as [string, string];
    const rate = median(samples.get(name)!);
    const guard = median(samples.get(`bulwark rateLimit, ${keys}`)!);
    const store = median(samples.get(`bulwark memoryStore.consume, ${keys}`)!);
    const ratio = (ours: number, self: boolean): string => (self ? '' : (ours / rate).toFixed(2));
    out.push(`| ${lib} | ${keys} | ${(rate / 1e6).toFixed(2)} M | ${(1e9 / rate).toFixed(0)} | ${ratio(guard, lib === 'bulwark rateLimit')} | ${ratio(store, lib === 'bulwark memoryStore.consume')} |`);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

const pin = pinning();
const load0 = loadavg();
const started = Date.now();
const lines: string[] = [];
if (part === undefined || part === '1') lines.push(...(await part1()), '');
if ((part === undefined || part === '2') && limiterRounds > 0) lines.push(...part2(), '');
const load1 = loadavg();
const cpu = cpus()[0]?.model ?? 'unknown CPU';
console.log(`\n${cpu}, ${cpus().length} cores (nproc), Node ${process.version}; ${pin.note}.`);
console.log(
  `Load average (1 / 5 / 15 min) ${load0.map((x) => x.toFixed(2)).join(' / ')} before, ${load1.map((x) => x.toFixed(2)).join(' / ')} after; ${((Date.now() - started) / 1000).toFixed(0)} s in all.\n`,
);
console.log(lines.join('\n'));
