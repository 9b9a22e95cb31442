// The HTTP benchmark's cases counted in instructions instead of CPU time: each server runs
// under valgrind's callgrind with V8 made deterministic (`--single-threaded --predictable`
// and fixed seeds: no background threads, no timing dependence), is warmed up, and then the
// user-space instructions it executes for a fixed number of requests are counted. TurboFan
// still compiles during that window (on the main thread), so counts repeat only to about
// ±0.5–1 % of a request, still far closer than CPU time on a shared machine. It leaves out
// the kernel (the same for every case) and runs ~50x slower than normal: use it to compare,
// not to size a server. Timers tick by the wall clock, so under valgrind a guarded route's
// timeout queue ticks every few requests instead of every thousand (on Fastify about 500
// instructions a request that real traffic does not pay).
// Needs valgrind. Run `npm run build`, then `npx tsx bench/http-instructions.ts [framework…]`.
// The count is taken in WINDOWS windows of REQUESTS requests each, one connection each, and
// the median window is kept (the table shows the count without V8's compilers beside the
// whole one). A single long window caught lumps by chance: V8 recompiling half of Node's
// HTTP stack (a Koa case once counted 169k instructions a request instead of 126k), and on
// Express full garbage collections (Express's new object shapes fill the old generation;
// as many in bare as in guarded runs, counted natively), some 60 million instructions each
// plus the cache misses after them: single windows of one Express case ranged over 15 %.
// Windows with a full collection in them are left out (they come as often in bare as in
// guarded runs), and the median of the others kept: it keeps the young-generation
// collections that what a request allocates brings. The warm-up is long: Koa's count kept falling for
// 10,000 requests.
// Env: REQUESTS (1000) per window, WINDOWS (9), WARMUP requests (15000) in WARMUP_RUNS runs (3),
// CONNECTIONS (1), REPEAT (1; processes per case, the median kept), VARIANTS
// (bare,bulwark-empty,bulwark,bulwark-wrap; Fastify has no bulwark-wrap).
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import type { Framework, Variant } from './http-server.js';
import { DETERMINISTIC_V8 } from './deterministic-v8.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const requests = Number(process.env.REQUESTS ?? 1000);
const windows = Number(process.env.WINDOWS ?? 9);
const warmup = Number(process.env.WARMUP ?? 15000);
const connections = Number(process.env.CONNECTIONS ?? 1);
const variants = (process.env.VARIANTS ?? 'bare,bulwark-empty,bulwark,bulwark-wrap').split(',') as Variant[];
const repeat = Number(process.env.REPEAT ?? 1);
/** Variants that not every framework has. */
const only: Partial<Record<Variant, Framework[]>> = { 'bulwark-wrap': ['express', 'koa'], 'noop-middleware': ['express', 'koa'] };
const frameworks = (process.argv.length > 2 ? process.argv.slice(2) : ['fastify', 'koa', 'express']) as Framework[];
const dir = mkdtempSync(join(tmpdir(), 'bulwark-callgrind-'));

/** A case's count: all of it, and without what V8 spent compiling. */
interface Count {
  all: number;
  steady: number;
}

/**
 * V8's optimising compilers and parser, by C++ symbol: work that the measured window
 * catches or misses by chance (one Koa run counted 169k instructions a request instead of
 * 126k, most of it TurboFan recompiling). The garbage collector stays counted: what a
 * guard allocates, every request pays for there.
 */
const COMPILING = /v8::internal::(compiler|maglev|turboshaft)::|v8::internal::(Parser|Scanner|Zone|Compiler|Deoptimizer|OptimizingCompileDispatcher)\b/;

/** V8's full (mark-compact) collector, by C++ symbol: how a window with a full GC in it is told. */
const FULL_GC = /v8::internal::(MarkCompactCollector|MainMarkingVisitor|MarkingVisitorBase|Sweeper|IncrementalMarking|MarkingBarrier)\b/;

