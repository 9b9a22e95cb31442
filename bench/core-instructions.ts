// bench/core.ts's cases counted in instructions instead of nanoseconds. Each case runs under
// valgrind's callgrind with V8 made deterministic (`--single-threaded --predictable` and
// fixed seeds: no background compiler or GC threads, no timing-dependent decisions), once
// with N calls after the warm-up and once with none; the difference divided by N is what
// one call costs. Repeated runs agree to within a few instructions per call, whatever else
// the machine is doing, so a change of 1 % shows where wall-clock time on a shared 2-core
// machine cannot. Instructions are not time (an allocation or a cache miss costs more than
// its count): bench/core.ts stays the measure the targets are set in.
// Needs valgrind and `npm run build`. Run `npx tsx bench/core-instructions.ts [case…]`.
// Env: CALLS (default 100000).
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { DETERMINISTIC_V8 } from './deterministic-v8.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const calls = Number(process.env.CALLS ?? 100_000);
const cases =
  process.argv.length > 2
    ? process.argv.slice(2)
    : ['bare', 'bulwark pipeline(bulkhead, timeout, breaker)', 'bulwark circuitBreaker', 'bulwark bulkhead', 'bulwark timeout', 'cockatiel circuitBreaker', 'cockatiel wrap(bulkhead, timeout, breaker)', 'opossum fire() (default)'];

// Plain JavaScript for the child: tsx's loader runs on a thread of its own, whose work
// callgrind would count at random. The file sits inside the package, so that `bulwark`
// resolves to the build as it does for bench/core-case.ts.
const dir = mkdtempSync(join(here, '.instructions-'));
const script = join(dir, 'core-case.mjs');
const source = readFileSync(join(here, 'core-case.ts'), 'utf8');
writeFileSync(script, ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText);

/** Instructions of a whole run of `name` that makes `n` calls after the warm-up. */
function run(name: string, n: number): Promise<number> {
  const args = ['--tool=callgrind', '--callgrind-out-file=/dev/null', process.execPath, ...DETERMINISTIC_V8, script, name];
  const child = spawn('valgrind', args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, CALLS: String(n) } });
  let log = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (log += chunk));
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code) => {
      const collected = /Collected : (\d+)/.exec(log)?.[1];
      if (code !== 0 || collected === undefined) reject(new Error(`case "${name}" (${n} calls) failed under valgrind:\n${log.slice(-800)}`));
      else resolve(Number(collected));
    });
  });
}

/** Runs the jobs two at a time (one per core of the machines this is meant for). */
async function pooled<T>(jobs: Array<() => Promise<T>>, width = 2): Promise<T[]> {
  const results: T[] = new Array(jobs.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < jobs.length) {
      const index = next++;
      results[index] = await jobs[index]!();
    }
  };
  await Promise.all(Array.from({ length: width }, worker));
  return results;
}

try {
  const totals = await pooled(cases.flatMap((name) => [() => run(name, 0), () => run(name, calls)]));
  const perCall = new Map(cases.map((name, i) => [name, (totals[2 * i + 1]! - totals[2 * i]!) / calls]));
  const bare = perCall.get('bare');
  const reference = perCall.get('cockatiel circuitBreaker');
  console.log(`\ninstructions per call (callgrind, deterministic V8), ${calls} calls after the warm-up; ${cpus()[0]?.model ?? 'unknown CPU'}, Node ${process.version}\n`);
  console.log('| case | instructions/call | added over bare | added ÷ cockatiel breaker |');
  console.log('|---|---:|---:|---:|');
  for (const [name, value] of perCall) {
    const added = bare === undefined || name === 'bare' ? undefined : value - bare;
    const ratio = added === undefined || reference === undefined || bare === undefined ? '' : (added / (reference - bare)).toFixed(2);
    console.log(`| ${name} | ${value.toFixed(0)} | ${added === undefined ? '' : added.toFixed(0)} | ${ratio} |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
