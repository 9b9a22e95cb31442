import { expect } from 'chai';
import sinon from 'sinon';
import fc from 'fast-check';
import type { Redis } from 'ioredis';
import { RateLimitError } from '../../lib/errors.js';
import type { CallContext } from '../../lib/policy.js';
import { rateLimit } from '../../lib/rate-limit.js';
import { slidingWindowConsume, slidingWindowIdle, tokenBucketConsume, tokenBucketIdle, type SlidingWindowState, type TokenBucketState } from '../../lib/stores/algorithms.js';
import type { RedisStore } from '../../lib/stores/redis.js';
import { decodeReply, replyRadix, slidingWindowScript, tokenBucketScript, type Script } from '../../lib/stores/redis/scripts.js';
import type { RateLimitAlgorithm, RateLimitDecision, RateLimitRule } from '../../lib/stores/types.js';
import { keysUnder, sharedRedisInstances } from './setup.js';

describe('redisStore: rate limits', function () {
  this.timeout(10_000);
  const redis = sharedRedisInstances();

  /** `count` separate instances: each its own connection and its own store. */
  async function instances(count: number): Promise<RedisStore[]> {
    const made: RedisStore[] = [];
    for (let i = 0; i < count; i++) made.push((await redis.instance({ commandTimeoutMs: 2000 })).store);
    return made;
  }

  function rule(algorithm: RateLimitAlgorithm, limit: number, windowMs: number, name = `${algorithm}-limiter`): RateLimitRule {
    return Object.freeze({ name, limit, windowMs, algorithm });
  }


  it('holds one limit between instances whose own clocks disagree by ±5 s: windows run on Redis time', async () => {
    const [a, b] = await instances(2);
    const limiter = rule('sliding-window', 10, 60_000, 'skewed');
    const clock = sinon.useFakeTimers({ now: Date.now(), toFake: ['Date', 'performance'] });
    try {
      let admitted = 0;
      for (let i = 0; i < 30; i++) {
        // Each "instance" sees its own time: one 5 s ahead, the other 5 s behind.
        clock.setSystemTime(Date.now() + (i % 2 === 0 ? 5_000 : -10_000));
        const decision = await (i % 2 === 0 ? a! : b!).consume(limiter, 'client');
        if (decision.allowed) admitted++;
      }
      expect(admitted).to.equal(10);
    } finally {
      clock.restore();
    }
  });

  for (const [algorithm, windowMs] of [
    ['sliding-window', 3_600_000],
    // A slow refill (one token per 36 s) so that the test's own duration adds none.
    ['token-bucket', 3_600_000],
  ] as const) {
    it(`${algorithm}: 3 instances × 200 concurrent calls, limit 100 → exactly 100 admitted`, async () => {
      const three = await instances(3);
      const limiter = rule(algorithm, 100, windowMs);
      const decisions = await Promise.all(three.flatMap((store) => Array.from({ length: 200 }, () => store.consume(limiter, 'client-1'))));
      const admitted = decisions.filter((d) => d.allowed);
      expect(admitted).to.have.length(100);
      // Atomic per decision: every admitted call saw a distinct remaining budget.
      expect(admitted.map((d) => d.remaining).sort((a, b) => a - b)).to.deep.equal(Array.from({ length: 100 }, (_, i) => i));
      for (const refused of decisions.filter((d) => !d.allowed)) {
        expect(refused.remaining).to.equal(0);
        expect(refused.retryAfterMs).to.be.greaterThan(0);
      }
      expect(three.map((store) => store.stats().fallbacks)).to.deep.equal([0, 0, 0]);
    });
  }

  it('keeps keys and limiters apart', async () => {
    const [store] = await instances(1);
    const a = rule('sliding-window', 2, 60_000, 'a');
    const b = rule('sliding-window', 2, 60_000, 'b');
    const seen = [];
    for (const [r, key] of [[a, 'x'], [a, 'x'], [a, 'x'], [a, 'y'], [b, 'x']] as const) seen.push((await store!.consume(r, key)).allowed);
    expect(seen).to.deep.equal([true, true, false, true, true]);
  });

  it('names with ":" do not collide with other names and keys', async () => {
    const [store] = await instances(1);
    const first = rule('sliding-window', 1, 60_000, 'a:b');
    const second = rule('sliding-window', 1, 60_000, 'a');
    expect((await store!.consume(first, 'c')).allowed).to.equal(true);
    expect((await store!.consume(second, 'b:c')).allowed).to.equal(true);
  });

  it('every key it writes has an expiry no longer than the algorithm needs', async () => {
    const [one, two] = await instances(2);
    const sliding = rule('sliding-window', 5, 10_000);
    const bucket = rule('token-bucket', 5, 10_000);
    for (let i = 0; i < 20; i++) {
      await Promise.all([one!.consume(sliding, `k${i % 4}`), two!.consume(bucket, `k${i % 3}`)]);
    }
    const keys = await keysUnder(redis.admin, redis.prefix);
    expect(keys).to.have.length(7);
    for (const key of keys) {
      const ttl = await redis.admin.pttl(key);
      expect(ttl, key).to.be.greaterThan(0);
      expect(ttl, key).to.be.at.most(key.startsWith(`${redis.prefix}sw:`) ? 20_000 : 10_000);
    }
  });

  it('a full token bucket and a missing key decide alike: the key expires once the bucket is full', async () => {
    const [store] = await instances(1);
    const bucket = rule('token-bucket', 10, 100);
    await store!.consume(bucket, 'k');
    // One token used: back to full after windowMs / limit = 10 ms.
    const [key] = await keysUnder(redis.admin, redis.prefix);
    expect(await redis.admin.pttl(key!)).to.be.within(1, 10);
  });

  it('holds the limit when a burst straddles a window boundary (no double burst)', async () => {
    const three = await instances(3);
    const limit = 60;
    const windowMs = 1000;
    const limiter = rule('sliding-window', limit, windowMs);
    // Start 15 ms before a boundary of Redis's clock (the windows are aligned to it).
    const now = await redisNow(redis.admin);
    let boundary = Math.ceil(now / windowMs) * windowMs;
    if (boundary - now < 50) boundary += windowMs;
    await new Promise((resolve) => setTimeout(resolve, boundary - now - 15));
    const before = await redisNow(redis.admin);
    const decisions = await Promise.all(three.flatMap((store) => Array.from({ length: 150 }, () => store.consume(limiter, 'edge'))));
    const duration = (await redisNow(redis.admin)) - before;
    const admitted = decisions.filter((d) => d.allowed).length;
    // A fixed window would admit up to 2 × limit here. The sliding window admits at most
    // limit, plus what the previous window's weight lost while the burst lasted.
    expect(admitted).to.be.at.least(limit);
    expect(admitted).to.be.at.most(limit + Math.ceil((limit * duration) / windowMs) + 1);
  });

  it('through rateLimit({ store }): one budget for all instances, RateLimit info on every call', async () => {
    const three = await instances(3);
    const limiters = three.map((store) => rateLimit({ name: 'api', limit: 30, windowMs: 3_600_000, store, key: () => 'tenant' }));
    const outcomes = await Promise.allSettled(
      limiters.flatMap((limiter) =>
        Array.from({ length: 20 }, async () => {
          const context: CallContext = {};
          await limiter.execute(() => 'ok', undefined, context);
          return context.rateLimit;
        }),
      ),
    );
    const ok = outcomes.filter((o) => o.status === 'fulfilled');
    const refused = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected');
    expect(ok).to.have.length(30);
    expect(refused).to.have.length(30);
    for (const r of refused) {
      expect(r.reason).to.be.instanceOf(RateLimitError);
      expect((r.reason as RateLimitError).retryAfterMs).to.be.greaterThan(0);
    }
    for (const o of ok) expect((o as PromiseFulfilledResult<unknown>).value).to.include({ limit: 30 });
    expect(limiters.reduce((sum, limiter) => sum + limiter.stats().admitted, 0)).to.equal(30);
  });

  it('refuses two limiters of one name with different settings', async () => {
    const [store] = await instances(1);
    await store!.consume(rule('sliding-window', 5, 1000, 'same'), 'k');
    expect(() => store!.consume(rule('sliding-window', 6, 1000, 'same'), 'k')).to.throw(TypeError, /different settings/);
  });

  it('answers with a table where one integer would not be exact (huge limits and windows)', async () => {
    const [store] = await instances(1);
    // remaining × (2 × windowMs + 1) is past 2^53 here, and so is retryAfterMs × the radix
    // below: the scripts answer with a table instead of one integer.
    const huge = 2 ** 52;
    for (const algorithm of ['sliding-window', 'token-bucket'] as const) {
      const big = rule(algorithm, huge, 1000, `huge-limit-${algorithm}`);
      const first = await store!.consume(big, 'k');
      expect(first).to.include({ allowed: true, limit: huge, remaining: huge - 1, retryAfterMs: 0 });
      expect(first.resetMs).to.be.within(1, 2000);
      // A key that exists (a bucket refills 2^52 tokens a second, so it may be full again).
      const second = await store!.consume(big, 'k');
      expect(second).to.include({ allowed: true, limit: huge, retryAfterMs: 0 });
      expect(second.remaining).to.be.oneOf([huge - 1, huge - 2]);
      expect(second.resetMs).to.be.within(1, 2000);
      const long = rule(algorithm, 1, 2 ** 40, `huge-window-${algorithm}`);
      expect(await store!.consume(long, 'k')).to.include({ allowed: true, remaining: 0 });
      const refused = await store!.consume(long, 'k');
      expect(refused).to.include({ allowed: false, remaining: 0 });
      expect(refused.retryAfterMs).to.be.within(2 ** 40 - 60_000, 2 ** 41);
      expect(refused.resetMs).to.be.within(2 ** 40 - 60_000, 2 ** 41);
    }
    expect(store!.stats()).to.include({ errors: 0, fallbacks: 0 });
  });

  describe('the Lua scripts are faithful ports of lib/stores/algorithms.ts', () => {
    // The same scripts with the time passed in (ARGV[1] s, ARGV[2] µs) instead of read from
    // TIME, so that Redis and the pure functions can be fed the same clock. Redis expires
    // keys by its real clock, which this test does not drive, so the expiry a script sets
    // is recorded in `<key>:ttl` (as ms from now) instead, and checked against the
    // algorithm's idle rule.
    function withTime(script: Script): string {
      const edits: Array<[string, string]> = [
        ["redis.call('TIME')", '{ARGV[1], ARGV[2]}'],
        // sliding window: an absolute expiry
        ["redis.call('PEXPIREAT', key, string.format('%d', start + 2 * windowMs))", "redis.call('SET', key .. ':ttl', start + 2 * windowMs - now)"],
        // token bucket: a relative one (a missing key, and any other)
        [", 'PX', ttl)", ") redis.call('SET', key .. ':ttl', ttl)"],
      ];
      let body = script.body;
      for (const [from, to] of edits) body = body.replaceAll(from, to);
      expect(body).to.not.match(/TIME|PEXPIRE|'PX'/);
      return body;
    }

    const step = fc.record({ advanceUs: fc.integer({ min: 0, max: 3_000_000 }), calls: fc.integer({ min: 1, max: 4 }) });

    for (const algorithm of ['sliding-window', 'token-bucket'] as const) {
      it(`${algorithm}: the same decisions, and keys that expire exactly when they go idle`, async () => {
        const scriptFor = algorithm === 'sliding-window' ? slidingWindowScript : tokenBucketScript;
        let run = 0;
        await fc.assert(
          fc.asyncProperty(
            fc.integer({ min: 1, max: 12 }),
            fc.integer({ min: 1, max: 2000 }),
            fc.integer({ min: 1_700_000_000_000_000, max: 1_800_000_000_000_000 }),
            fc.array(step, { minLength: 1, maxLength: 25 }),
            async (limit, windowMs, startUs, steps) => {
              const body = withTime(scriptFor(limit, windowMs));
              const key = `${redis.prefix}port:${run++}`;
              let us = startUs;
              let sliding: SlidingWindowState | undefined;
              let bucket: TokenBucketState | undefined;
              for (const { advanceUs, calls } of steps) {
                us += advanceUs;
                const seconds = Math.floor(us / 1e6);
                const micros = us % 1e6;
                // Exactly the expression the script computes.
                const now = seconds * 1000 + micros / 1000;
                for (let i = 0; i < calls; i++) {
                  let expected: RateLimitDecision;
                  if (algorithm === 'sliding-window') {
                    sliding ??= { start: Math.floor(now / windowMs) * windowMs, previous: 0, current: 0 };
                    expected = slidingWindowConsume(sliding, now, limit, windowMs);
                  } else {
                    bucket ??= { tokens: limit, at: now };
                    expected = tokenBucketConsume(bucket, now, limit, windowMs);
                  }
                  const [reply, ttl] = (await redis.admin
                    .multi()
                    .eval(body, 1, key, seconds, micros)
                    .getdel(`${key}:ttl`)
                    .exec())!.map(([error, value]) => {
                    if (error) throw error;
                    return value;
                  }) as [unknown, string | null];
                  expect(decodeReply(reply, limit, replyRadix(windowMs))).to.deep.equal(expected);
                  if (ttl === null) continue;
                  const ms = Number(ttl);
                  const idle = (at: number): boolean =>
                    algorithm === 'sliding-window' ? slidingWindowIdle(sliding!, at, windowMs) : tokenBucketIdle(bucket!, at, limit, windowMs);
                  expect(ms > 0, ttl).to.equal(true);
                  expect(idle(now + ms + 0.01), `idle after ${ms} ms`).to.equal(true);
                  if (ms > 1) expect(idle(now + ms - 1.01), `not idle before ${ms} ms`).to.equal(false);
                }
              }
            },
          ),
          { numRuns: 60 },
        );
      });
    }
  });
});

async function redisNow(client: Redis): Promise<number> {
  const [seconds, micros] = (await client.time()) as [string | number, string | number];
  return Number(seconds) * 1000 + Number(micros) / 1000;
}
