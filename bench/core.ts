// Per-call cost of bulwark's guards against cockatiel and opossum, on a trivial async
// function. Each case runs in a fresh process (so JIT state and heap of one case never
// colour another), rounds are interleaved (so drift of the machine hits every case
// alike), and the table reports medians. Run with `npm run bench:core` after `npm run build`.
// Env: ROUNDS (5); CASES=target for only the cases the targets are stated in.
import { execFileSync } from 'node:child_process';
import { cpus } from 'node:os';
import { fileURLToPath } from 'node:url';
import { median } from './median.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const caseScript = `${here}core-case.ts`;
const rounds = Number(process.env.ROUNDS ?? 5);

const speedCases = [
  'bare',
  'bulwark pipeline(bulkhead, timeout, breaker)',
  'bulwark circuitBreaker',
  'bulwark bulkhead',
  'bulwark timeout',
  'bulwark retry',
  'bulwark fallback',
  'bulwark rateLimit',
  'bulwark keyed(circuitBreaker)',
  'bulwark loadShedder',
  'bulwark adaptiveConcurrency',
  'bulwark chaos (disabled)',
  'cockatiel circuitBreaker',
  'cockatiel wrap(bulkhead, timeout, breaker)',
  'opossum fire() (timeout off)',
  'opossum fire() (default)',
];
const memoryCases = ['heap bulwark circuitBreaker', 'heap cockatiel circuitBreaker', 'heap opossum'];
// CASES=target: only the cases the targets are stated in, for many rounds in little time.
const targetCases = ['bare', 'bulwark pipeline(bulkhead, timeout, breaker)', 'cockatiel circuitBreaker', 'opossum fire() (default)', 'heap bulwark circuitBreaker'];
const chosen = (name: string): boolean => process.env.CASES !== 'target' || targetCases.includes(name);

function runCase(name: string, gc: boolean): number {
  const args = [...(gc ? ['--expose-gc'] : []), '--import', 'tsx', caseScript, name];
  const out = execFileSync(process.execPath, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const value = Number(out.trim().split('\n').at(-1));
  if (!Number.isFinite(value)) throw new Error(`case "${name}" printed ${out}`);
  return value;
}

const samples = new Map<string, number[]>();
for (let round = 0; round < rounds; round++) {
  for (const name of [...speedCases, ...memoryCases].filter(chosen)) {
    const list = samples.get(name) ?? [];
    list.push(runCase(name, name.startsWith('heap')));
    samples.set(name, list);
  }
  process.stderr.write(`round ${round + 1}/${rounds} done\n`);
}

const bare = median(samples.get('bare')!);
const cockatielBreaker = median(samples.get('cockatiel circuitBreaker')!) - bare;
const opossumFire = median(samples.get('opossum fire() (default)')!) - bare;
console.log(`\n${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores, Node ${process.version}, ${rounds} rounds, medians\n`);
console.log('| case | ns/call | added over bare (ns) | added ÷ cockatiel breaker | added ÷ opossum fire() |');
console.log('|---|---:|---:|---:|---:|');
for (const name of speedCases.filter(chosen)) {
  const value = median(samples.get(name)!);
  const added = value - bare;
  const ratio = (x: number): string => (name === 'bare' ? '' : (added / x).toFixed(2));
  console.log(`| ${name} | ${value.toFixed(0)} | ${name === 'bare' ? '' : added.toFixed(0)} | ${ratio(cockatielBreaker)} | ${ratio(opossumFire)} |`);
}
console.log('\n| 10,000 breakers | heap bytes per breaker |');
console.log('|---|---:|');
for (const name of memoryCases.filter(chosen)) console.log(`| ${name.slice(5)} | ${median(samples.get(name)!).toFixed(0)} |`);
