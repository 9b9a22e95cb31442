import { expect } from 'chai';
import fc from 'fast-check';
import sinon from 'sinon';
import { adaptiveConcurrency, isOverloadFailure, type AdaptiveConcurrencyOptions } from '../lib/adaptive-concurrency.js';
import { BulkheadFullError, CircuitOpenError, ClientDisconnectedError, OverloadError, RateLimitError, TimeoutError } from '../lib/errors.js';
import { AimdLimit } from '../lib/limits/aimd.js';
import { GradientLimit } from '../lib/limits/gradient.js';
import type { Clock } from '../lib/clock.js';
import { deferred } from './helpers/promises.js';

/** A clock the test moves by hand. */
function manualClock(): Clock & { advance(ms: number): void } {
  let now = 0;
  return {
    now: () => now,
    advance(ms: number) {
      now += ms;
    },
  };
}


describe('adaptiveConcurrency', () => {
  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['an unknown algorithm', { algorithm: 'vegas' }, `adaptiveConcurrency: algorithm must be one of 'gradient', 'aimd', got "vegas"`],
      ['a negative initialLimit', { initialLimit: -1 }, 'adaptiveConcurrency: initialLimit must be a positive integer, got -1'],
      ['a fractional minLimit', { minLimit: 1.5 }, 'adaptiveConcurrency: minLimit must be a positive integer, got 1.5'],
      ['a zero maxLimit', { maxLimit: 0 }, 'adaptiveConcurrency: maxLimit must be a positive integer, got 0'],
      ['an infinite maxLimit', { maxLimit: Infinity }, 'adaptiveConcurrency: maxLimit must be a positive integer, got Infinity'],
      ['a string limit', { initialLimit: '10' }, 'adaptiveConcurrency: initialLimit must be a positive integer, got "10"'],
      ['minLimit above maxLimit', { minLimit: 50, maxLimit: 10 }, 'adaptiveConcurrency: minLimit (50) must not be greater than maxLimit (10)'],
      ['initialLimit below minLimit', { initialLimit: 2, minLimit: 5 }, 'adaptiveConcurrency: initialLimit must be an integer from minLimit (5) to maxLimit (1000), got 2'],
      ['initialLimit above maxLimit', { initialLimit: 20, maxLimit: 10 }, 'adaptiveConcurrency: initialLimit must be an integer from minLimit (1) to maxLimit (10), got 20'],
      ['smoothing 0', { smoothing: 0 }, 'adaptiveConcurrency: smoothing must be a number above 0 and at most 1, got 0'],
      ['smoothing NaN', { smoothing: NaN }, 'adaptiveConcurrency: smoothing must be a number above 0 and at most 1, got NaN'],
      ['rttTolerance below 1', { rttTolerance: 0.5 }, 'adaptiveConcurrency: rttTolerance must be a finite number >= 1, got 0.5'],
      ['longWindow 0', { longWindow: 0 }, 'adaptiveConcurrency: longWindow must be a positive integer, got 0'],
      ['queueSize 0', { queueSize: 0 }, 'adaptiveConcurrency: queueSize must be a finite number > 0, got 0'],
      ['windowMs negative', { windowMs: -1 }, 'adaptiveConcurrency: windowMs must be a finite number of milliseconds > 0, got -1'],
      ['minWindowSamples 0', { minWindowSamples: 0 }, 'adaptiveConcurrency: minWindowSamples must be a positive integer, got 0'],
      ['backoffRatio 1', { algorithm: 'aimd', backoffRatio: 1 }, 'adaptiveConcurrency: backoffRatio must be a number above 0 and below 1, got 1'],
      ['backoffRatio 0', { algorithm: 'aimd', backoffRatio: 0 }, 'adaptiveConcurrency: backoffRatio must be a number above 0 and below 1, got 0'],
      ['latencyThresholdMs Infinity', { algorithm: 'aimd', latencyThresholdMs: Infinity }, 'adaptiveConcurrency: latencyThresholdMs must be a finite number of milliseconds > 0, got Infinity'],
      ['a gradient tunable with aimd', { algorithm: 'aimd', smoothing: 0.5 }, `adaptiveConcurrency: smoothing does not apply to the 'aimd' algorithm`],
      ['an aimd tunable with gradient', { backoffRatio: 0.5 }, `adaptiveConcurrency: backoffRatio does not apply to the 'gradient' algorithm`],
      ['isDrop not a function', { isDrop: true }, 'adaptiveConcurrency: isDrop must be a function, got true'],
      ['a bad clock', { clock: 5 }, 'adaptiveConcurrency: clock must be an object with a now() method, got 5'],
      ['an empty name', { name: '' }, 'adaptiveConcurrency: name must be a non-empty string, got ""'],
      ['options that are not an object', 20, 'adaptiveConcurrency: options must be an object, got 20'],
      ['a typo', { maxLimt: 10 }, 'adaptiveConcurrency: unknown option "maxLimt"'],
    ];
    for (const [label, options, message] of cases) {
      it(`rejects ${label}`, () => {
        expect(() => adaptiveConcurrency(options as AdaptiveConcurrencyOptions)).to.throw(TypeError, message);
      });
    }

    it('defaults to gradient with limits 20 in 1..1000, keeping the default initial limit within the bounds', () => {
      const limiter = adaptiveConcurrency();
      expect(limiter.kind).to.equal('adaptive-concurrency');
      expect(limiter.stats()).to.deep.include({ algorithm: 'gradient', limit: 20, inflight: 0, admitted: 0, rejected: 0 });
      expect(adaptiveConcurrency({ maxLimit: 8 }).limit).to.equal(8);
      expect(adaptiveConcurrency({ minLimit: 30, algorithm: 'aimd' }).limit).to.equal(30);
    });
  });

  describe('admission', () => {
    it('rejects calls over the limit at once with OverloadError, and admits again when one ends', async () => {
      const limiter = adaptiveConcurrency({ initialLimit: 2, minLimit: 2, maxLimit: 2, name: 'db' });
      const first = deferred<string>();
      const second = deferred<string>();
      const a = limiter.execute(() => first.promise);
      const b = limiter.execute(() => second.promise);
      const fn = sinon.spy(() => 'c');
      const error = await limiter.execute(fn).catch((e: unknown) => e);
      expect(error).to.be.instanceOf(OverloadError);
      expect((error as OverloadError).status).to.equal(503);
      expect((error as OverloadError).policy).to.equal('db');
      expect((error as Error).stack?.split('\n')).to.have.length(1);
      expect(fn.called).to.equal(false);
      expect(limiter.stats()).to.deep.include({ inflight: 2, admitted: 2, rejected: 1 });

      first.resolve('a');
      expect(await a).to.equal('a');
      expect(await limiter.execute(fn)).to.equal('c');
      second.resolve('b');
      expect(await b).to.equal('b');
      expect(limiter.stats()).to.deep.include({ inflight: 0, admitted: 3, rejected: 1 });
    });

    it('releases its place when the function throws synchronously or rejects', async () => {
      const limiter = adaptiveConcurrency({ initialLimit: 1, minLimit: 1, maxLimit: 1 });
      const boom = new Error('boom');
      const thrown = await limiter
        .execute(() => {
          throw boom;
        })
        .catch((e: unknown) => e);
      expect(thrown).to.equal(boom);
      await limiter.execute(() => Promise.reject(boom)).catch(() => undefined);
      expect(limiter.stats().inflight).to.equal(0);
      expect(await limiter.execute(() => 1)).to.equal(1);
    });

    it('emits rejected, success, failure and limitChange', async () => {
      const clock = manualClock();
      const limiter = adaptiveConcurrency({ algorithm: 'aimd', initialLimit: 1, minLimit: 1, maxLimit: 5, latencyThresholdMs: 100, clock });
      const events: string[] = [];
      limiter.on('rejected', ({ reason }) => events.push(`rejected:${reason}`));
      limiter.on('success', ({ durationMs }) => events.push(`success:${durationMs}`));
      limiter.on('failure', () => events.push('failure'));
      limiter.on('limitChange', ({ from, to }) => events.push(`limit:${from}->${to}`));

      const slow = deferred();
      const running = limiter.execute(() => slow.promise);
      await limiter.execute(() => 1).catch(() => undefined);
      clock.advance(10);
      slow.resolve();
      await running;
      await limiter.execute(() => Promise.reject(new TimeoutError(50))).catch(() => undefined);
      expect(events).to.deep.equal(['rejected:overloaded', 'limit:1->2', 'success:10', 'limit:2->1', 'failure']);
    });
  });

  describe('what counts as a drop', () => {
    it('recognises overload failures by default', () => {
      expect(isOverloadFailure(new TimeoutError(100))).to.equal(true);
      expect(isOverloadFailure(new OverloadError())).to.equal(true);
      expect(isOverloadFailure(new BulkheadFullError())).to.equal(true);
      expect(isOverloadFailure(Object.assign(new Error('x'), { status: 503 }))).to.equal(true);
      expect(isOverloadFailure(Object.assign(new Error('x'), { statusCode: 429 }))).to.equal(true);
      expect(isOverloadFailure(Object.assign(new Error('x'), { status: 504 }))).to.equal(true);
      expect(isOverloadFailure(new DOMException('signal timed out', 'TimeoutError'))).to.equal(true);
      expect(isOverloadFailure(new CircuitOpenError())).to.equal(false);
      expect(isOverloadFailure(new RateLimitError(1000))).to.equal(false);
      expect(isOverloadFailure(Object.assign(new Error('x'), { status: 500 }))).to.equal(false);
      expect(isOverloadFailure(new Error('bug'))).to.equal(false);
      expect(isOverloadFailure('string')).to.equal(false);
    });

    it('shrinks the limit on drops, ignores other errors and clients that went away', async () => {
      const limiter = adaptiveConcurrency({ algorithm: 'aimd', initialLimit: 10, minLimit: 1, maxLimit: 10 });
      await limiter.execute(() => Promise.reject(new Error('bug'))).catch(() => undefined);
      await limiter.execute(() => Promise.reject(new ClientDisconnectedError())).catch(() => undefined);
      expect(limiter.stats()).to.deep.include({ limit: 10, dropped: 0 });
      await limiter.execute(() => Promise.reject(new TimeoutError(100))).catch(() => undefined);
      expect(limiter.stats()).to.deep.include({ limit: 9, dropped: 1 });
    });

    it('counts a call whose signal a timeout aborted as a drop, whatever it failed with', async () => {
      const limiter = adaptiveConcurrency({ algorithm: 'aimd', initialLimit: 10 });
      const controller = new AbortController();
      controller.abort(new TimeoutError(100));
      await limiter.execute(() => Promise.reject(new DOMException('aborted', 'AbortError')), controller.signal).catch(() => undefined);
      expect(limiter.stats()).to.deep.include({ limit: 9, dropped: 1 });
    });

    it('ignores a call whose client went away, even if it failed with an overload error', async () => {
      const limiter = adaptiveConcurrency({ algorithm: 'aimd', initialLimit: 10 });
      const controller = new AbortController();
      controller.abort(new ClientDisconnectedError());
      await limiter.execute(() => Promise.reject(new OverloadError()), controller.signal).catch(() => undefined);
      expect(limiter.stats()).to.deep.include({ limit: 10, dropped: 0 });
    });

    it('takes an isDrop of its own, and a throwing one counts nothing', async () => {
      const poolTimeout = Object.assign(new Error('pool timeout'), { code: 'P2024' });
      const limiter = adaptiveConcurrency({ algorithm: 'aimd', initialLimit: 10, isDrop: (e) => (e as { code?: string }).code === 'P2024' });
      await limiter.execute(() => Promise.reject(poolTimeout)).catch(() => undefined);
      await limiter.execute(() => Promise.reject(new TimeoutError(5))).catch(() => undefined);
      expect(limiter.stats()).to.deep.include({ limit: 9, dropped: 1 });

      const broken = adaptiveConcurrency({
        algorithm: 'aimd',
        initialLimit: 10,
        isDrop: () => {
          throw new Error('oops');
        },
      });
      const error = await broken.execute(() => Promise.reject(poolTimeout)).catch((e: unknown) => e);
      expect(error).to.equal(poolTimeout);
      expect(broken.stats()).to.deep.include({ limit: 10, dropped: 0 });
    });
  });

  describe('GradientLimit', () => {
    // One whole window (the default 250 ms): `samples` calls of `rttMs` at `inflight`,
    // the last one 250 ms after the first, which closes it.
    function window(limit: GradientLimit, at: { now: number }, rttMs: number, inflight: number, dropped = false, samples = 10): number {
      let result = limit.limit;
      for (let i = 0; i < samples; i++) {
        if (i === samples - 1) at.now += 250;
        result = limit.onSample(rttMs, inflight, dropped, at.now);
      }
      return result;
    }

    it('changes nothing until a window of windowMs and minWindowSamples is complete', () => {
      const limit = new GradientLimit({ initialLimit: 20, windowMs: 100, minWindowSamples: 3 });
      expect(limit.onSample(10, 20, false, 0)).to.equal(20);
      expect(limit.onSample(10, 20, false, 500)).to.equal(20);
      expect(limit.shortRttMs).to.equal(undefined);
      expect(limit.onSample(10, 20, false, 501)).to.equal(20);
      expect(limit.shortRttMs).to.equal(10);
      expect(limit.longRttMs).to.equal(10);
    });

    it('grows by queueSize × smoothing per window while latency holds and the limit is in use', () => {
      const limit = new GradientLimit({ initialLimit: 20 });
      const at = { now: 0 };
      const limits = Array.from({ length: 10 }, () => window(limit, at, 10, 20));
      // 20 → 20.8 → 21.6 → … (integer part reported)
      expect(limits).to.deep.equal([20, 21, 22, 23, 24, 24, 25, 26, 27, 28]);
    });

    it('does not grow while fewer than half of its places are used', () => {
      const limit = new GradientLimit({ initialLimit: 20 });
      const at = { now: 0 };
      for (let i = 0; i < 20; i++) window(limit, at, 10, 9);
      expect(limit.limit).to.equal(20);
    });

    it('shrinks when the short RTT rises above rttTolerance × the long one, by at most half per window', () => {
      const limit = new GradientLimit({ initialLimit: 100, smoothing: 1 });
      const at = { now: 0 };
      for (let i = 0; i < 10; i++) window(limit, at, 10, limit.limit);
      expect(limit.limit).to.equal(140); // gradient 1: + queueSize (4) per window
      // 1.4× the baseline is within the tolerance of 1.5: still growing.
      expect(window(limit, at, 14, 140)).to.equal(144);
      // 10× the baseline: the gradient's floor of 0.5 applies.
      expect(window(limit, at, 100, 144)).to.equal(144 * 0.5 + 4);
      // 2× the baseline: gradient 1.5 × 10 / 20 = 0.75.
      const fresh = new GradientLimit({ initialLimit: 100, smoothing: 1 });
      for (let i = 0; i < 10; i++) window(fresh, at, 10, 100);
      const before = fresh.limit;
      const long = fresh.longRttMs!;
      const expected = Math.floor(before * ((1.5 * (long + (20 - long) * (2 / 601))) / 20) + 4);
      expect(window(fresh, at, 20, before)).to.equal(expected);
      expect(expected).to.be.below(before);
    });

    it('takes the gradient floor for a window with a drop, leaving its duration out', () => {
      const limit = new GradientLimit({ initialLimit: 40, smoothing: 1 });
      const at = { now: 0 };
      window(limit, at, 10, 40, false, 10);
      const long = limit.longRttMs;
      window(limit, at, 5000, 40, true, 10);
      expect(limit.limit).to.equal(Math.floor(44 * 0.5 + 4));
      expect(limit.longRttMs).to.equal(long);
    });

    it('pulls the long RTT down quickly once calls are fast again', () => {
      const limit = new GradientLimit({ initialLimit: 20 });
      const at = { now: 0 };
      for (let i = 0; i < 30; i++) window(limit, at, 100, 20);
      for (let i = 0; i < 30; i++) window(limit, at, 10, 20);
      // An EWMA over 600 windows alone would still be near 91 ms.
      expect(limit.longRttMs).to.be.below(25);
    });

    it('stays an integer within [minLimit, maxLimit] whatever it is fed', () => {
      fc.assert(
        fc.property(
          fc.integer({ min: 1, max: 50 }),
          fc.integer({ min: 0, max: 100 }),
          fc.array(fc.record({ rtt: fc.double({ min: 0, max: 1e5, noNaN: true }), inflight: fc.integer({ min: 0, max: 500 }), dropped: fc.boolean(), dt: fc.double({ min: 0, max: 1000, noNaN: true }) }), { maxLength: 300 }),
          (minLimit, span, samples) => {
            const maxLimit = minLimit + span;
            const limit = new GradientLimit({ minLimit, maxLimit, initialLimit: minLimit, windowMs: 50, minWindowSamples: 2 });
            let now = 0;
            for (const s of samples) {
              now += s.dt;
              const value = limit.onSample(s.rtt, s.inflight, s.dropped, now);
              if (!Number.isInteger(value) || value < minLimit || value > maxLimit) return false;
            }
            return true;
          },
        ),
      );
    });
  });

  describe('AimdLimit', () => {
    it('grows by 1 per round of fast calls (1/limit each) while the limit is in use', () => {
      const limit = new AimdLimit({ initialLimit: 10, latencyThresholdMs: 100 });
      for (let i = 0; i < 10; i++) limit.onSample(20, 10, false);
      // +1 per call would make it 20 by now.
      expect(limit.limit).to.equal(10);
      limit.onSample(20, 10, false);
      expect(limit.limit).to.equal(11);
      for (let i = 0; i < 12; i++) limit.onSample(20, 11, false);
      expect(limit.limit).to.equal(12);
    });

    it('does not grow while fewer than half of its places are used', () => {
      const limit = new AimdLimit({ initialLimit: 10 });
      for (let i = 0; i < 100; i++) limit.onSample(20, 4, false);
      expect(limit.limit).to.equal(10);
    });

    it('backs off by backoffRatio on a drop or a slow call, once per round', () => {
      const limit = new AimdLimit({ initialLimit: 100, latencyThresholdMs: 100 });
      expect(limit.onSample(50, 100, true)).to.equal(90);
      // The 99 other calls of that round come back slow too: no further backoff.
      for (let i = 0; i < 99; i++) limit.onSample(150, 100, false);
      expect(limit.limit).to.equal(90);
      // The next round is slow as well: back off again.
      expect(limit.onSample(150, 90, false)).to.equal(81);
      const custom = new AimdLimit({ initialLimit: 100, backoffRatio: 0.5 });
      expect(custom.onSample(1, 100, true)).to.equal(50);
    });

    it('stays an integer within [minLimit, maxLimit] whatever it is fed', () => {
      fc.assert(
        fc.property(
          fc.integer({ min: 1, max: 50 }),
          fc.integer({ min: 0, max: 100 }),
          fc.array(fc.record({ rtt: fc.double({ min: 0, max: 1e4, noNaN: true }), inflight: fc.integer({ min: 0, max: 500 }), dropped: fc.boolean() }), { maxLength: 300 }),
          (minLimit, span, samples) => {
            const maxLimit = minLimit + span;
            const limit = new AimdLimit({ minLimit, maxLimit, initialLimit: maxLimit, latencyThresholdMs: 5000 });
            for (const s of samples) {
              const value = limit.onSample(s.rtt, s.inflight, s.dropped);
              if (!Number.isInteger(value) || value < minLimit || value > maxLimit) return false;
            }
            return true;
          },
        ),
      );
    });
  });

  describe('closed-loop simulation', () => {
    /**
     * Discrete-event simulation on an injected clock: a dependency whose latency grows
     * once more than `capacity` calls are in flight, driven by clients that call it in a
     * loop (and wait `BACKOFF_MS` after a rejection).
     */
    const BASE_MS = 100;
    const CAPACITY = 10;
    const BACKOFF_MS = 100;

    async function simulate(options: AdaptiveConcurrencyOptions): Promise<{ phase: (from: number, to: number) => number[]; completedIn: (from: number, to: number) => number }> {
      let now = 0;
      const timers: Array<{ at: number; resolve: () => void }> = [];
      const sleep = (ms: number): Promise<void> =>
        new Promise((resolve) => {
          const at = now + ms;
          let index = timers.length;
          while (index > 0 && timers[index - 1]!.at > at) index--;
          timers.splice(index, 0, { at, resolve });
        });

      const limiter = adaptiveConcurrency({ ...options, initialLimit: 50, clock: { now: () => now } });
      const dependency = { capacity: CAPACITY, inflight: 0 };
      const completions: number[] = [];
      const callDependency = async (): Promise<void> => {
        dependency.inflight++;
        await sleep(BASE_MS * Math.max(1, dependency.inflight / dependency.capacity));
        dependency.inflight--;
        completions.push(now);
      };

      let clients = 0;
      let wanted = 0;
      const client = async (id: number): Promise<void> => {
        while (id < wanted) {
          try {
            await limiter.execute(callDependency);
          } catch (error) {
            if (!(error instanceof OverloadError)) throw error;
            await sleep(BACKOFF_MS);
          }
        }
      };
      const setClients = (n: number): void => {
        wanted = n;
        for (; clients < n; clients++) void client(clients);
      };

      const limits: Array<[number, number]> = [];
      const END = 40_000;
      setClients(5); // light load: the baseline latency is learned
      let nextTrace = 0;
      while (now < END) {
        if (now >= nextTrace) {
          limits.push([now, limiter.limit]);
          nextTrace += 250;
        }
        const next = timers[0];
        const at = Math.min(next?.at ?? Infinity, nextTrace);
        if (now < 5000 && at >= 5000) {
          now = 5000;
          setClients(60); // six times what the dependency can take
          continue;
        }
        if (now < 25_000 && at >= 25_000) {
          now = 25_000;
          dependency.capacity = 60; // it recovers
          continue;
        }
        now = at;
        while (timers.length > 0 && timers[0]!.at <= now) timers.shift()!.resolve();
        await new Promise((resolve) => setImmediate(resolve));
      }
      wanted = 0;
      return {
        phase: (from, to) => limits.filter(([t]) => t >= from && t < to).map(([, limit]) => limit),
        completedIn: (from, to) => completions.filter((t) => t >= from && t < to).length,
      };
    }

    for (const algorithm of ['gradient', 'aimd'] as const) {
      it(`${algorithm}: comes down toward the dependency's capacity under overload, and climbs back once it recovers`, async function () {
        this.timeout(10_000);
        const run = await simulate(algorithm === 'aimd' ? { algorithm, latencyThresholdMs: 1.5 * BASE_MS } : { algorithm });

        // Light load: nothing learned about capacity, the limit stays where it was.
        expect(run.phase(0, 5000).every((limit) => limit === 50)).to.equal(true);

        // Overload: the limit settles between capacity and 2.5 × capacity…
        const overloaded = run.phase(15_000, 25_000);
        expect(Math.max(...overloaded), `limits under overload: ${overloaded.join(' ')}`).to.be.at.most(2.5 * CAPACITY);
        expect(Math.min(...overloaded), `limits under overload: ${overloaded.join(' ')}`).to.be.at.least(CAPACITY);
        // …so the dependency still works at (nearly) full throughput: ~100 calls/s.
        expect(run.completedIn(15_000, 25_000)).to.be.at.least(0.8 * (CAPACITY * 1000 / BASE_MS) * 10);

        // Recovery: the limit climbs back, well above the old capacity.
        const recovered = run.phase(35_000, 40_000);
        expect(Math.min(...recovered), `limits after recovery: ${recovered.join(' ')}`).to.be.at.least(4 * CAPACITY);
        expect(run.completedIn(35_000, 40_000)).to.be.above(2 * run.completedIn(20_000, 25_000));
      });
    }
  });
});