async function count(framework: Framework, variant: Variant): Promise<Count> {
  const out = join(dir, `${framework}.${variant}.out`);
  const args = ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${out}`, process.execPath, ...DETERMINISTIC_V8, '--import', 'tsx', `${here}http-server.ts`, framework, variant];
  const child = spawn('valgrind', args, { stdio: ['ignore', 'ignore', 'ignore', 'ipc'], env: { ...process.env, NODE_ENV: 'production' } });
  const [ready] = (await once(child, 'message')) as [{ port: number }];
  const url = `http://127.0.0.1:${ready.port}/`;
  // The warm-up in several runs, each on a connection of its own: the second connection a
  // server sees changes the maps of Node's socket and request objects, which deoptimises
  // most of the HTTP stack. In one run, that recompiling fell inside the measured window and
  // made up half of the instructions counted (and most of the scatter between cases).
  const runs = Number(process.env.WARMUP_RUNS ?? 3);
  for (let i = 0; i < runs; i++) await autocannon({ url, connections, amount: Math.ceil(warmup / runs) });
  execFileSync('callgrind_control', ['--instr=on', String(child.pid)], { stdio: 'ignore' });
  const answered: number[] = [];
  for (let i = 0; i < windows; i++) {
    const result = await autocannon({ url, connections, amount: requests });
    if (result.non2xx > 0) throw new Error(`${framework} ${variant}: ${result.non2xx} non-2xx answers`);
    answered.push(result.requests.total);
    execFileSync('callgrind_control', ['--dump', String(child.pid)], { stdio: 'ignore' });
  }
  execFileSync('callgrind_control', ['--instr=off', String(child.pid)], { stdio: 'ignore' });
  child.kill('SIGINT');
  await once(child, 'exit');
  const dumps = readdirSync(dir)
    .filter((name) => name.startsWith(`${basename(out)}.`) && /\.\d+$/.test(name))
    .sort((a, b) => Number(a.slice(a.lastIndexOf('.') + 1)) - Number(b.slice(b.lastIndexOf('.') + 1)));
  if (dumps.length !== windows) throw new Error(`${framework} ${variant}: ${dumps.length} dumps for ${windows} windows`);
  const counts = dumps.map((name, i) => countWindow(join(dir, name), answered[i]!));
  // Windows with a full collection in them are left out (unless every one has one).
  const clean = counts.filter((c) => c.fullGc < 0.01 * c.all);
  const kept = clean.length > 0 ? clean : counts;
  process.stderr.write(`${framework} ${variant}: windows ${counts.map((c) => `${c.steady.toFixed(0)}${c.fullGc < 0.01 * c.all ? '' : '*'}`).join(' ')} (without V8 compiling; * full GC, left out)\n`);
  return { all: median(kept.map((c) => c.all)), steady: median(kept.map((c) => c.steady)) };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** One window's dump: instructions per request, all of them, without V8's compilers, and in full GCs. */
function countWindow(file: string, requestsAnswered: number): Count & { fullGc: number } {
  const summary = execFileSync('callgrind_annotate', ['--threshold=100', file], { encoding: 'utf8', maxBuffer: 1 << 30 });
  const total = /([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS/.exec(summary)?.[1];
  if (total === undefined) throw new Error(`${file}: no count`);
  let noise = 0;
  let fullGc = 0;
  for (const [, self, name] of summary.matchAll(/^\s*([\d,]+) \([ \d.]+%\)\s+\S*?:(.*)$/gm)) {
    if (COMPILING.test(name!)) noise += Number(self!.replace(/,/g, ''));
    else if (FULL_GC.test(name!)) fullGc += Number(self!.replace(/,/g, ''));
  }
  const all = Number(total.replace(/,/g, ''));
  return { all: all / requestsAnswered, steady: (all - noise) / requestsAnswered, fullGc: fullGc / requestsAnswered };
}

try {
  console.log(`\nuser-space instructions per request (callgrind, deterministic V8: --single-threaded --predictable, fixed seeds), ${connections} connection(s), median of ${windows} windows of ${requests} requests after ${warmup}${repeat > 1 ? `, median of ${repeat} processes` : ''}\n`);
  console.log('| framework | route | instructions/request | ÷ bare | without V8 compiling | added over bare | ÷ bare |');
  console.log('|---|---|---:|---:|---:|---:|---:|');
  for (const framework of frameworks) {
    let bare: Count | undefined;
    for (const variant of variants) {
      if (!(only[variant] ?? [framework]).includes(framework)) continue;
      // Processes differ more than windows do (V8 tiers and inlines at other moments as the
      // network timing differs): with REPEAT, the median over fresh processes.
      const runs: Count[] = [];
      for (let i = 0; i < repeat; i++) runs.push(await count(framework, variant));
      const best: Count = { all: median(runs.map((r) => r.all)), steady: median(runs.map((r) => r.steady)) };
      if (variant === 'bare') bare = best;
      const versus = (value: number, base: number | undefined, digits: number): string => (base === undefined || variant === 'bare' ? '' : (value / base).toFixed(digits));
      const added = bare === undefined || variant === 'bare' ? '' : (best!.steady - bare.steady).toFixed(0);
      console.log(`| ${framework} | ${variant} | ${best!.all.toFixed(0)} | ${versus(best!.all, bare?.all, 3)} | ${best!.steady.toFixed(0)} | ${added} | ${versus(best!.steady, bare?.steady, 3)} |`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
