// One case of the rate-limit part of `npm run bench:overload`, in its own process: prints
// decisions per second (the median of 11 timed batches after 3 warm-up batches). Every
// decision is awaited, as a request handler would: all three limiters answer with a promise
// (bulwark's store answers synchronously, and `rateLimit.execute` wraps it in one).
// Usage: overload-limiter.ts "<case>", a case named in bench/overload.ts.
import { memoryStore, rateLimit, type CallContext } from 'bulwark';
import { MemoryStore as ExpressRateLimitStore } from 'express-rate-limit';
import { RateLimiterMemory } from 'rate-limiter-flexible';

const name = process.argv[2] ?? '';
const keyCount = name.endsWith('10,000 keys') ? 10_000 : 1;
const keys = Array.from({ length: keyCount }, (_, i) => `client-${i}`);
// A budget no key exhausts: every decision admits, so every library takes the same path.
const limit = 1e9;
const windowMs = 60_000;
let next = 0;
const nextKey = (): string => {
  const key = keys[next]!;
  next = next + 1 === keyCount ? 0 : next + 1;
  return key;
};

function decision(): () => Promise<boolean> {
  if (name.startsWith('bulwark rateLimit')) {
    // The whole guard: key function, store decision, the decision recorded for the headers.
    const limiter = rateLimit({ limit, windowMs, key: (_request, context) => context.key as string });
    const fn = (): boolean => true;
    return () => limiter.execute(fn, undefined, { key: nextKey() } satisfies CallContext);
  }
  if (name.startsWith('bulwark memoryStore')) {
    const store = memoryStore();
    const rule = { name: 'bench', limit, windowMs, algorithm: 'sliding-window' as const };
    return async () => (store.consume(rule, nextKey()) as { allowed: boolean }).allowed;
  }
  if (name.startsWith('express-rate-limit')) {
    const store = new ExpressRateLimitStore();
    store.init({ windowMs } as Parameters<ExpressRateLimitStore['init']>[0]);
    return async () => (await store.increment(nextKey())).totalHits <= limit;
  }
  if (name.startsWith('rate-limiter-flexible')) {
    const limiter = new RateLimiterMemory({ points: limit, duration: windowMs / 1000 });
    return async () => (await limiter.consume(nextKey())).remainingPoints >= 0;
  }
  throw new Error(`unknown case "${name}"`);
}

async function decisionsPerSecond(decide: () => Promise<boolean>): Promise<number> {
  const perBatch = 100_000;
  let admitted = 0;
  for (let i = 0; i < 3 * perBatch; i++) if (await decide()) admitted++;
  const results: number[] = [];
  for (let batch = 0; batch < 11; batch++) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) if (await decide()) admitted++;
    results.push((perBatch * 1e9) / Number(process.hrtime.bigint() - start));
  }
  if (admitted !== 14 * perBatch) throw new Error(`${name}: ${14 * perBatch - admitted} decisions refused`);
  results.sort((a, b) => a - b);
  return results[results.length >> 1]!;
}

console.log(await decisionsPerSecond(decision()));
process.exit(0);
