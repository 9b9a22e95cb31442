import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

// Heap figures need `global.gc`, which mocha's process does not expose: each measurement
// runs in a child `node --expose-gc --import tsx` and prints one JSON line.
const root = fileURLToPath(new URL('..', import.meta.url));
const lib = (file: string): string => new URL(`../lib/${file}`, import.meta.url).href;

function measure<T>(script: string): Promise<T> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script],
      { cwd: root, encoding: 'utf8', timeout: 60_000 },
      (error, stdout, stderr) => {
        if (error) return reject(new Error(`${error.message}\n${stderr}`));
        try {
          resolve(JSON.parse(stdout.trim().split('\n').at(-1)!) as T);
        } catch {
          reject(new Error(`child printed: ${stdout}\n${stderr}`));
        }
      },
    );
  });
}

/** Sends 200,000 distinct client IPs through a limiter; reports the heap growth. */
const rateLimitScript = (maxKeys: number): string => `
  const { rateLimit } = await import('${lib('rate-limit.ts')}');
  const limiter = rateLimit({ limit: 10, windowMs: 60_000, maxKeys: ${maxKeys} });
  // Kept reachable on purpose: a limiter no longer used would be collected and weigh nothing.
  globalThis.kept = limiter;
  const fn = () => 1;
  const ip = (i) => \`10.\${(i >> 16) & 255}.\${(i >> 8) & 255}.\${i & 255}\`;
  const call = (i) => limiter.execute(fn, undefined, { request: { ip: ip(i), method: 'GET', path: '/', headers: {} } });
  // Warm up (and fill the table), so that compiled code is not counted as keys.
  for (let i = 0; i < 5000; i++) await call(1_000_000 + i);
  gc(); gc();
  const before = process.memoryUsage().heapUsed;
  for (let i = 0; i < 200_000; i++) await call(i);
  gc(); gc();
  const after = process.memoryUsage().heapUsed;
  console.log(JSON.stringify({ growth: after - before, keys: limiter.stats().keys }));
`;

/** Makes 100,000 keyed policies (one call each); reports heap bytes per key. */
const keyedScript = (factory: string): string => `
  const { keyed } = await import('${lib('keyed.ts')}');
  const { circuitBreaker } = await import('${lib('circuit-breaker.ts')}');
  const count = 100_000;
  const fn = () => 1;
  const perKey = keyed(${factory}, { key: (_request, context) => context.key, maxKeys: count });
  // Kept reachable on purpose: a keyed policy no longer used would be collected and weigh nothing.
  globalThis.kept = perKey;
  for (let i = 0; i < 100; i++) await perKey.execute(fn, undefined, { key: 'warm-' + i });
  gc(); gc();
  const before = process.memoryUsage();
  // The key strings are made here, so they are counted: keyed keeps them.
  for (let i = 100; i < count; i++) await perKey.execute(fn, undefined, { key: 'tenant-' + i });
  gc(); gc();
  const after = process.memoryUsage();
  const bytes = after.heapUsed - before.heapUsed + (after.arrayBuffers - before.arrayBuffers);
  console.log(JSON.stringify({ perKey: bytes / (count - 100), stats: perKey.stats() }));
`;

describe('memory under key cardinality', function () {
  // Child processes with a TypeScript loader: seconds, not milliseconds.
  this.timeout(60_000);

  it('200,000 distinct clients through rateLimit({ maxKeys: 1000 }) grow the heap by < 2 MiB', async () => {
    const bounded = await measure<{ growth: number; keys: number }>(rateLimitScript(1000));
    expect(bounded.keys).to.be.at.most(1000);
    expect(bounded.growth, `grew ${(bounded.growth / 2 ** 20).toFixed(2)} MiB`).to.be.below(2 * 2 ** 20);
  });

  it('(control: the same traffic with room for every key does grow the heap, so the measurement can fail)', async () => {
    const unbounded = await measure<{ growth: number; keys: number }>(rateLimitScript(1_000_000));
    expect(unbounded.keys).to.be.above(200_000);
    expect(unbounded.growth).to.be.above(10 * 2 ** 20);
  });

  it('100,000 keyed circuit breakers take at most 512 bytes each, keyed included', async () => {
    // Each breaker named after its key, as a keyed breaker must be for metrics, the
    // dashboard and shared state to tell them apart (the name is then the key's string).
    const { perKey, stats } = await measure<{ perKey: number; stats: { keys: number } }>(keyedScript('(key) => circuitBreaker({ name: key })'));
    expect(stats.keys).to.equal(100_000);
    expect(perKey, `${perKey.toFixed(0)} bytes per keyed breaker`).to.be.at.most(512);
  });

  it('keyed itself costs under 100 bytes per key, the key string included', async () => {
    const { perKey, stats } = await measure<{ perKey: number; stats: { keys: number } }>(keyedScript('((shared) => () => shared)(circuitBreaker())'));
    expect(stats.keys).to.equal(100_000);
    expect(perKey, `${perKey.toFixed(0)} bytes per key`).to.be.below(100);
  });
});
