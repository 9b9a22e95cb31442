import { expect } from 'chai';
import fc from 'fast-check';
import { RateLimitError } from '../lib/errors.js';
import { keyed } from '../lib/keyed.js';
import { Lru } from '../lib/lru.js';
import { BasePolicy, run, type Call, type CallContext, type InternalFunction } from '../lib/policy.js';
import { rateLimit } from '../lib/rate-limit.js';
import { memoryStore } from '../lib/stores/memory.js';
import type { RateLimitAlgorithm } from '../lib/stores/types.js';

function manualClock(start: number): { now(): number; advance(ms: number): void } {
  let time = start;
  return {
    now: () => time,
    advance: (ms) => {
      time += ms;
    },
  };
}

/** Steps of a history: let some time pass, then make a few calls at that instant. */
const steps = fc.array(
  fc.record({
    advanceMs: fc.oneof(fc.integer({ min: 0, max: 3000 }), fc.double({ min: 0, max: 3000, noNaN: true })),
    calls: fc.integer({ min: 1, max: 6 }),
  }),
  { minLength: 1, maxLength: 30 },
);
const settings = fc.record({
  limit: fc.integer({ min: 1, max: 10 }),
  windowMs: fc.integer({ min: 1, max: 2000 }),
  start: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 10_000_000 }), fc.double({ min: 0, max: 1e9, noNaN: true })),
});

/** Plays a history through a limiter; returns the times of the admitted calls. */
async function admittedTimes(algorithm: RateLimitAlgorithm, limit: number, windowMs: number, start: number, history: Array<{ advanceMs: number; calls: number }>): Promise<number[]> {
  const clock = manualClock(start);
  const limiter = rateLimit({ limit, windowMs, algorithm, clock });
  const admitted: number[] = [];
  for (const { advanceMs, calls } of history) {
    clock.advance(advanceMs);
    for (let i = 0; i < calls; i++) {
      const outcome = await limiter.execute(() => true).catch((error: unknown) => {
        expect(error).to.be.instanceOf(RateLimitError);
        return false;
      });
      if (outcome) admitted.push(clock.now());
    }
  }
  expect(limiter.stats().admitted).to.equal(admitted.length);
  return admitted;
}

