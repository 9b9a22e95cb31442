import { expect } from 'chai';
import sinon from 'sinon';
import { GuardRejection, RateLimitError } from '../lib/errors.js';
import { pipeline } from '../lib/pipeline.js';
import type { CallContext, NormalizedRequest } from '../lib/policy.js';
import { rateLimit } from '../lib/rate-limit.js';
import { memoryStore } from '../lib/stores/memory.js';
import type { RateLimitDecision, RateLimitRule, RateLimitStore } from '../lib/stores/types.js';

const request = (ip: string, path = '/'): NormalizedRequest => ({ ip, method: 'GET', path, headers: {} });
const from = (ip: string): CallContext => ({ request: request(ip) });
const ok = (): string => 'ok';

/** Runs one call; resolves to 'ok' or the rejection. */
async function attempt(policy: ReturnType<typeof rateLimit>, context: CallContext = {}): Promise<unknown> {
  try {
    return await policy.execute(ok, undefined, context);
  } catch (error) {
    return error;
  }
}

describe('rateLimit', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    // Starts at an arbitrary point, not at a window boundary.
    clock = sinon.useFakeTimers({ now: 0 });
    clock.tick(123_456);
  });
  afterEach(() => clock.restore());

  it('is a policy of kind rate-limit with a default name', () => {
    const limiter = rateLimit({ limit: 1, windowMs: 1000 });
    expect(limiter.kind).to.equal('rate-limit');
    expect(limiter.name).to.match(/^rateLimit-\d+$/);
    expect(rateLimit({ limit: 1, windowMs: 1000, name: 'search' }).name).to.equal('search');
    expect(limiter.algorithm).to.equal('sliding-window');
  });

  describe('sliding window (default)', () => {
    it('admits limit calls per window, then rejects with a 429 RateLimitError and the wait', async () => {
      const limiter = rateLimit({ limit: 3, windowMs: 1000, name: 'api' });
      const fn = sinon.spy(ok);
      for (let i = 0; i < 3; i++) expect(await limiter.execute(fn)).to.equal('ok');
      const context: CallContext = {};
      const error = await limiter.execute(fn, undefined, context).catch((e: unknown) => e);
      expect(fn.callCount).to.equal(3);
      expect(error).to.be.instanceOf(RateLimitError);
      expect(error).to.be.instanceOf(GuardRejection);
      const rejection = error as RateLimitError;
      expect(rejection).to.include({ reason: 'rate_limited', status: 429, code: 'BULWARK_RATE_LIMITED', policy: 'api' });
      // Built without a stack trace: rejections are the hot path of an attack.
      expect(rejection.stack ?? '').to.not.match(/\n\s+at /);
      // Three calls at 123456 fill the window [123000, 124000); the next fits when that window
      // has decayed enough, in the next one: at 124000 + 1000 - 1000 * 2/3.
      expect(rejection.retryAfterMs).to.equal(Math.ceil(124_000 + 1000 - (1000 * 2) / 3 - 123_456));
      expect(context.rateLimit).to.deep.equal({ limit: 3, remaining: 0, resetMs: Math.ceil(124_000 - 123_456 + 1000) });
    });

    it('admits again after retryAfterMs, not before', async () => {
      const limiter = rateLimit({ limit: 3, windowMs: 1000 });
      for (let i = 0; i < 3; i++) await attempt(limiter);
      const { retryAfterMs } = (await attempt(limiter)) as RateLimitError;
      clock.tick(retryAfterMs! - 1);
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      clock.tick(1);
      expect(await attempt(limiter)).to.equal('ok');
    });

    it('weighs the previous window by how much of it the sliding window still covers', async () => {
      clock.tick(1_000_000 - 123_456); // exactly at a window boundary: t = 1_000_000
      const limiter = rateLimit({ limit: 10, windowMs: 1000 });
      for (let i = 0; i < 10; i++) expect(await attempt(limiter)).to.equal('ok');
      clock.tick(1000); // next window starts; the previous one counts fully
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      clock.tick(500); // half of it still overlaps: 10 * 0.5 = 5 used, 5 left
      for (let i = 0; i < 4; i++) expect(await attempt(limiter)).to.equal('ok');
      const context: CallContext = {};
      expect(await attempt(limiter, context)).to.equal('ok');
      expect(context.rateLimit).to.deep.equal({ limit: 10, remaining: 0, resetMs: 1500 });
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      clock.tick(2000); // two windows later, nothing of the past counts
      for (let i = 0; i < 10; i++) expect(await attempt(limiter)).to.equal('ok');
    });

    it('records remaining and resetMs on every admitted call', async () => {
      const limiter = rateLimit({ limit: 3, windowMs: 1000 });
      const seen: unknown[] = [];
      for (let i = 0; i < 3; i++) {
        const context: CallContext = {};
        await attempt(limiter, context);
        seen.push(context.rateLimit);
      }
      const resetMs = 124_000 - 123_456 + 1000;
      expect(seen).to.deep.equal([
        { limit: 3, remaining: 2, resetMs },
        { limit: 3, remaining: 1, resetMs },
        { limit: 3, remaining: 0, resetMs },
      ]);
    });
  });

  describe('token bucket', () => {
    it('allows a burst of limit, then refills limit per windowMs, continuously', async () => {
      const limiter = rateLimit({ limit: 4, windowMs: 1000, algorithm: 'token-bucket' });
      expect(limiter.algorithm).to.equal('token-bucket');
      const contexts: CallContext[] = [];
      for (let i = 0; i < 4; i++) {
        const context: CallContext = {};
        expect(await attempt(limiter, context)).to.equal('ok');
        contexts.push(context);
      }
      expect(contexts.map((c) => c.rateLimit)).to.deep.equal([
        { limit: 4, remaining: 3, resetMs: 250 },
        { limit: 4, remaining: 2, resetMs: 500 },
        { limit: 4, remaining: 1, resetMs: 750 },
        { limit: 4, remaining: 0, resetMs: 1000 },
      ]);
      const context: CallContext = {};
      const rejection = (await attempt(limiter, context)) as RateLimitError;
      expect(rejection).to.be.instanceOf(RateLimitError);
      expect(rejection.retryAfterMs).to.equal(250);
      expect(context.rateLimit).to.deep.equal({ limit: 4, remaining: 0, resetMs: 1000 });
      clock.tick(249);
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      clock.tick(1);
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      // A long pause fills the bucket, never beyond limit.
      clock.tick(60_000);
      for (let i = 0; i < 4; i++) expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
    });
  });

  describe('keys', () => {
    it('keeps one budget per client IP by default', async () => {
      const limiter = rateLimit({ limit: 1, windowMs: 1000 });
      expect(await attempt(limiter, from('203.0.113.1'))).to.equal('ok');
      expect(await attempt(limiter, from('203.0.113.1'))).to.be.instanceOf(RateLimitError);
      expect(await attempt(limiter, from('203.0.113.2'))).to.equal('ok');
      expect(limiter.stats().keys).to.equal(2);
    });

    it('keys IPv6 clients by their /64 (rotating the interface id does not help)', async () => {
      const limiter = rateLimit({ limit: 2, windowMs: 1000 });
      expect(await attempt(limiter, from('2001:db8:1:2::1'))).to.equal('ok');
      expect(await attempt(limiter, from('2001:DB8:1:2:ffff:eeee:dddd:cccc'))).to.equal('ok');
      expect(await attempt(limiter, from('2001:0db8:0001:0002:0:0:0:7%eth0'))).to.be.instanceOf(RateLimitError);
      expect(await attempt(limiter, from('2001:db8:1:3::1'))).to.equal('ok');
    });

    it('keys an IPv4-mapped IPv6 client by its IPv4 address', async () => {
      const limiter = rateLimit({ limit: 1, windowMs: 1000 });
      expect(await attempt(limiter, from('::ffff:198.51.100.7'))).to.equal('ok');
      expect(await attempt(limiter, from('198.51.100.7'))).to.be.instanceOf(RateLimitError);
      // …and different IPv4 clients behind mapped addresses stay apart.
      expect(await attempt(limiter, from('::ffff:198.51.100.8'))).to.equal('ok');
    });

    it('uses one shared key outside a request (and for a request without an address)', async () => {
      const limiter = rateLimit({ limit: 2, windowMs: 1000 });
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter, from(''))).to.equal('ok');
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      expect(limiter.stats().keys).to.equal(1);
    });

    it('takes a key function of the request and the context', async () => {
      const key = sinon.spy((req: NormalizedRequest | undefined, context: CallContext) => `${req?.path ?? '-'}:${String(context.tenant)}`);
      const limiter = rateLimit({ limit: 1, windowMs: 1000, key });
      const context = { request: request('203.0.113.1', '/a'), tenant: 't1' };
      expect(await attempt(limiter, context)).to.equal('ok');
      expect(key.firstCall.args[0]).to.equal(context.request);
      expect(key.firstCall.args[1]).to.equal(context);
      expect(await attempt(limiter, { request: request('203.0.113.9', '/a'), tenant: 't1' })).to.be.instanceOf(RateLimitError);
      expect(await attempt(limiter, { request: request('203.0.113.1', '/a'), tenant: 't2' })).to.equal('ok');
      expect(await attempt(limiter, { request: request('203.0.113.1', '/b'), tenant: 't1' })).to.equal('ok');
    });

    it('accepts numeric keys; undefined, null and empty keys share one budget', async () => {
      const keys: unknown[] = [7, 7, undefined, null, ''];
      const limiter = rateLimit({ limit: 2, windowMs: 1000, key: () => keys.shift() as string });
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      expect(limiter.stats().keys).to.equal(2);
    });

    it('puts a call whose key function throws on the shared key, reports it, and never crashes', async () => {
      const boom = new Error('no tenant header');
      const limiter = rateLimit({
        limit: 2,
        windowMs: 1000,
        key: (req) => {
          if (req === undefined) throw boom;
          return req.ip;
        },
      });
      const errors: unknown[] = [];
      limiter.on('keyError', ({ error }) => errors.push(error));
      expect(await attempt(limiter)).to.equal('ok');
      expect(await attempt(limiter, from('*'))).to.equal('ok'); // the same budget
      expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
      expect(await attempt(limiter, from('203.0.113.1'))).to.equal('ok');
      expect(errors).to.deep.equal([boom, boom]);
    });
  });

  it('never runs the guarded function when it refuses', async () => {
    const limiter = rateLimit({ limit: 1, windowMs: 1000 });
    const fn = sinon.spy(ok);
    await limiter.execute(fn).catch(() => undefined);
    await limiter.execute(fn).catch(() => undefined);
    expect(fn.callCount).to.equal(1);
  });

  it('passes the guarded function’s result and error through', async () => {
    const limiter = rateLimit({ limit: 10, windowMs: 1000 });
    expect(await limiter.execute(async () => 42)).to.equal(42);
    const failure = new Error('upstream');
    expect(await limiter.execute(() => Promise.reject(failure)).catch((e: unknown) => e)).to.equal(failure);
    expect(
      await limiter
        .execute(() => {
          throw failure;
        })
        .catch((e: unknown) => e),
    ).to.equal(failure);
  });

  it('decides synchronously with the memory store (the guarded function starts before execute returns)', () => {
    const limiter = rateLimit({ limit: 1, windowMs: 1000 });
    let started = false;
    const running = limiter.execute(() => {
      started = true;
    });
    expect(started).to.equal(true);
    return running;
  });

  it('waits for a store that answers with a promise', async () => {
    const calls: Array<[RateLimitRule, string]> = [];
    const store: RateLimitStore = {
      consume: async (rule, key): Promise<RateLimitDecision> => {
        calls.push([rule, key]);
        await new Promise((resolve) => setTimeout(resolve, 5));
        return { allowed: calls.length <= 1, limit: rule.limit, remaining: 0, resetMs: 900, retryAfterMs: 700 };
      },
      size: () => 17,
    };
    const limiter = rateLimit({ limit: 1, windowMs: 1000, store, name: 'shared' });
    let started = false;
    const first = limiter.execute(() => {
      started = true;
      return 'ok';
    });
    expect(started).to.equal(false);
    await clock.tickAsync(5);
    expect(await first).to.equal('ok');
    const context: CallContext = {};
    const second = limiter.execute(ok, undefined, context).catch((e: unknown) => e);
    await clock.tickAsync(5);
    const rejection = (await second) as RateLimitError;
    expect(rejection).to.be.instanceOf(RateLimitError);
    expect(rejection.retryAfterMs).to.equal(700);
    expect(context.rateLimit).to.deep.equal({ limit: 1, remaining: 0, resetMs: 900 });
    expect(calls[0]![0]).to.deep.equal({ name: 'shared', limit: 1, windowMs: 1000, algorithm: 'sliding-window' });
    expect(calls[0]![1]).to.equal('*');
    expect(limiter.stats()).to.deep.equal({ keys: 17, admitted: 1, rejected: 1, limit: 1, windowMs: 1000, algorithm: 'sliding-window' });
  });

  it('shares a store between limiters, each with its own budgets', async () => {
    const store = memoryStore();
    const perSecond = rateLimit({ name: 'second', limit: 2, windowMs: 1000, store });
    const perMinute = rateLimit({ name: 'minute', limit: 3, windowMs: 60_000, store });
    const both = pipeline(perMinute, perSecond);
    expect(await both.execute(ok)).to.equal('ok');
    expect(await both.execute(ok)).to.equal('ok');
    // The outer limiter admitted (and counted) the third call before the inner one refused it.
    expect(await both.execute(ok).catch((e: unknown) => (e as RateLimitError).policy)).to.equal('second');
    clock.tick(2000);
    expect(await both.execute(ok).catch((e: unknown) => (e as RateLimitError).policy)).to.equal('minute');
    expect(perSecond.stats()).to.deep.equal({ keys: 0, admitted: 2, rejected: 1, limit: 2, windowMs: 1000, algorithm: 'sliding-window' });
    expect(perMinute.stats()).to.deep.equal({ keys: 1, admitted: 3, rejected: 1, limit: 3, windowMs: 60_000, algorithm: 'sliding-window' });
  });

  it('reports the tightest limiter of a pipeline in context.rateLimit', async () => {
    const loose = rateLimit({ limit: 100, windowMs: 1000 });
    const tight = rateLimit({ limit: 5, windowMs: 1000 });
    for (const order of [pipeline(loose, tight), pipeline(tight, loose)]) {
      const context: CallContext = {};
      await order.execute(ok, undefined, context);
      expect(context.rateLimit?.limit).to.equal(5);
    }
    const outerRefuses = pipeline(rateLimit({ limit: 1, windowMs: 1000 }), rateLimit({ limit: 100, windowMs: 1000 }));
    await outerRefuses.execute(ok);
    const context: CallContext = {};
    await outerRefuses.execute(ok, undefined, context).catch(() => undefined);
    expect(context.rateLimit).to.include({ limit: 1, remaining: 0 });
  });

  it('counts admitted and rejected calls and the keys it holds', async () => {
    const limiter = rateLimit({ limit: 2, windowMs: 1000, algorithm: 'token-bucket', maxKeys: 5 });
    for (let i = 0; i < 3; i++) await attempt(limiter, from('192.0.2.1'));
    for (let i = 0; i < 10; i++) await attempt(limiter, from(`192.0.2.${10 + i}`));
    expect(limiter.stats()).to.deep.equal({ keys: 5, admitted: 12, rejected: 1, limit: 2, windowMs: 1000, algorithm: 'token-bucket' });
    clock.tick(1000);
    expect(limiter.stats().keys).to.equal(0);
  });

  it('emits rejected (with the key), success and failure', async () => {
    const limiter = rateLimit({ limit: 2, windowMs: 1000 });
    const rejected: Array<{ reason: string; key: string; error: Error }> = [];
    const successes: Array<number | undefined> = [];
    const failures: unknown[] = [];
    limiter.on('rejected', (event) => rejected.push(event));
    limiter.on('success', ({ durationMs }) => successes.push(durationMs));
    limiter.on('failure', ({ error }) => failures.push(error));
    await limiter.execute(async () => {
      await clock.tickAsync(25);
    }, undefined, from('192.0.2.1'));
    const failure = new Error('x');
    await limiter.execute(() => Promise.reject(failure), undefined, from('192.0.2.1')).catch(() => undefined);
    await attempt(limiter, from('192.0.2.1'));
    expect(successes).to.deep.equal([25]);
    expect(failures).to.deep.equal([failure]);
    expect(rejected).to.have.length(1);
    expect(rejected[0]).to.include({ reason: 'rate_limited', key: '192.0.2.1' });
    expect(rejected[0]!.error).to.be.instanceOf(RateLimitError);
  });

  it('lets a store error through as the call’s error', async () => {
    const store = memoryStore();
    rateLimit({ name: 'clash', limit: 1, windowMs: 1000, store }).execute(ok).catch(() => undefined);
    const other = rateLimit({ name: 'clash', limit: 2, windowMs: 1000, store });
    const error = await other.execute(ok).catch((e: unknown) => e);
    expect(error).to.be.instanceOf(TypeError);
    expect((error as Error).message).to.match(/two limiters named "clash"/);
  });

  it('uses an injected clock for its default store', async () => {
    let now = 0;
    const limiter = rateLimit({ limit: 1, windowMs: 1000, clock: { now: () => now } });
    expect(await attempt(limiter)).to.equal('ok');
    clock.tick(10_000); // the fake global clock does not matter
    expect(await attempt(limiter)).to.be.instanceOf(RateLimitError);
    now = 2000;
    expect(await attempt(limiter)).to.equal('ok');
  });

  describe('validation', () => {
    const bad: Array<[string, object, string]> = [
      ['limit missing', { windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got undefined'],
      ['limit negative', { limit: -1, windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got -1'],
      ['limit zero', { limit: 0, windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got 0'],
      ['limit NaN', { limit: NaN, windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got NaN'],
      ['limit Infinity', { limit: Infinity, windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got Infinity'],
      ['limit fractional', { limit: 2.5, windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got 2.5'],
      ['limit string', { limit: '10', windowMs: 1000 }, 'rateLimit: limit must be a positive integer, got "10"'],
      ['windowMs missing', { limit: 1 }, 'rateLimit: windowMs must be a positive integer (milliseconds), got undefined'],
      ['windowMs negative', { limit: 1, windowMs: -5 }, 'rateLimit: windowMs must be a positive integer (milliseconds), got -5'],
      ['windowMs zero', { limit: 1, windowMs: 0 }, 'rateLimit: windowMs must be a positive integer (milliseconds), got 0'],
      ['windowMs NaN', { limit: 1, windowMs: NaN }, 'rateLimit: windowMs must be a positive integer (milliseconds), got NaN'],
      ['windowMs Infinity', { limit: 1, windowMs: Infinity }, 'rateLimit: windowMs must be a positive integer (milliseconds), got Infinity'],
      ['windowMs fractional', { limit: 1, windowMs: 0.5 }, 'rateLimit: windowMs must be a positive integer (milliseconds), got 0.5'],
      ['windowMs string', { limit: 1, windowMs: '1000' }, 'rateLimit: windowMs must be a positive integer (milliseconds), got "1000"'],
      ['unknown algorithm', { limit: 1, windowMs: 1000, algorithm: 'fixed-window' }, `rateLimit: algorithm must be one of 'sliding-window', 'token-bucket', got "fixed-window"`],
      ['maxKeys zero', { limit: 1, windowMs: 1000, maxKeys: 0 }, 'rateLimit: maxKeys must be a positive integer, got 0'],
      ['maxKeys negative', { limit: 1, windowMs: 1000, maxKeys: -10 }, 'rateLimit: maxKeys must be a positive integer, got -10'],
      ['maxKeys NaN', { limit: 1, windowMs: 1000, maxKeys: NaN }, 'rateLimit: maxKeys must be a positive integer, got NaN'],
      ['maxKeys Infinity', { limit: 1, windowMs: 1000, maxKeys: Infinity }, 'rateLimit: maxKeys must be a positive integer, got Infinity'],
      ['maxKeys string', { limit: 1, windowMs: 1000, maxKeys: '100' }, 'rateLimit: maxKeys must be a positive integer, got "100"'],
      ['key not a function', { limit: 1, windowMs: 1000, key: 'ip' }, 'rateLimit: key must be a function, got "ip"'],
      ['store not a store', { limit: 1, windowMs: 1000, store: {} }, 'rateLimit: store must be a rate-limit store (an object with consume() and size()), got {}'],
      ['store null', { limit: 1, windowMs: 1000, store: null }, 'rateLimit: store must be a rate-limit store (an object with consume() and size()), got null'],
      ['maxKeys with store', { limit: 1, windowMs: 1000, store: memoryStore(), maxKeys: 10 }, 'rateLimit: maxKeys cannot be combined with store (give maxKeys to the store)'],
      ['clock without now', { limit: 1, windowMs: 1000, clock: {} }, 'rateLimit: clock must be an object with a now() method, got {}'],
      ['empty name', { limit: 1, windowMs: 1000, name: '' }, 'rateLimit: name must be a non-empty string, got ""'],
      ['typo', { limit: 1, windowMs: 1000, windowMS: 1000 }, 'rateLimit: unknown option "windowMS" (allowed: limit, windowMs, key, algorithm, maxKeys, store, name, clock)'],
    ];
    for (const [label, options, message] of bad) {
      it(`throws a TypeError for ${label}`, () => {
        expect(() => rateLimit(options as never)).to.throw(TypeError, message);
      });
    }

    it('throws a TypeError for missing or non-object options', () => {
      expect(() => rateLimit(undefined as never)).to.throw(TypeError, 'rateLimit: limit must be a positive integer, got undefined');
      expect(() => rateLimit(5 as never)).to.throw(TypeError, 'rateLimit: options must be an object, got 5');
    });

    it('does not mutate the caller’s options', () => {
      const options = Object.freeze({ limit: 1, windowMs: 1000 });
      expect(() => rateLimit(options)).to.not.throw();
      expect(options).to.deep.equal({ limit: 1, windowMs: 1000 });
    });
  });
});
