// The HTTP benchmark's cases counted in instructions instead of CPU time: each server runs
// under valgrind's callgrind with V8 made deterministic (`--single-threaded --predictable`
// and fixed seeds: no background threads, no timing dependence), is warmed up, and then the
// user-space instructions it executes for a fixed number of requests are counted. TurboFan
// still compiles during that window (on the main thread), so counts repeat only to about
// ±0.5–1 % of a request, still far closer than CPU time on a shared machine. It leaves out
// the kernel (the same for every case) and runs ~50x slower than normal: use it to compare,
// not to size a server. Timers tick by the wall clock, so under valgrind a guarded route's
// timeout queue ticks every 10–25 requests instead of every few hundred or thousand: the
// column "timer ticks" is what the timers' callbacks cost a request (Node's
// `Environment::RunTimers`, inclusive), and the last column the ratio without them, on both sides
// (a bare server's own timers cost it some 40–130 instructions a request). It still counts
// the re-arming `setTimeout` a request makes when the queue's timer has lapsed.
// Needs valgrind. Run `npm run build`, then `npx tsx bench/http-instructions.ts [framework…]`.
// The count is taken in WINDOWS windows of REQUESTS requests each, one connection each, and
// the median window is kept (the table shows the count without V8's compilers beside the
// whole one). A single long window caught lumps by chance: V8 recompiling half of Node's
// HTTP stack (a Koa case once counted 169k instructions a request instead of 126k), and on
// Express full garbage collections (Express's new object shapes fill the old generation;
// as many in bare as in guarded runs, counted natively), some 60 million instructions each
// plus the cache misses after them: single windows of one Express case ranged over 15 %.
// Windows with a full collection in them are left out (they come as often in bare as in
// guarded runs), and the median of the others kept, without their young-generation
// collections (scavenges): those are added back as their mean over all the kept windows.
// A scavenge comes every ~450 requests on Koa and Express and every ~1,900 on Fastify
// (counted natively), and costs 0.6–0.9 million instructions: a window of 1,000 requests
// holds two or three of them on Koa, none or one on Fastify, so the median window swung by
// 0.6 % (Koa) to 2 % (Fastify) of a request with where the scavenges fell. Their mean over
// nine windows keeps what a request allocates counted, without the swing. The warm-up is
// long: Koa's count kept falling for 10,000 requests.
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
import { median } from './median.js';

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
  /** What timer callbacks cost a request (included in the two above). */
  ticks: number;
}