describe('rate limit properties', () => {
  it('token bucket: in any interval [t, t + w], admitted calls ≤ limit + limit·w/windowMs', async () => {
    await fc.assert(
      fc.asyncProperty(settings, steps, async ({ limit, windowMs, start }, history) => {
        const times = await admittedTimes('token-bucket', limit, windowMs, start, history);
        // Every interval that matters starts and ends at an admitted call.
        for (let i = 0; i < times.length; i++) {
          for (let j = i; j < times.length; j++) {
            const w = times[j]! - times[i]!;
            expect(j - i + 1, `calls ${i}..${j} over ${w} ms`).to.be.at.most(limit + (limit * w) / windowMs + 1e-6);
          }
        }
      }),
      { numRuns: 150 },
    );
  });

  it('sliding window: admitted calls in any aligned window ≤ limit (and in any window of windowMs ≤ 2·limit)', async () => {
    await fc.assert(
      fc.asyncProperty(settings, steps, async ({ limit, windowMs, start }, history) => {
        const times = await admittedTimes('sliding-window', limit, windowMs, start, history);
        const perWindow = new Map<number, number>();
        for (const t of times) {
          const window = Math.floor(t / windowMs);
          perWindow.set(window, (perWindow.get(window) ?? 0) + 1);
        }
        for (const count of perWindow.values()) expect(count).to.be.at.most(limit);
        for (let i = 0, j = 0; j < times.length; j++) {
          while (times[j]! - times[i]! >= windowMs) i++;
          expect(j - i + 1).to.be.at.most(2 * limit);
        }
      }),
      { numRuns: 150 },
    );
  });

  for (const algorithm of ['sliding-window', 'token-bucket'] as const) {
    // Floating point can make the wait 1 ms longer than the exact one (never shorter), e.g.
    // (1 - 1329/1581) * 1581 = 252.00000000000003, rounded up to 253.
    it(`${algorithm}: retryAfterMs is never early and at most 1 ms late`, async () => {
      await fc.assert(
        fc.asyncProperty(settings, steps, async ({ limit, windowMs, start }, history) => {
          const clock = manualClock(start);
          const limiter = rateLimit({ limit, windowMs, algorithm, clock });
          for (const { advanceMs, calls } of history) {
            clock.advance(advanceMs);
            for (let i = 0; i < calls; i++) await limiter.execute(() => 1).catch(() => undefined);
          }
          // Use up what is left, then wait as told.
          let refusal: RateLimitError | undefined;
          for (let i = 0; i <= limit && refusal === undefined; i++) {
            refusal = await limiter.execute(() => undefined).then(
              () => undefined,
              (error: RateLimitError) => error,
            );
          }
          expect(refusal).to.be.instanceOf(RateLimitError);
          const wait = refusal!.retryAfterMs!;
          expect(wait).to.be.at.least(1);
          // Token bucket: at most one token's refill time; sliding window: at most two windows.
          expect(wait).to.be.at.most(algorithm === 'token-bucket' ? Math.ceil(windowMs / limit) : 2 * windowMs);
          if (wait > 2) {
            clock.advance(wait - 2);
            expect(await limiter.execute(() => 'admitted').catch(() => 'refused')).to.equal('refused');
            clock.advance(2);
          } else {
            clock.advance(wait);
          }
          expect(await limiter.execute(() => 'admitted').catch(() => 'refused')).to.equal('admitted');
        }),
        { numRuns: 150 },
      );
    });
  }

  it('context.rateLimit is consistent with the decision', async () => {
    await fc.assert(
      fc.asyncProperty(settings, steps, fc.constantFrom<RateLimitAlgorithm>('sliding-window', 'token-bucket'), async ({ limit, windowMs, start }, history, algorithm) => {
        const clock = manualClock(start);
        const limiter = rateLimit({ limit, windowMs, algorithm, clock });
        for (const { advanceMs, calls } of history) {
          clock.advance(advanceMs);
          for (let i = 0; i < calls; i++) {
            const context: CallContext = {};
            const admitted = await limiter.execute(() => true, undefined, context).catch(() => false);
            const info = context.rateLimit!;
            expect(info.limit).to.equal(limit);
            expect(Number.isInteger(info.remaining) && info.remaining >= 0 && info.remaining < limit).to.equal(true);
            expect(Number.isInteger(info.resetMs) && info.resetMs >= 0 && info.resetMs <= 2 * windowMs).to.equal(true);
            if (!admitted) expect(info.remaining).to.equal(0);
          }
        }
      }),
      { numRuns: 100 },
    );
  });

  it('the memory store never holds more than maxKeys keys per limiter', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 8 }),
        fc.constantFrom<RateLimitAlgorithm>('sliding-window', 'token-bucket'),
        fc.array(fc.record({ key: fc.integer({ min: 0, max: 30 }), advanceMs: fc.integer({ min: 0, max: 400 }) }), { maxLength: 200 }),
        (maxKeys, algorithm, calls) => {
          const clock = manualClock(1000);
          const store = memoryStore({ maxKeys, clock });
          const rule = { name: 'p', limit: 3, windowMs: 1000, algorithm };
          const held = (): number => (store as unknown as { tables: Map<string, { keys: Lru<string, unknown> }> }).tables.get('p')!.keys.size;
          for (const { key, advanceMs } of calls) {
            clock.advance(advanceMs);
            store.consume(rule, `k${key}`);
            expect(held()).to.be.at.most(maxKeys);
            expect(store.size(rule)).to.be.at.most(maxKeys);
          }
        },
      ),
    );
  });

  it('keyed never evicts a pinned entry (calls in flight, open breaker)', async () => {
    class FakeBreaker extends BasePolicy<object> {
      readonly kind = 'circuit-breaker';
      state: 'closed' | 'open' | 'half-open' = 'closed';
      [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
        return Promise.resolve().then(() => fn(call));
      }
      stats(): object {
        return {};
      }
    }
    const key = fc.integer({ min: 0, max: 9 }).map((n) => `k${n}`);
    const op = fc.oneof(
      fc.record({ type: fc.constant('call' as const), key }),
      fc.record({ type: fc.constant('start' as const), key }),
      fc.record({ type: fc.constant('finish' as const), index: fc.nat() }),
      fc.record({ type: fc.constant('open' as const), key }),
      fc.record({ type: fc.constant('close' as const), key }),
    );
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 4 }), fc.array(op, { maxLength: 60 }), async (maxKeys, ops) => {
        const policy = keyed(() => new FakeBreaker('b'), { key: (_request, context) => context.key as string, maxKeys });
        const running: Array<{ key: string; finish: () => void; done: Promise<unknown> }> = [];
        // The instance each pinned key had when it became pinned.
        const identity = new Map<string, FakeBreaker>();
        const pinned = (k: string): boolean => running.some((r) => r.key === k) || identity.get(k)?.state === 'open';
        const check = (): void => {
          for (const [k, instance] of identity) if (pinned(k)) expect(policy.get(k), `pinned ${k}`).to.equal(instance);
        };
        for (const step of ops) {
          if (step.type === 'call') {
            await policy.execute(() => 1, undefined, { key: step.key });
            const pinnedCount = [...identity.keys()].filter(pinned).length;
            expect(policy.stats().keys).to.be.at.most(Math.max(maxKeys, pinnedCount));
          } else if (step.type === 'start') {
            let finish!: () => void;
            const gate = new Promise<void>((resolve) => (finish = resolve));
            const done = policy.execute(() => gate, undefined, { key: step.key });
            running.push({ key: step.key, finish, done });
            identity.set(step.key, policy.get(step.key) as FakeBreaker);
          } else if (step.type === 'finish') {
            if (running.length === 0) continue;
            const [call] = running.splice(step.index % running.length, 1);
            call!.finish();
            await call!.done;
          } else {
            const breaker = policy.get(step.key) as FakeBreaker | undefined;
            if (breaker === undefined) continue;
            breaker.state = step.type === 'open' ? 'open' : 'closed';
            identity.set(step.key, breaker);
          }
          check();
        }
        for (const call of running) call.finish();
        await Promise.all(running.map((r) => r.done));
      }),
      { numRuns: 200 },
    );
  });

  for (const ttlMs of [undefined, 50]) {
    it(`Lru${ttlMs === undefined ? '' : ' with ttlMs'}: behaves like a reference list in recency order`, () => {
      const op = fc.record({
        op: fc.constantFrom('get', 'set', 'set', 'delete', 'prune', 'peek', 'has', 'advance'),
        key: fc.integer({ min: 0, max: 12 }),
        n: fc.integer({ min: 0, max: 40 }),
      });
      fc.assert(
        fc.property(fc.integer({ min: 1, max: 6 }), fc.array(op, { minLength: 20, maxLength: 300 }), (maxSize, ops) => {
          const clock = manualClock(0);
          const lru = new Lru<number, number>({ maxSize, ttlMs, clock });
          // Oldest first: [key, value, expiresAt].
          const model: Array<[number, number, number]> = [];
          const live = (i: number): boolean => i >= 0 && clock.now() < model[i]![2];
          let version = 0;
          for (const { op: kind, key, n } of ops) {
            const i = model.findIndex(([k]) => k === key);
            if (kind === 'advance') clock.advance(n);
            else if (kind === 'get') {
              const expected = live(i) ? model[i]![1] : undefined;
              expect(lru.get(key)).to.equal(expected);
              if (i >= 0) {
                const [entry] = model.splice(i, 1);
                if (expected !== undefined) model.push(entry!);
              }
            } else if (kind === 'peek') expect(lru.peek(key)).to.equal(live(i) ? model[i]![1] : undefined);
            else if (kind === 'has') expect(lru.has(key)).to.equal(live(i));
            else if (kind === 'set') {
              const value = ++version;
              lru.set(key, value);
              if (i >= 0) model.splice(i, 1);
              model.push([key, value, ttlMs === undefined ? Infinity : clock.now() + ttlMs]);
              while (model.length > maxSize) model.shift();
            } else if (kind === 'delete') {
              expect(lru.delete(key)).to.equal(i >= 0);
              if (i >= 0) model.splice(i, 1);
            } else {
              // Drops up to n % 4 of the oldest entries while their key is even.
              let expected = 0;
              while (expected < n % 4 && model.length > 0 && model[0]![0] % 2 === 0) {
                model.shift();
                expected++;
              }
              expect(lru.prune((_value, k) => k % 2 === 0, n % 4)).to.equal(expected);
            }
            expect([...lru.entries()]).to.deep.equal(model.map(([k, v]) => [k, v]));
            expect(lru.size).to.equal(model.length);
          }
        }),
        { numRuns: 300 },
      );
    });
  }

  it('Lru: never above maxSize without pins; pinned entries are never evicted', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 6 }),
        fc.array(fc.record({ key: fc.integer({ min: 0, max: 20 }), pin: fc.boolean(), read: fc.boolean() }), { maxLength: 150 }),
        (maxSize, ops) => {
          const pins = new Set<number>();
          const lru = new Lru<number, number>({ maxSize, canEvict: (value) => !pins.has(value) });
          for (const { key, pin, read } of ops) {
            if (read) lru.get(key);
            else {
              const added = !lru.has(key);
              lru.set(key, key);
              // Room is made for a new entry unless everything else is pinned.
              if (added) expect(lru.size).to.be.at.most(Math.max(maxSize, pins.size + 1));
            }
            if (pin && lru.has(key)) pins.add(key);
            else if (!pin) pins.delete(key);
            for (const p of pins) expect(lru.has(p)).to.equal(true);
          }
          if (lru.trim() >= 0 && pins.size === 0) expect(lru.size).to.be.at.most(maxSize);
        },
      ),
    );
  });
});
