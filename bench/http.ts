// What a guard costs a real HTTP server: a hello-world JSON route, bare and guarded, in
// Express, Koa and Fastify, loaded with autocannon over loopback. Every case runs in a fresh
// server process pinned to one core while autocannon runs here, pinned to the other; cases
// are interleaved round by round (drift of a shared machine hits them all alike) and the
// table shows medians. The figure that matters is the server's CPU time per request,
// measured by the server itself over the run: unlike req/s it does not depend on how much
// CPU the machine had left. Latency is shown twice: at autocannon's saturation (where it is
// mostly queueing, so it follows CPU per request) and at a steady offered load that every
// server meets with room to spare (`steadyLoad`). Run `npm run build`, then `npm run bench:http`.
// Env: ROUNDS (3), DURATION seconds per run (5), WARMUP seconds (1), CONNECTIONS (10),
// STEADY_RATE req/s (default: per framework, a quarter of what its bare server answered at
// saturation in round 1, at most 2,000) for STEADY seconds (5; 0 leaves it out), ONLY (frameworks,
// comma-separated), DETAIL=1 (adds each adapter with an empty pipeline, its own cost without guards,
// and for Express and Koa a middleware that only calls next(): what any route middleware costs).
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once, type EventEmitter } from 'node:events';
import http from 'node:http';
import { cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import type { Framework, Variant } from './http-server.js';
import { median } from './median.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const rounds = Number(process.env.ROUNDS ?? 3);
const duration = Number(process.env.DURATION ?? 5);
const warmup = Number(process.env.WARMUP ?? 1);
const connections = Number(process.env.CONNECTIONS ?? 10);
const only = process.env.ONLY;
/**
 * The steady load's rate, per framework. A fixed 5,000 req/s overloaded bare Express on a
 * slow hour (its "steady" p99 was queueing). A quarter of what the framework's bare server
 * answers at saturation keeps every case of it well below its limit; the cap keeps the
 * generator below its own: Node's http client on one core, which at half of bare Fastify's
 * rate (14,700 req/s) queued its own requests for seconds.
 */
const STEADY_CAP = 2000;
const steadyRates = new Map<Framework, number>();
const fixedSteadyRate = process.env.STEADY_RATE === undefined ? undefined : Number(process.env.STEADY_RATE);
const steadySeconds = Number(process.env.STEADY ?? 5);

interface Case {
  framework: Framework;
  variant: Variant;
  label: string;
  /** The case this one is compared with (its CPU per request divides this one's). */
  baseline: Variant;
  /** Only with DETAIL=1: a diagnostic row. */
  detail?: boolean;
}

const allCases: Case[] = [
  { framework: 'express', variant: 'bare', label: 'bare', baseline: 'bare' },
  { framework: 'express', variant: 'bulwark', label: 'bulwark pipeline(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'express', variant: 'bulwark-wrap', label: 'bulwark, the same, guard().wrap(handler)', baseline: 'bare' },
  { framework: 'express', variant: 'bulwark-empty', label: 'bulwark pipeline() (the adapter alone)', baseline: 'bare', detail: true },
  { framework: 'express', variant: 'noop-middleware', label: 'a middleware that only calls next() (what any route middleware costs)', baseline: 'bare', detail: true },
  { framework: 'express', variant: 'cockatiel', label: 'cockatiel wrap(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'express', variant: 'express-rate-limit', label: 'express-rate-limit', baseline: 'bare' },
  { framework: 'express', variant: 'bulwark-rate-limit', label: 'bulwark rateLimit', baseline: 'bare' },
  { framework: 'koa', variant: 'bare', label: 'bare', baseline: 'bare' },
  { framework: 'koa', variant: 'bulwark', label: 'bulwark pipeline(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'koa', variant: 'bulwark-wrap', label: 'bulwark, the same, guard().wrap(handler)', baseline: 'bare' },
  { framework: 'koa', variant: 'bulwark-empty', label: 'bulwark pipeline() (the adapter alone)', baseline: 'bare', detail: true },
  { framework: 'koa', variant: 'noop-middleware', label: 'a middleware that only calls next() (what any route middleware costs)', baseline: 'bare', detail: true },
  { framework: 'koa', variant: 'cockatiel', label: 'cockatiel wrap(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'fastify', variant: 'bare', label: 'bare', baseline: 'bare' },
  { framework: 'fastify', variant: 'bulwark', label: 'bulwark pipeline(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'fastify', variant: 'bulwark-empty', label: 'bulwark pipeline() (the adapter alone)', baseline: 'bare', detail: true },
  { framework: 'fastify', variant: 'cockatiel', label: 'cockatiel wrap(bulkhead, timeout, breaker)', baseline: 'bare' },
  { framework: 'fastify', variant: 'opossum', label: 'opossum (timeout 10 s, capacity 1000)', baseline: 'bare' },
  { framework: 'fastify', variant: 'under-pressure', label: '@fastify/under-pressure', baseline: 'bare' },
];
const detail = process.env.DETAIL === '1';
const cases = allCases.filter((c) => (only === undefined || only.split(',').includes(c.framework)) && (detail || c.detail !== true));

interface Sample {
  rps: number;
  p50: number;
  p99: number;
  /** Server CPU (user + system) per request, microseconds. */
  cpuUs: number;
  errors: number;
  /** p99 latency at the steady offered load (`steadyLoad`), ms; NaN when not run. */
  steadyP99: number;
}

/** Pins this process (autocannon) to core 0 and servers to core 1, when the machine allows it. */
function pinning(): { load: string[]; server: string[]; note: string } {
  if (cpus().length < 2) return { load: [], server: [], note: 'one core: not pinned' };
  try {
    execFileSync('taskset', ['-a', '-cp', '0', String(process.pid)], { stdio: 'ignore' });
    execFileSync('taskset', ['-c', '1', 'true'], { stdio: 'ignore' });
    return { load: ['0'], server: ['taskset', '-c', '1'], note: 'autocannon pinned to core 0, server to core 1 (taskset)' };
  } catch {
    return { load: [], server: [], note: 'taskset unavailable: not pinned' };
  }
}

const pin = pinning();

function startServer(c: Case): { child: ChildProcess; ready: Promise<number> } {
  const args = [process.execPath, '--import', 'tsx', `${here}http-server.ts`, c.framework, c.variant];
  const [command, ...rest] = [...pin.server, ...args] as [string, ...string[]];
  const child = spawn(command, rest, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env, NODE_ENV: 'production' } });
  const ready = new Promise<number>((resolve, reject) => {
    child.once('message', (m: { type: string; port: number }) => (m.type === 'ready' ? resolve(m.port) : reject(new Error(`unexpected ${m.type}`))));
    child.once('exit', (code) => reject(new Error(`${c.framework} ${c.variant} server exited with ${code}`)));
  });
  return { child, ready };
}

function ask(child: ChildProcess, type: string): Promise<{ type: string; userUs: number; systemUs: number }> {
  const answer = once(child, 'message') as Promise<[{ type: string; userUs: number; systemUs: number }]>;
  child.send({ type });
  return answer.then(([m]) => m);
}

interface Load {
  result: autocannon.Result;
  /** Every 2xx response's latency, ms, sorted (autocannon's own histogram keeps whole milliseconds). */
  latencies: Float64Array;
}

async function load(port: number, seconds: number): Promise<Load> {
  const times: number[] = [];
  // The instance is a promise and an event emitter at once (its types only say promise).
  const run = autocannon({ url: `http://127.0.0.1:${port}/`, connections, duration: seconds }) as Promise<autocannon.Result> & EventEmitter;
  run.on('response', (_client: unknown, status: number, _bytes: number, ms: number) => {
    if (status >= 200 && status < 300) times.push(ms);
  });
  const result = await run;
  return { result, latencies: Float64Array.from(times).sort() };
}

/**
 * Latency at a steady offered load, open loop: requests go out on a fixed schedule whatever
 * the answers do, over keep-alive connections, and each latency counts from the moment its
 * request was due (so a stalled server shows in full, not hidden by the generator waiting).
 * At autocannon's saturation, latency is queueing: any CPU a guard adds shows up as latency
 * in proportion (and more, near a core's limit). At a rate the server meets with room to
 * spare, latency shows what a request itself waits for.
 */
async function steadyLoad(port: number, rate: number, seconds: number, agent: http.Agent): Promise<Float64Array> {
  const times: number[] = [];
  const total = Math.round(rate * seconds);
  const start = performance.now();
  let sent = 0;
  let answered = 0;
  let failed = 0;
  await new Promise<void>((resolve) => {
    const settle = (): void => {
      if (++answered === total) resolve();
    };
    const tick = (): void => {
      const due = Math.min(total, Math.floor(((performance.now() - start) * rate) / 1000));
      for (; sent < due; sent++) {
        const dueAt = start + (sent * 1000) / rate;
        const req = http.get({ host: '127.0.0.1', port, path: '/', agent }, (res) => {
          res.resume();
          res.on('end', () => {
            if (res.statusCode === 200) times.push(performance.now() - dueAt);
            else failed++;
            settle();
          });
        });
        req.on('error', () => {
          failed++;
          settle();
        });
      }
      if (sent < total) setImmediate(tick);
    };
    tick();
  });
  if (failed > 0) process.stderr.write(`  steady load: ${failed} failed requests\n`);
  return Float64Array.from(times).sort();
}

/** The steady load's latencies, after a second of it that opens the connections it needs. */
async function steadyLatencies(port: number, rate: number): Promise<Float64Array> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  try {
    await steadyLoad(port, rate, 1, agent);
    return await steadyLoad(port, rate, steadySeconds, agent);
  } finally {
    agent.destroy();
  }
}

function percentile(sorted: Float64Array, p: number): number {
  return sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function runCase(c: Case): Promise<Sample> {
  const { child, ready } = startServer(c);
  try {
    const port = await ready;
    if (warmup > 0) await load(port, warmup);
    await ask(child, 'start');
    const { result, latencies } = await load(port, duration);
    const cpu = await ask(child, 'stop');
    const requests = result.requests.total;
    // The first case of a framework is its bare server (round 1 runs them in order).
    if (!steadyRates.has(c.framework)) steadyRates.set(c.framework, fixedSteadyRate ?? Math.max(100, Math.min(STEADY_CAP, Math.round(requests / duration / 4 / 100) * 100)));
    const steady = steadySeconds > 0 ? await steadyLatencies(port, steadyRates.get(c.framework)!) : new Float64Array();
    if (result.non2xx > 0 || result.errors > 0) process.stderr.write(`  ${c.framework} ${c.variant}: ${result.non2xx} non-2xx, ${result.errors} errors\n`);
    return {
      rps: requests / duration,
      p50: percentile(latencies, 50),
      p99: percentile(latencies, 99),
      cpuUs: (cpu.userUs + cpu.systemUs) / requests,
      errors: result.non2xx + result.errors,
      steadyP99: percentile(steady, 99),
    };
  } finally {
    child.kill();
    await once(child, 'exit').catch(() => undefined);
  }
}

const load0 = loadavg()[0]!;
const samples = new Map<Case, Sample[]>();
const started = Date.now();
const frameworks = [...new Set(cases.map((c) => c.framework))];
for (let round = 0; round < rounds; round++) {
  for (const framework of frameworks) {
    // A framework's cases run back to back, so that each is compared with a bare run made
    // moments before or after it; every other round runs them in reverse order.
    const mine = cases.filter((c) => c.framework === framework);
    for (const c of round % 2 === 0 ? mine : [...mine].reverse()) {
      const sample = await runCase(c);
      samples.set(c, [...(samples.get(c) ?? []), sample]);
      process.stderr.write(`round ${round + 1}/${rounds} ${c.framework} ${c.variant}: ${sample.rps.toFixed(0)} req/s, ${sample.cpuUs.toFixed(2)} µs CPU/req\n`);
    }
  }
}
const load1 = loadavg()[0]!;

const cell = (values: number[], digits: number): string => median(values).toFixed(digits);
console.log(`\n${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores (nproc), Node ${process.version}; ${pin.note};`);
console.log(
  `${connections} connections, ${duration} s per run after ${warmup} s warm-up, ${rounds} rounds, medians; load average ${load0.toFixed(1)} before, ${load1.toFixed(1)} after; ${((Date.now() - started) / 1000).toFixed(0)} s in all.\n`,
);
if (steadySeconds > 0) console.log(`Steady load: ${[...steadyRates].map(([framework, rate]) => `${framework} ${rate} req/s`).join(', ')}${fixedSteadyRate === undefined ? ` (a quarter of bare at saturation in round 1, at most ${STEADY_CAP})` : ''}, ${steadySeconds} s after 1 s.\n`);
const steadyHead = steadySeconds > 0 ? ' p99 ms at steady load | ÷ bare |' : '';
console.log(`| framework | route | req/s | p50 ms | p99 ms | server CPU µs/req | CPU ÷ bare (rounds) | p99 ÷ bare |${steadyHead}`);
console.log(`|---|---|---:|---:|---:|---:|---:|---:|${steadySeconds > 0 ? '---:|---:|' : ''}`);
for (const c of cases) {
  const mine = samples.get(c)!;
  const base = samples.get(cases.find((b) => b.framework === c.framework && b.variant === c.baseline)!)!;
  // Each round's run against that round's bare run, then the median over the rounds.
  const ratios = (pick: (s: Sample) => number): number[] => mine.map((sample, round) => pick(sample) / pick(base[round]!));
  const cpu = ratios((s) => s.cpuUs);
  const spread = `${median(cpu).toFixed(3)} (${Math.min(...cpu).toFixed(2)}–${Math.max(...cpu).toFixed(2)})`;
  const isBase = c.variant === c.baseline;
  const steadyCells = steadySeconds > 0 ? ` ${cell(mine.map((s) => s.steadyP99), 3)} | ${isBase ? '' : median(ratios((s) => s.steadyP99)).toFixed(3)} |` : '';
  console.log(
    `| ${c.framework} | ${c.label} | ${cell(mine.map((s) => s.rps), 0)} | ${cell(mine.map((s) => s.p50), 3)} | ${cell(mine.map((s) => s.p99), 3)} | ${cell(mine.map((s) => s.cpuUs), 2)} | ${isBase ? '' : spread} | ${isBase ? '' : median(ratios((s) => s.p99)).toFixed(3)} |${steadyCells}`,
  );
}
