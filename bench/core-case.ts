// One benchmark case, in its own process; prints one number (ns per call, or heap bytes
// per breaker). Driven by bench/core.ts. Uses the built package, as users get it.
import * as bulwark from 'bulwark';
import * as cockatiel from 'cockatiel';
import OpossumBreaker from 'opossum';

const name = process.argv[2] ?? 'bare';
const fn = async (): Promise<number> => 1;

function speedCase(): () => Promise<unknown> {
  const b = bulwark;
  switch (name) {
    case 'bare':
      return fn;
    case 'bulwark pipeline(bulkhead, timeout, breaker)': {
      const p = b.pipeline(b.bulkhead({ limit: 1000 }), b.timeout(10_000), b.circuitBreaker());
      return () => p.execute(fn);
    }
    case 'bulwark circuitBreaker': {
      const p = b.circuitBreaker();
      return () => p.execute(fn);
    }
    case 'bulwark bulkhead': {
      const p = b.bulkhead({ limit: 1000 });
      return () => p.execute(fn);
    }
    case 'bulwark timeout': {
      const p = b.timeout(10_000);
      return () => p.execute(fn);
    }
    case 'bulwark retry': {
      const p = b.retry();
      return () => p.execute(fn);
    }
    case 'bulwark fallback': {
      const p = b.fallback(0);
      return () => p.execute(fn);
    }
    case 'bulwark rateLimit': {
      const p = b.rateLimit({ limit: 1e12, windowMs: 60_000 });
      return () => p.execute(fn);
    }
    case 'bulwark keyed(circuitBreaker)': {
      const p = b.keyed(() => b.circuitBreaker(), { key: () => 'upstream' });
      return () => p.execute(fn);
    }
    case 'bulwark loadShedder': {
      const p = b.loadShedder({ maxEventLoopDelayMs: 1000 });
      return () => p.execute(fn);
    }
    case 'bulwark adaptiveConcurrency': {
      const p = b.adaptiveConcurrency();
      return () => p.execute(fn);
    }
    case 'bulwark chaos (disabled)': {
      const p = b.chaos({ enabled: false, fault: { rate: 1 } });
      return () => p.execute(fn);
    }
    case 'cockatiel circuitBreaker': {
      const p = cockatiel.circuitBreaker(cockatiel.handleAll, {
        halfOpenAfter: 30_000,
        breaker: new cockatiel.CountBreaker({ threshold: 0.5, size: 100, minimumNumberOfCalls: 20 }),
      });
      return () => p.execute(fn);
    }
    case 'cockatiel wrap(bulkhead, timeout, breaker)': {
      const p = cockatiel.wrap(
        cockatiel.bulkhead(1000),
        cockatiel.timeout(10_000, cockatiel.TimeoutStrategy.Cooperative),
        cockatiel.circuitBreaker(cockatiel.handleAll, {
          halfOpenAfter: 30_000,
          breaker: new cockatiel.CountBreaker({ threshold: 0.5, size: 100, minimumNumberOfCalls: 20 }),
        }),
      );
      return () => p.execute(fn);
    }
    case 'opossum fire() (timeout off)': {
      const p = new OpossumBreaker(fn, { timeout: false });
      return () => p.fire();
    }
    case 'opossum fire() (default)': {
      const p = new OpossumBreaker(fn);
      return () => p.fire();
    }
    default:
      throw new Error(`unknown case ${name}`);
  }
}

async function measureSpeed(call: () => Promise<unknown>): Promise<number> {
  const perBatch = 100_000;
  for (let i = 0; i < 3 * perBatch; i++) await call();
  const results: number[] = [];
  for (let batch = 0; batch < 11; batch++) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) await call();
    results.push(Number(process.hrtime.bigint() - start) / perBatch);
  }
  results.sort((a, b) => a - b);
  return results[results.length >> 1]!;
}

function dispose(breaker: object): void {
  if ('dispose' in breaker && typeof breaker.dispose === 'function') breaker.dispose();
}

async function measureHeap(): Promise<number> {
  const count = 10_000;
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc === undefined) throw new Error('run with --expose-gc');
  // Each maker returns the breaker itself (kept alive in a preallocated array, so nothing
  // but the breakers is counted) and runs one successful call through it.
  const make = async (): Promise<{ dispose?: () => void } | object> => {
    if (name === 'heap bulwark circuitBreaker') {
      const p = bulwark.circuitBreaker();
      await p.execute(fn);
      return p;
    }
    if (name === 'heap cockatiel circuitBreaker') {
      const p = cockatiel.circuitBreaker(cockatiel.handleAll, {
        halfOpenAfter: 30_000,
        breaker: new cockatiel.CountBreaker({ threshold: 0.5, size: 100, minimumNumberOfCalls: 20 }),
      });
      await p.execute(fn);
      return p;
    }
    const p = new OpossumBreaker(fn);
    await p.fire();
    return { dispose: () => p.shutdown() };
  };
  // Warm up the code paths so that compiled code is not counted as breaker memory.
  for (let i = 0; i < 100; i++) dispose(await make());
  // Five batches of `count` breakers, the heap read after each: the bytes per breaker are
  // the growth from the first batch to the last. What one reading carries besides the
  // breakers (code compiled late, a collector's leftovers) cancels out, where a single
  // before/after pair scattered by ±20 bytes per breaker from run to run.
  const batches = 5;
  const kept: Array<{ dispose?: () => void } | object> = new Array(batches * count).fill(undefined);
  const heap = (): number => {
    gc();
    gc();
    const usage = process.memoryUsage();
    return usage.heapUsed + usage.arrayBuffers;
  };
  const readings: number[] = [];
  for (let batch = 0; batch < batches; batch++) {
    for (let i = 0; i < count; i++) kept[batch * count + i] = await make();
    readings.push(heap());
  }
  for (const breaker of kept) dispose(breaker);
  return (readings[batches - 1]! - readings[0]!) / ((batches - 1) * count);
}

/**
 * For bench/core-instructions.ts: warm up as measureSpeed does, then make exactly `count`
 * calls. Both go through one loop function, already optimized when the counted calls start:
 * a second loop of its own would be compiled (on-stack replacement, the whole guard stack
 * inlined) inside the counted window, and add several hundred instructions per call.
 */
async function callTimes(call: () => Promise<unknown>, count: number): Promise<number> {
  for (let round = 0; round < 3; round++) await repeat(call, 100_000);
  await repeat(call, count);
  return count;
}

async function repeat(call: () => Promise<unknown>, times: number): Promise<void> {
  for (let i = 0; i < times; i++) await call();
}

const calls = process.env.CALLS;
const result = name.startsWith('heap') ? await measureHeap() : calls !== undefined ? await callTimes(speedCase(), Number(calls)) : await measureSpeed(speedCase());
console.log(result);
process.exit(0);