/** One window's dump, per request (see `countWindow`). */
interface WindowCount extends Count {
  fullGc: number;
  gc: number;
  requests: number;
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

/**
 * The young generation at one size, its largest default (16 MB a semi-space on 64-bit), which
 * a busy server's grows to. Left to itself, V8 sized it by each process's history: identical
 * bare Koa processes ended with half or twice the scavenges of one another (705 or 1,361
 * instructions a request), a swing of 0.7 % between processes running the same code.
 */
const YOUNG_GENERATION = ['--min-semi-space-size=16', '--max-semi-space-size=16'];

async function count(framework: Framework, variant: Variant): Promise<Count> {
  const out = join(dir, `${framework}.${variant}.out`);
  const args = ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${out}`, process.execPath, ...DETERMINISTIC_V8, ...YOUNG_GENERATION, '--import', 'tsx', `${here}http-server.ts`, framework, variant];
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
  // What the kept windows' collections cost a request, on average over all of them.
  const gc = kept.reduce((sum, c) => sum + c.gc * c.requests, 0) / kept.reduce((sum, c) => sum + c.requests, 0);
  // Timer ticks come every 10–25 requests under valgrind, some 50 to a window: a window's
  // median does for them. The ticks' count is the difference the medians make without them,
  // so that a collection or a compilation that ran inside a tick is not taken out twice.
  const steady = median(kept.map((c) => c.steady - c.gc)) + gc;
  const withoutTicks = median(kept.map((c) => c.steady - c.gc - c.ticks)) + gc;
  process.stderr.write(
    `${framework} ${variant}: windows ${counts.map((c) => `${(c.steady - c.gc).toFixed(0)}${c.fullGc < 0.01 * c.all ? '' : '*'} (ticks ${c.ticks.toFixed(0)})`).join(' ')} + GC ${gc.toFixed(0)} (without V8 compiling and GC; * full GC, left out)\n`,
  );
  return { all: median(kept.map((c) => c.all - c.gc)) + gc, steady, ticks: steady - withoutTicks };
}

/** V8's entry to every collection, whose inclusive count is all the window's garbage collecting. */
const COLLECT_GARBAGE = 'v8::internal::Heap::CollectGarbage(';
/** Node's entry to its timers' callbacks, called by libuv when one is due: inclusive, every tick's work. */
const RUN_TIMERS = 'node::Environment::RunTimers(';

/** A `callgrind_annotate` report's functions: each one's count (self, or inclusive) and name. */
function functionCounts(report: string): Array<[count: number, name: string]> {
  return [...report.matchAll(/^\s*([\d,]+) \([ \d.]+%\)\s+\S*?:(.*)$/gm)].map(([, count, name]) => [Number(count!.replace(/,/g, '')), name!]);
}

/**
 * One window's dump, per request: all instructions, those without V8's compilers, those in
 * collections (`gc`, inclusive) and in full ones among them (`fullGc`, self), those in
 * timer callbacks (`ticks`, inclusive).
 */
function countWindow(file: string, requestsAnswered: number): WindowCount {
  const annotate = (...options: string[]): string => execFileSync('callgrind_annotate', [...options, '--threshold=100', file], { encoding: 'utf8', maxBuffer: 1 << 30 });
  const summary = annotate();
  const total = /([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS/.exec(summary)?.[1];
  if (total === undefined) throw new Error(`${file}: no count`);
  let noise = 0;
  let fullGc = 0;
  for (const [self, name] of functionCounts(summary)) {
    if (COMPILING.test(name)) noise += self;
    else if (FULL_GC.test(name)) fullGc += self;
  }
  const inclusive = functionCounts(annotate('--inclusive=yes'));
  const inclusiveOf = (symbol: string): number => inclusive.find(([, name]) => name.startsWith(symbol))?.[0] ?? 0;
  const all = Number(total.replace(/,/g, ''));
  return {
    all: all / requestsAnswered,
    steady: (all - noise) / requestsAnswered,
    fullGc: fullGc / requestsAnswered,
    gc: inclusiveOf(COLLECT_GARBAGE) / requestsAnswered,
    ticks: inclusiveOf(RUN_TIMERS) / requestsAnswered,
    requests: requestsAnswered,
  };
}

try {
  console.log(`\nuser-space instructions per request (callgrind, deterministic V8: --single-threaded --predictable, fixed seeds), ${connections} connection(s), median of ${windows} windows of ${requests} requests after ${warmup} (their scavenges averaged)${repeat > 1 ? `, median of ${repeat} processes` : ''}\n`);
  console.log('| framework | route | instructions/request | ÷ bare | without V8 compiling | added over bare | ÷ bare | timer ticks | ÷ bare without ticks |');
  console.log('|---|---|---:|---:|---:|---:|---:|---:|---:|');
  for (const framework of frameworks) {
    let bare: Count | undefined;
    let bareWithoutTicks: number | undefined;
    for (const variant of variants) {
      if (!(only[variant] ?? [framework]).includes(framework)) continue;
      // Processes differ more than windows do (V8 tiers and inlines at other moments as the
      // network timing differs): with REPEAT, the median over fresh processes.
      const runs: Count[] = [];
      for (let i = 0; i < repeat; i++) runs.push(await count(framework, variant));
      const best: Count = { all: median(runs.map((r) => r.all)), steady: median(runs.map((r) => r.steady)), ticks: median(runs.map((r) => r.ticks)) };
      const withoutTicks = median(runs.map((r) => r.steady - r.ticks));
      if (variant === 'bare') {
        bare = best;
        bareWithoutTicks = withoutTicks;
      }
      const versus = (value: number, base: number | undefined, digits: number): string => (base === undefined || variant === 'bare' ? '' : (value / base).toFixed(digits));
      const added = bare === undefined || variant === 'bare' ? '' : (best.steady - bare.steady).toFixed(0);
      console.log(
        `| ${framework} | ${variant} | ${best.all.toFixed(0)} | ${versus(best.all, bare?.all, 3)} | ${best.steady.toFixed(0)} | ${added} | ${versus(best.steady, bare?.steady, 3)} | ${best.ticks.toFixed(0)} | ${versus(withoutTicks, bareWithoutTicks, 3)} |`,
      );
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
