import { expect } from 'chai';
import sinon from 'sinon';
import { circuitBreaker, CircuitBreaker, type CircuitBreakerOptions } from '../lib/circuit-breaker.js';
import { ClientDisconnectedError, CircuitOpenError, TimeoutError } from '../lib/errors.js';
import type { BreakerLink, BreakerPeerHandler, BreakerStore, SharedBreakerState } from '../lib/stores/types.js';
import { deferred as deferredOf, type Deferred } from './helpers/promises.js';
import type { Policy } from '../lib/policy.js';
import { bulkhead } from '../lib/bulkhead.js';
import { pipeline } from '../lib/pipeline.js';
import { timeout } from '../lib/timeout.js';

const deferred = <T = string>(): Deferred<T> => deferredOf<T>();

// Helpers ---------------------------------------------------------------------------------

const ok = (): Promise<string> => Promise.resolve('ok');
const boom = (): Promise<never> => Promise.reject(new Error('boom'));

/** Resolves with the value or the rejection reason, whichever the promise settles with. */
async function settle(promise: Promise<unknown>): Promise<unknown> {
  try {
    return await promise;
  } catch (error) {
    return error;
  }
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('expected the promise to reject');
}

async function times(breaker: CircuitBreaker, n: number, fn: () => Promise<unknown>): Promise<void> {
  for (let i = 0; i < n; i++) await settle(breaker.execute(fn));
}

/** Records every stateChange as `from>to:reason`. */
function transitions(breaker: CircuitBreaker): string[] {
  const seen: string[] = [];
  breaker.on('stateChange', ({ from, to, reason }) => seen.push(`${from}>${to}:${reason}`));
  return seen;
}

class NotFound extends Error {}
class GoneForGood extends NotFound {}

// A BreakerStore in memory, shared by breakers of one name as if by several instances.
class FakeBreakerStore implements BreakerStore {
  attachments = 0;
  detached = 0;
  acquires = 0;
  releases = 0;
  published: Array<{ instance: number; state: SharedBreakerState; openMs: number }> = [];
  private readonly peers: Array<{ instance: number; name: string; peer: BreakerPeerHandler }> = [];
  private lock: { instance: number; until: number; holders: number } | undefined;

  attach(name: string, peer: BreakerPeerHandler): BreakerLink {
    const instance = ++this.attachments;
    this.peers.push({ instance, name, peer });
    return {
      publish: (state, openMs) => {
        this.published.push({ instance, state, openMs });
        for (const other of this.peers) {
          if (other.instance === instance || other.name !== name) continue;
          // Delivered asynchronously, as pub/sub would.
          void Promise.resolve().then(() => (state === 'open' ? other.peer.opened(openMs) : state === 'closed' ? other.peer.closed() : undefined));
        }
      },
      acquireProbe: (ttlMs) => {
        this.acquires++;
        const now = performance.now();
        const lock = this.lock;
        if (lock !== undefined && lock.instance !== instance && lock.until > now) return Promise.resolve(false);
        this.lock = { instance, until: now + ttlMs, holders: lock?.instance === instance ? lock.holders + 1 : 1 };
        return Promise.resolve(true);
      },
      releaseProbe: () => {
        this.releases++;
        if (this.lock?.instance === instance && --this.lock.holders === 0) this.lock = undefined;
      },
      detach: () => {
        this.detached++;
        const index = this.peers.findIndex((p) => p.instance === instance);
        if (index >= 0) this.peers.splice(index, 1);
      },
    };
  }
}

describe('circuitBreaker', () => {
  let clock: sinon.SinonFakeTimers;

  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });

  afterEach(() => {
    clock.restore();
    sinon.restore();
  });

  describe('construction', () => {
    it('starts closed with an empty window and a generated name', () => {
      const breaker = circuitBreaker();
      expect(breaker).to.be.instanceOf(CircuitBreaker);
      expect(breaker.kind).to.equal('circuit-breaker');
      expect(breaker.name).to.match(/^circuitBreaker-\d+$/);
      expect(breaker.state).to.equal('closed');
      expect(breaker.stats()).to.deep.equal({
        state: 'closed',
        forced: false,
        calls: 0,
        failures: 0,
        slowCalls: 0,
        failureRate: 0,
        slowCallRate: 0,
        consecutiveFailures: 0,
        totals: { successes: 0, failures: 0, slowCalls: 0, rejections: 0, ignored: 0 },
      });
    });

    it('uses the given name in rejections', async () => {
      const breaker = circuitBreaker({ name: 'users-api', consecutiveFailures: 1 });
      await settle(breaker.execute(boom));
      const error = await rejection(breaker.execute(ok));
      expect(error).to.be.instanceOf(CircuitOpenError);
      expect((error as CircuitOpenError).policy).to.equal('users-api');
      expect((error as CircuitOpenError).message).to.equal('circuit "users-api" is open');
    });

    it('neither mutates nor keeps the caller’s options', async () => {
      const exclude = [NotFound];
      const options = Object.freeze({ consecutiveFailures: 1, exclude });
      const breaker = circuitBreaker(options);
      exclude.length = 0;
      await settle(breaker.execute(() => Promise.reject(new NotFound())));
      expect(breaker.state).to.equal('closed');
      expect(options).to.deep.equal({ consecutiveFailures: 1, exclude: [] });
    });

    const invalid: Array<[unknown, string]> = [
      ['fast', 'circuitBreaker: options must be an object, got "fast"'],
      [{ openMS: 1000 }, 'circuitBreaker: unknown option "openMS"'],
      [{ name: '' }, 'circuitBreaker: name must be a non-empty string, got ""'],
      [{ failureRateThreshold: 0 }, 'circuitBreaker: failureRateThreshold must be a number above 0 and at most 100, got 0'],
      [{ failureRateThreshold: 101 }, 'circuitBreaker: failureRateThreshold must be a number above 0 and at most 100, got 101'],
      [{ failureRateThreshold: NaN }, 'circuitBreaker: failureRateThreshold must be a number above 0 and at most 100, got NaN'],
      [{ failureRateThreshold: '50' }, 'circuitBreaker: failureRateThreshold must be a number above 0 and at most 100, got "50"'],
      [{ minimumCalls: 0 }, 'circuitBreaker: minimumCalls must be a positive integer, got 0'],
      [{ minimumCalls: 2.5 }, 'circuitBreaker: minimumCalls must be a positive integer, got 2.5'],
      [{ consecutiveFailures: -1 }, 'circuitBreaker: consecutiveFailures must be a positive integer, got -1'],
      [{ consecutiveFailures: Infinity }, 'circuitBreaker: consecutiveFailures must be a positive integer, got Infinity'],
      [{ slowCallMs: 0 }, 'circuitBreaker: slowCallMs must be a finite number of milliseconds > 0, got 0'],
      [{ slowCallMs: Infinity }, 'circuitBreaker: slowCallMs must be a finite number of milliseconds > 0, got Infinity'],
      [{ slowCallMs: 100, slowCallRateThreshold: -5 }, 'circuitBreaker: slowCallRateThreshold must be a number above 0 and at most 100, got -5'],
      [{ slowCallRateThreshold: 50 }, 'circuitBreaker: slowCallRateThreshold must be used together with slowCallMs (which says what a slow call is), got 50'],
      [{ openMs: -1 }, 'circuitBreaker: openMs must be a finite number of milliseconds > 0, got -1'],
      [{ openMs: Infinity }, 'circuitBreaker: openMs must be a finite number of milliseconds > 0, got Infinity'],
      [{ openMs: '30s' }, 'circuitBreaker: openMs must be a finite number of milliseconds > 0, got "30s"'],
      [{ openMs: null }, 'circuitBreaker: openMs must be a finite number of milliseconds > 0, got null'],
      [{ halfOpenProbes: 0 }, 'circuitBreaker: halfOpenProbes must be a positive integer, got 0'],
      [{ halfOpenProbes: 1.5 }, 'circuitBreaker: halfOpenProbes must be a positive integer, got 1.5'],
      [{ halfOpenMaxMs: 0 }, 'circuitBreaker: halfOpenMaxMs must be a finite number of milliseconds > 0, got 0'],
      [{ window: 'count' }, `circuitBreaker: window must be an object such as { kind: 'count', size: 100 }, got "count"`],
      [{ window: { size: 10 } }, `circuitBreaker: window.kind must be one of 'count', 'time', got undefined`],
      [{ window: { kind: 'sliding' } }, `circuitBreaker: window.kind must be one of 'count', 'time', got "sliding"`],
      [{ window: { kind: 'count', size: 0 } }, 'circuitBreaker: window.size must be a positive integer, got 0'],
      [{ window: { kind: 'count', ms: 1000 } }, 'circuitBreaker: unknown option "window.ms" for a count window (allowed: kind, size)'],
      [{ window: { kind: 'time', ms: 0 } }, 'circuitBreaker: window.ms must be a finite number of milliseconds > 0, got 0'],
      [{ window: { kind: 'time', buckets: 0 } }, 'circuitBreaker: window.buckets must be a positive integer, got 0'],
      [{ window: { kind: 'time', ms: 5, buckets: 10 } }, 'circuitBreaker: window.buckets must be at most window.ms (5), so that a bucket lasts at least 1 ms, got 10'],
      [{ window: { kind: 'time', size: 10 } }, 'circuitBreaker: unknown option "window.size" for a time window (allowed: kind, ms, buckets)'],
      [{ isFailure: true }, 'circuitBreaker: isFailure must be a function, got true'],
      [{ isFailureResult: 'yes' }, 'circuitBreaker: isFailureResult must be a function, got "yes"'],
      [{ exclude: TypeError }, 'circuitBreaker: exclude must be an array of error classes, got a function'],
      [{ exclude: ['TypeError'] }, 'circuitBreaker: exclude[0] must be an error class, got "TypeError"'],
      [{ exclude: [TypeError, () => undefined] }, 'circuitBreaker: exclude[1] must be an error class, got a function'],
      [{ store: {} }, 'circuitBreaker: store must be a breaker store (an object with attach()), got {}'],
      [{ clock: Date }, 'circuitBreaker: clock must be an object with a now() method, got a function'],
    ];
    for (const [options, message] of invalid) {
      it(`rejects ${JSON.stringify(options, (_key, value: unknown) => (typeof value === 'number' && !Number.isFinite(value) ? String(value) : typeof value === 'function' ? 'fn' : value))}`, () => {
        expect(() => circuitBreaker(options as CircuitBreakerOptions)).to.throw(TypeError, message);
      });
    }
  });

  describe('failure rate', () => {
    it('opens when the window holds minimumCalls and the rate reaches the threshold', async () => {
      const breaker = circuitBreaker({ minimumCalls: 10 });
      const seen = transitions(breaker);
      await times(breaker, 9, boom);
      expect(breaker.state).to.equal('closed');
      expect(breaker.stats()).to.include({ calls: 9, failures: 9, failureRate: 100 });
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
      expect(seen).to.deep.equal(['closed>open:failure-rate']);
    });

    it('stays closed below the threshold and opens when it reaches it', async () => {
      const breaker = circuitBreaker({ minimumCalls: 10, failureRateThreshold: 50 });
      await times(breaker, 6, ok);
      await times(breaker, 5, boom); // 5 of 11
      expect(breaker.state).to.equal('closed');
      expect(breaker.stats().failureRate).to.be.closeTo(45.45, 0.01);
      await times(breaker, 1, boom); // 6 of 12
      expect(breaker.state).to.equal('open');
    });

    it('forgets calls that left a count window', async () => {
      const breaker = circuitBreaker({ window: { kind: 'count', size: 4 }, minimumCalls: 4, failureRateThreshold: 75 });
      await times(breaker, 2, boom);
      await times(breaker, 4, ok); // the two failures leave the window
      expect(breaker.stats()).to.include({ calls: 4, failures: 0 });
      await times(breaker, 2, boom);
      expect(breaker.stats()).to.include({ calls: 4, failures: 2, state: 'closed' });
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
    });

    it('opens on the success that brings the window to minimumCalls, alone or in a pipeline', async () => {
      for (const wrap of [(b: CircuitBreaker): Policy => b, (b: CircuitBreaker): Policy => pipeline(bulkhead({ limit: 5 }), timeout(1000), b)]) {
        const breaker = circuitBreaker({ minimumCalls: 4, failureRateThreshold: 50 });
        const guard = wrap(breaker);
        for (let i = 0; i < 2; i++) await guard.execute(boom).catch(() => undefined);
        await guard.execute(ok);
        expect(breaker.state).to.equal('closed');
        await guard.execute(ok); // 2 failures of 4: the rate is reached by a success
        expect(breaker.state).to.equal('open');
      }
    });

    it('lowers minimumCalls to the size of a smaller count window', async () => {
      const breaker = circuitBreaker({ window: { kind: 'count', size: 5 } }); // minimumCalls 20 by default
      await times(breaker, 5, boom);
      expect(breaker.state).to.equal('open');
    });
  });

  describe('consecutive failures', () => {
    it('opens after N failures in a row; a success breaks the run', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 3 });
      const seen = transitions(breaker);
      await times(breaker, 2, boom);
      await times(breaker, 1, ok);
      await times(breaker, 2, boom);
      expect(breaker.stats()).to.include({ state: 'closed', consecutiveFailures: 2 });
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
      expect(seen).to.deep.equal(['closed>open:consecutive-failures']);
    });

    it('keeps both rules live: the rate trips it without a run of failures', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 5, minimumCalls: 4 });
      const seen = transitions(breaker);
      for (let i = 0; i < 2; i++) {
        await times(breaker, 1, boom);
        await times(breaker, 1, ok);
      }
      expect(breaker.state).to.equal('open');
      expect(seen).to.deep.equal(['closed>open:failure-rate']);
    });

    it('keeps both rules live: a run trips it before minimumCalls', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 5, minimumCalls: 20 });
      await times(breaker, 4, boom);
      expect(breaker.state).to.equal('closed');
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
    });

    it('does not let an excluded error break a run', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 3, exclude: [NotFound] });
      await times(breaker, 2, boom);
      await times(breaker, 1, () => Promise.reject(new NotFound()));
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
    });
  });

  describe('slow calls', () => {
    const slow = (): Promise<string> => new Promise((resolve) => setTimeout(() => resolve('late'), 150));

    async function slowCall(breaker: CircuitBreaker): Promise<unknown> {
      const result = settle(breaker.execute(slow));
      await clock.tickAsync(150);
      return result;
    }

    it('opens when the share of slow calls reaches slowCallRateThreshold', async () => {
      const breaker = circuitBreaker({ slowCallMs: 100, slowCallRateThreshold: 50, minimumCalls: 4 });
      const seen = transitions(breaker);
      await times(breaker, 2, ok);
      expect(await slowCall(breaker)).to.equal('late');
      expect(breaker.stats()).to.include({ state: 'closed', slowCalls: 1, failures: 0 });
      await slowCall(breaker);
      expect(breaker.state).to.equal('open');
      expect(seen).to.deep.equal(['closed>open:slow-call-rate']);
      expect(breaker.stats()).to.deep.include({ calls: 4, slowCalls: 2, slowCallRate: 50, failures: 0 });
      expect(breaker.stats().totals).to.include({ successes: 4, failures: 0, slowCalls: 2 });
    });

    it('stays closed below the slow-call threshold', async () => {
      const breaker = circuitBreaker({ slowCallMs: 100, slowCallRateThreshold: 50, minimumCalls: 4 });
      await times(breaker, 3, ok);
      await slowCall(breaker);
      expect(breaker.stats()).to.include({ state: 'closed', slowCallRate: 25 });
    });

    it('defaults slowCallRateThreshold to 100 when only slowCallMs is set', async () => {
      const breaker = circuitBreaker({ slowCallMs: 100, minimumCalls: 3, window: { kind: 'count', size: 3 } });
      await times(breaker, 1, ok);
      await slowCall(breaker);
      await slowCall(breaker);
      expect(breaker.state).to.equal('closed');
      await slowCall(breaker); // the fast one has left the window: 3 of 3 slow
      expect(breaker.state).to.equal('open');
    });

    it('reopens on a slow probe', async () => {
      const breaker = circuitBreaker({ slowCallMs: 100, consecutiveFailures: 1, openMs: 1000 });
      const seen = transitions(breaker);
      await times(breaker, 1, boom);
      await clock.tickAsync(1000);
      expect(await slowCall(breaker)).to.equal('late');
      expect(seen).to.deep.equal(['closed>open:consecutive-failures', 'open>half-open:open-elapsed', 'half-open>open:probe-failed']);
    });
  });

  describe('time window', () => {
    it('forgets failures older than window.ms', async () => {
      const breaker = circuitBreaker({ window: { kind: 'time', ms: 10_000, buckets: 10 }, minimumCalls: 4 });
      await times(breaker, 3, boom);
      await clock.tickAsync(10_000);
      expect(breaker.stats().calls).to.equal(0);
      await times(breaker, 3, boom);
      expect(breaker.state).to.equal('closed');
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
    });

    it('rolls bucket by bucket', async () => {
      const breaker = circuitBreaker({ window: { kind: 'time', ms: 10_000, buckets: 10 } });
      await times(breaker, 1, boom);
      await clock.tickAsync(3000);
      await times(breaker, 2, ok);
      expect(breaker.stats()).to.include({ calls: 3, failures: 1 });
      await clock.tickAsync(7000); // t = 10 000: the first bucket has gone
      expect(breaker.stats()).to.include({ calls: 2, failures: 0 });
      await clock.tickAsync(3000);
      expect(breaker.stats()).to.include({ calls: 0 });
    });

    it('defaults to 60 s in 10 buckets', async () => {
      const breaker = circuitBreaker({ window: { kind: 'time' } });
      await times(breaker, 1, boom);
      await clock.tickAsync(59_999);
      expect(breaker.stats().calls).to.equal(1);
      await clock.tickAsync(1);
      expect(breaker.stats().calls).to.equal(0);
    });
  });

  describe('open', () => {
    it('refuses calls at once with CircuitOpenError, without a stack, and never runs them', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000 });
      await times(breaker, 1, boom);
      const fn = sinon.spy(ok);
      const error = (await rejection(breaker.execute(fn))) as CircuitOpenError;
      expect(fn.called).to.equal(false);
      expect(error).to.be.instanceOf(CircuitOpenError);
      expect(error).to.include({ reason: 'circuit_open', status: 503, code: 'BULWARK_CIRCUIT_OPEN', retryAfterMs: 1000 });
      expect(String(error.stack)).not.to.include(' at ');
      expect(breaker.stats().totals.rejections).to.equal(1);
    });

    it('gives the remaining open time, rounded up, as retryAfterMs', async () => {
      let now = 0;
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000, clock: { now: () => now } });
      await times(breaker, 1, boom);
      now = 400.2;
      expect(await rejection(breaker.execute(ok))).to.have.property('retryAfterMs', 600);
      expect(breaker.stats().remainingOpenMs).to.equal(600);
    });

    it('half-opens after openMs when next used or read, without a timer', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000 });
      await times(breaker, 1, boom);
      expect(clock.countTimers()).to.equal(0);
      await clock.tickAsync(999);
      expect(breaker.state).to.equal('open');
      expect(breaker.stats().remainingOpenMs).to.equal(1);
      await clock.tickAsync(1);
      expect(breaker.state).to.equal('half-open');
      expect(breaker.stats()).to.not.have.property('remainingOpenMs');
    });

    it('follows the monotonic clock when the wall clock jumps', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 60_000 });
      await times(breaker, 1, boom);
      clock.setSystemTime(Date.now() + 86_400_000);
      expect(breaker.stats()).to.include({ state: 'open', remainingOpenMs: 60_000 });
      clock.setSystemTime(Date.now() - 2 * 86_400_000);
      expect(breaker.stats()).to.include({ state: 'open', remainingOpenMs: 60_000 });
      await clock.tickAsync(60_000);
      expect(breaker.state).to.equal('half-open');
    });

    it('creates no timer, tripped or idle, even with 10 000 breakers', async () => {
      const breakers = Array.from({ length: 10_000 }, (_, i) => circuitBreaker({ name: `idle-${i}`, consecutiveFailures: 1 }));
      for (const breaker of breakers.slice(0, 100)) await times(breaker, 1, boom);
      expect(breakers.slice(0, 100).every((b) => b.state === 'open')).to.equal(true);
      expect(clock.countTimers()).to.equal(0);
    });
  });

  describe('half-open', () => {
    async function tripped(options: CircuitBreakerOptions = {}): Promise<CircuitBreaker> {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000, ...options });
      await times(breaker, 1, boom);
      await clock.tickAsync(1000);
      expect(breaker.state).to.equal('half-open');
      return breaker;
    }

    it('lets exactly one probe through and rejects 99 concurrent calls at once', async () => {
      const breaker = await tripped();
      const probe = deferred();
      const fn = sinon.spy(() => probe.promise);
      const outcomes: unknown[] = [];
      const calls = Array.from({ length: 100 }, () => settle(breaker.execute(fn)).then((outcome) => outcomes.push(outcome)));
      await clock.tickAsync(0);
      expect(fn.callCount).to.equal(1);
      expect(outcomes).to.have.length(99);
      expect(outcomes.every((outcome) => outcome instanceof CircuitOpenError)).to.equal(true);
      expect(breaker.stats().probes).to.deep.equal({ inFlight: 1, succeeded: 0 });
      probe.resolve('fine');
      await Promise.all(calls);
      expect(outcomes[99]).to.equal('fine');
      expect(breaker.state).to.equal('closed');
      expect(breaker.stats().calls).to.equal(0); // a fresh window after closing
    });

    it('reopens when the probe fails; refused callers never ran', async () => {
      const breaker = await tripped();
      const seen = transitions(breaker);
      const probe = deferred();
      const fn = sinon.spy(() => probe.promise);
      const first = settle(breaker.execute(fn));
      const second = settle(breaker.execute(fn));
      probe.reject(new Error('still down'));
      expect(await second).to.be.instanceOf(CircuitOpenError);
      expect(await first).to.have.property('message', 'still down');
      expect(fn.callCount).to.equal(1);
      expect(breaker.stats()).to.include({ state: 'open', remainingOpenMs: 1000 });
      expect(seen).to.deep.equal(['half-open>open:probe-failed']);
      await clock.tickAsync(1000);
      expect(breaker.state).to.equal('half-open');
    });

    it('reopens when the probe hangs past halfOpenMaxMs, and tries again later', async () => {
      const breaker = await tripped({ halfOpenMaxMs: 500 });
      const seen = transitions(breaker);
      const hung = deferred();
      const fn = sinon.stub().onFirstCall().returns(hung.promise).returns(Promise.resolve('recovered'));
      void settle(breaker.execute(fn));
      await clock.tickAsync(499);
      expect(breaker.state).to.equal('half-open');
      expect(await rejection(breaker.execute(fn))).to.be.instanceOf(CircuitOpenError);
      await clock.tickAsync(1);
      expect(breaker.stats()).to.include({ state: 'open', remainingOpenMs: 1000 });
      await clock.tickAsync(1000);
      // The hung probe answering late changes nothing: its half-open period is over.
      hung.resolve('too late');
      await clock.tickAsync(0);
      expect(breaker.state).to.equal('half-open');
      expect(await breaker.execute(fn)).to.equal('recovered');
      expect(breaker.state).to.equal('closed');
      expect(fn.callCount).to.equal(2);
      expect(seen).to.deep.equal(['half-open>open:probe-timeout', 'open>half-open:open-elapsed', 'half-open>closed:probes-succeeded']);
    });

    it('times a hung probe from when it started, even if nobody looks for a while', async () => {
      const breaker = await tripped({ halfOpenMaxMs: 500 });
      const seen = transitions(breaker);
      void settle(breaker.execute(() => new Promise(() => undefined)));
      await clock.tickAsync(1600); // probe times out at 500, open until 1500, half-open since
      expect(breaker.state).to.equal('half-open');
      expect(seen).to.deep.equal(['half-open>open:probe-timeout', 'open>half-open:open-elapsed']);
    });

    it('with halfOpenProbes: 3, admits three and closes only when all three succeed', async () => {
      const breaker = await tripped({ halfOpenProbes: 3 });
      const probes = [deferred(), deferred(), deferred()];
      let next = 0;
      const fn = sinon.spy(() => probes[next++]!.promise);
      const calls = [0, 1, 2].map(() => settle(breaker.execute(fn)));
      expect(await rejection(breaker.execute(fn))).to.be.instanceOf(CircuitOpenError);
      expect(fn.callCount).to.equal(3);
      probes[0]!.resolve('a');
      probes[1]!.resolve('b');
      await clock.tickAsync(0);
      expect(breaker.stats()).to.deep.include({ state: 'half-open', probes: { inFlight: 1, succeeded: 2 } });
      // Succeeded probes keep their places: still no room.
      expect(await rejection(breaker.execute(fn))).to.be.instanceOf(CircuitOpenError);
      probes[2]!.resolve('c');
      expect(await Promise.all(calls)).to.deep.equal(['a', 'b', 'c']);
      expect(breaker.state).to.equal('closed');
    });

    it('with halfOpenProbes: 3, reopens on the first failure', async () => {
      const breaker = await tripped({ halfOpenProbes: 3 });
      const probes = [deferred(), deferred(), deferred()];
      let next = 0;
      const calls = [0, 1, 2].map(() => settle(breaker.execute(() => probes[next++]!.promise)));
      probes[1]!.reject(new Error('no'));
      await clock.tickAsync(0);
      expect(breaker.state).to.equal('open');
      probes[0]!.resolve('late');
      probes[2]!.resolve('late');
      await Promise.all(calls);
      expect(breaker.state).to.equal('open');
    });

    it('frees the place of an excluded probe', async () => {
      const breaker = await tripped({ exclude: [NotFound] });
      const fn = sinon.stub().onFirstCall().rejects(new GoneForGood()).resolves('ok');
      expect(await rejection(breaker.execute(fn))).to.be.instanceOf(GoneForGood);
      expect(breaker.state).to.equal('half-open');
      expect(await breaker.execute(fn)).to.equal('ok');
      expect(breaker.state).to.equal('closed');
      expect(breaker.stats().totals.ignored).to.equal(1);
    });

    it('frees the place of a probe whose client went away, at once', async () => {
      const breaker = await tripped();
      const controller = new AbortController();
      const abandoned = settle(breaker.execute(() => new Promise(() => undefined), controller.signal));
      expect(await rejection(breaker.execute(ok))).to.be.instanceOf(CircuitOpenError);
      controller.abort(new ClientDisconnectedError());
      expect(breaker.state).to.equal('half-open');
      expect(await breaker.execute(ok)).to.equal('ok');
      expect(breaker.state).to.equal('closed');
      void abandoned;
    });

    it('reopens when a probe is cut short by a timeout', async () => {
      const breaker = await tripped();
      const controller = new AbortController();
      void settle(breaker.execute(() => new Promise(() => undefined), controller.signal));
      controller.abort(new TimeoutError(200));
      expect(breaker.state).to.equal('open');
    });
  });

  describe('failures settling together', () => {
    it('opens once when 6 failures settle in the same tick, and half-opens on schedule', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 5, openMs: 1000 });
      const seen = transitions(breaker);
      const pending = Array.from({ length: 6 }, () => deferred());
      const calls = pending.map((d) => settle(breaker.execute(() => d.promise)));
      for (const d of pending) d.reject(new Error('down'));
      await Promise.all(calls);
      expect(seen).to.deep.equal(['closed>open:consecutive-failures']);
      expect(breaker.stats().totals.failures).to.equal(6);
      await clock.tickAsync(999);
      expect(breaker.state).to.equal('open');
      await clock.tickAsync(1);
      expect(breaker.state).to.equal('half-open');
      expect(seen).to.have.length(2);
    });

    it('does not count a call admitted before the breaker last changed state', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000 });
      const old = deferred();
      const oldCall = settle(breaker.execute(() => old.promise));
      await times(breaker, 1, boom);
      await clock.tickAsync(1000);
      await breaker.execute(ok); // probe succeeds: closed, fresh window
      old.reject(new Error('from long ago'));
      await oldCall;
      expect(breaker.stats()).to.include({ state: 'closed', calls: 0, consecutiveFailures: 0 });
      expect(breaker.stats().totals.failures).to.equal(2);
    });
  });

  describe('what counts as a failure', () => {
    it('isFailureResult turns a result into a failure; the caller still gets it', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 2, isFailureResult: (r) => (r as { status: number }).status >= 500 });
      expect(await breaker.execute(() => Promise.resolve({ status: 404 }))).to.deep.equal({ status: 404 });
      expect(await breaker.execute(() => Promise.resolve({ status: 503 }))).to.deep.equal({ status: 503 });
      expect(breaker.stats()).to.include({ consecutiveFailures: 1, failures: 1, calls: 2 });
      await breaker.execute(() => Promise.resolve({ status: 502 }));
      expect(breaker.state).to.equal('open');
    });

    it('isFailure decides which errors count; the others are successes', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, isFailure: (e) => (e as { status?: number }).status !== 404 });
      const notFound = Object.assign(new Error('not found'), { status: 404 });
      for (let i = 0; i < 10; i++) expect(await rejection(breaker.execute(() => Promise.reject(notFound)))).to.equal(notFound);
      expect(breaker.stats()).to.include({ state: 'closed', calls: 10, failures: 0 });
      expect(breaker.stats().totals.successes).to.equal(10);
      await times(breaker, 1, () => Promise.reject(Object.assign(new Error('bad gateway'), { status: 502 })));
      expect(breaker.state).to.equal('open');
    });

    it('counts errors in exclude (and their subclasses) neither way', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, exclude: [NotFound] });
      const error = new GoneForGood();
      expect(await rejection(breaker.execute(() => Promise.reject(error)))).to.equal(error);
      await times(breaker, 3, () => Promise.reject(new NotFound()));
      expect(breaker.stats()).to.deep.include({ state: 'closed', calls: 0, totals: { successes: 0, failures: 0, slowCalls: 0, rejections: 0, ignored: 4 } });
    });

    it('counts a ClientDisconnectedError thrown by the function neither way', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      await times(breaker, 1, () => Promise.reject(new ClientDisconnectedError()));
      expect(breaker.stats()).to.include({ state: 'closed', calls: 0 });
    });

    it('counts a predicate that throws as a failure, without changing the call’s outcome', async () => {
      const breaker = circuitBreaker({
        consecutiveFailures: 2,
        isFailure: () => {
          throw new Error('predicate bug');
        },
        isFailureResult: () => {
          throw new Error('predicate bug');
        },
      });
      expect(await breaker.execute(ok)).to.equal('ok');
      expect(await rejection(breaker.execute(boom))).to.have.property('message', 'boom');
      expect(breaker.state).to.equal('open');
    });

    it('turns a synchronous throw into a rejection and counts it', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const promise = breaker.execute(() => {
        throw new Error('sync');
      });
      expect(promise).to.be.instanceOf(Promise);
      expect(await rejection(promise)).to.have.property('message', 'sync');
      expect(breaker.state).to.equal('open');
    });

    it('accepts functions that return plain values', async () => {
      const breaker = circuitBreaker();
      expect(await breaker.execute(() => 42)).to.equal(42);
      expect(breaker.stats().totals.successes).to.equal(1);
    });
  });

  describe('cancellation', () => {
    it('counts a call cut short by a timeout as a failure at once, even if it resolves later', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const controller = new AbortController();
      const late = deferred();
      const call = breaker.execute(() => late.promise, controller.signal);
      controller.abort(new TimeoutError(100));
      expect(breaker.state).to.equal('open');
      late.resolve('finally');
      expect(await call).to.equal('finally');
      expect(breaker.stats().totals).to.include({ failures: 1, successes: 0 });
    });

    it('counts a call whose client went away neither way, even when it then fails', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const controller = new AbortController();
      const call = settle(
        breaker.execute(
          ({ signal }) =>
            new Promise((_resolve, reject) => {
              signal.addEventListener('abort', () => reject(new Error('aborted')));
            }),
          controller.signal,
        ),
      );
      controller.abort(new ClientDisconnectedError());
      expect(await call).to.have.property('message', 'aborted');
      expect(breaker.stats()).to.deep.include({ state: 'closed', calls: 0, consecutiveFailures: 0 });
      expect(breaker.stats().totals).to.include({ failures: 0, successes: 0, ignored: 1 });
    });

    it('counts any other abort reason neither way', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const controller = new AbortController();
      const call = settle(breaker.execute(() => new Promise((resolve) => setTimeout(resolve, 10)), controller.signal));
      controller.abort();
      await clock.tickAsync(10);
      await call;
      expect(breaker.stats()).to.include({ state: 'closed', calls: 0 });
      expect(breaker.stats().totals.ignored).to.equal(1);
    });

    it('counts a call whose signal had aborted before it started neither way', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const controller = new AbortController();
      controller.abort(new TimeoutError(5));
      await settle(breaker.execute(boom, controller.signal));
      expect(breaker.stats()).to.include({ state: 'closed', calls: 0 });
    });

    it('counts a call once: an abort after it settled changes nothing', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      const controller = new AbortController();
      await breaker.execute(ok, controller.signal);
      controller.abort(new TimeoutError(5));
      expect(breaker.stats()).to.include({ state: 'closed', calls: 1 });
      expect(breaker.stats().totals).to.include({ successes: 1, failures: 0 });
    });
  });

  describe('forceOpen, forceClosed, reset', () => {
    it('forceOpen refuses calls until reset, whatever the time', async () => {
      const breaker = circuitBreaker({ openMs: 1000 });
      const seen = transitions(breaker);
      breaker.forceOpen();
      breaker.forceOpen();
      const error = await rejection(breaker.execute(ok));
      expect(error).to.be.instanceOf(CircuitOpenError);
      expect((error as CircuitOpenError).retryAfterMs).to.equal(undefined);
      await clock.tickAsync(60_000);
      expect(breaker.stats()).to.include({ state: 'open', forced: true });
      expect(breaker.stats()).to.not.have.property('remainingOpenMs');
      breaker.reset();
      expect(await breaker.execute(ok)).to.equal('ok');
      expect(seen).to.deep.equal(['closed>open:forced', 'open>closed:reset']);
    });

    it('forceClosed keeps it closed whatever the window says, until reset', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      breaker.forceClosed();
      await times(breaker, 10, boom);
      expect(breaker.stats()).to.include({ state: 'closed', forced: true, calls: 10, failures: 10 });
      breaker.reset();
      expect(breaker.stats()).to.include({ state: 'closed', forced: false, calls: 0, consecutiveFailures: 0 });
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
    });

    it('forceClosed closes an open breaker; reset clears the window', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 2 });
      const seen = transitions(breaker);
      await times(breaker, 2, boom);
      breaker.forceClosed();
      expect(breaker.stats()).to.include({ state: 'closed', forced: true, calls: 0 });
      breaker.forceOpen();
      breaker.reset();
      await times(breaker, 1, boom);
      expect(breaker.stats()).to.include({ state: 'closed', calls: 1 });
      expect(seen).to.deep.equal(['closed>open:consecutive-failures', 'open>closed:forced', 'closed>open:forced', 'open>closed:reset']);
    });
  });

  describe('events', () => {
    it('reports every state change of a full cycle with its reason', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000 });
      const seen = transitions(breaker);
      await times(breaker, 1, boom);
      await clock.tickAsync(1000);
      await breaker.execute(ok);
      expect(seen).to.deep.equal(['closed>open:consecutive-failures', 'open>half-open:open-elapsed', 'half-open>closed:probes-succeeded']);
    });

    it('reports success and failure with their durations', async () => {
      const breaker = circuitBreaker();
      const successes: unknown[] = [];
      const failures: Array<{ error: unknown; durationMs: number | undefined }> = [];
      breaker.on('success', (event) => successes.push(event));
      breaker.on('failure', (event) => failures.push(event));
      const call = breaker.execute(() => new Promise((resolve) => setTimeout(resolve, 30)));
      await clock.tickAsync(30);
      await call;
      await times(breaker, 1, boom);
      expect(successes).to.deep.equal([{ durationMs: 30 }]);
      expect(failures).to.have.length(1);
      expect(failures[0]!.durationMs).to.equal(0);
      expect(failures[0]!.error).to.have.property('message', 'boom');
    });

    it('reports rejections and ignored calls', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, exclude: [NotFound] });
      const rejected: Array<{ reason: string; error: Error }> = [];
      const ignored: unknown[] = [];
      breaker.on('rejected', (event) => rejected.push(event));
      breaker.on('ignored', ({ error }) => ignored.push(error));
      const notFound = new NotFound();
      await times(breaker, 1, () => Promise.reject(notFound));
      await times(breaker, 1, boom);
      await times(breaker, 1, ok);
      expect(ignored).to.deep.equal([notFound]);
      expect(rejected).to.have.length(1);
      expect(rejected[0]!.reason).to.equal('circuit_open');
      expect(rejected[0]!.error).to.be.instanceOf(CircuitOpenError);
    });

    it('stops delivering after unsubscribe', async () => {
      const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 1000 });
      const seen: string[] = [];
      const off = breaker.on('stateChange', ({ to }) => seen.push(to));
      await times(breaker, 1, boom);
      off();
      off();
      await clock.tickAsync(1000);
      expect(breaker.state).to.equal('half-open');
      expect(seen).to.deep.equal(['open']);
    });

    it('survives a listener that throws', async () => {
      const warn = sinon.stub(process, 'emitWarning');
      const breaker = circuitBreaker({ consecutiveFailures: 1 });
      breaker.on('failure', () => {
        throw new Error('listener bug');
      });
      breaker.on('stateChange', () => {
        throw new Error('listener bug');
      });
      expect(await rejection(breaker.execute(boom))).to.have.property('message', 'boom');
      expect(breaker.state).to.equal('open');
      await clock.tickAsync(0);
      expect(warn.callCount).to.equal(2);
    });

    it('reads the clock on a closed breaker only when someone needs durations', async () => {
      let reads = 0;
      const breaker = circuitBreaker({ clock: { now: () => (reads++, 0) } });
      for (let i = 0; i < 50; i++) await breaker.execute(ok);
      expect(reads).to.equal(0);
      breaker.on('success', () => undefined);
      await breaker.execute(ok);
      expect(reads).to.equal(2);
    });
  });

  describe('shared state through a store', () => {
    function pair(store: FakeBreakerStore, options: CircuitBreakerOptions = {}): [CircuitBreaker, CircuitBreaker] {
      const make = (): CircuitBreaker => circuitBreaker({ name: 'upstream', store, consecutiveFailures: 1, openMs: 1000, ...options });
      return [make(), make()];
    }

    it('attaches on the first call and asks the store nothing while closed', async () => {
      const store = new FakeBreakerStore();
      const [a] = pair(store);
      expect(store.attachments).to.equal(0);
      for (let i = 0; i < 50; i++) await a.execute(ok);
      expect(store.attachments).to.equal(1);
      expect(store.acquires).to.equal(0);
      expect(store.published).to.deep.equal([]);
    });

    it('opens the other instances, for the remaining time, when one trips', async () => {
      const store = new FakeBreakerStore();
      const [a, b] = pair(store);
      await b.execute(ok);
      await times(a, 1, boom);
      expect(store.published).to.deep.equal([{ instance: 2, state: 'open', openMs: 1000 }]);
      await clock.tickAsync(0);
      const fn = sinon.spy(ok);
      expect(await rejection(b.execute(fn))).to.have.property('retryAfterMs', 1000);
      expect(fn.called).to.equal(false);
      await clock.tickAsync(1000);
      expect([a.state, b.state]).to.deep.equal(['half-open', 'half-open']);
    });

    it('lets only one instance probe; its success closes the others', async () => {
      const store = new FakeBreakerStore();
      const [a, b] = pair(store);
      await b.execute(ok);
      await times(a, 1, boom);
      await clock.tickAsync(1000);
      const probe = deferred();
      const probeCall = a.execute(() => probe.promise);
      await clock.tickAsync(0);
      const other = sinon.spy(ok);
      expect(await rejection(b.execute(other))).to.be.instanceOf(CircuitOpenError);
      expect(other.called).to.equal(false);
      // b does not ask again while a holds the right.
      expect(await rejection(b.execute(other))).to.be.instanceOf(CircuitOpenError);
      expect(store.acquires).to.equal(2);
      probe.resolve('fine');
      expect(await probeCall).to.equal('fine');
      expect(a.state).to.equal('closed');
      expect(store.releases).to.equal(1);
      await clock.tickAsync(0);
      expect(b.state).to.equal('closed');
      expect(await b.execute(other)).to.equal('ok');
    });

    it('spreads a failed probe’s verdict to the others', async () => {
      const store = new FakeBreakerStore();
      const [a, b] = pair(store);
      await b.execute(ok);
      await times(a, 1, boom);
      await clock.tickAsync(1000);
      expect(b.state).to.equal('half-open');
      await times(a, 1, boom);
      expect(a.state).to.equal('open');
      await clock.tickAsync(0);
      expect(b.stats()).to.include({ state: 'open', remainingOpenMs: 1000 });
      expect(store.releases).to.equal(1);
    });

    it('gives a hung probe’s right back when half-open ends', async () => {
      const store = new FakeBreakerStore();
      const [a] = pair(store, { halfOpenMaxMs: 200 });
      await times(a, 1, boom);
      await clock.tickAsync(1000);
      void settle(a.execute(() => new Promise(() => undefined)));
      await clock.tickAsync(200);
      expect(a.state).to.equal('open');
      expect([store.acquires, store.releases]).to.deep.equal([1, 1]);
    });

    it('publishes forceClosed and reset; ignores peers while forced', async () => {
      const store = new FakeBreakerStore();
      const [a, b] = pair(store);
      await b.execute(ok);
      b.forceClosed();
      await times(a, 1, boom);
      await clock.tickAsync(0);
      expect(b.state).to.equal('closed');
      b.reset();
      a.forceClosed();
      expect(store.published.map(({ instance, state }) => `${instance}:${state}`)).to.deep.equal(['1:closed', '2:open', '1:closed', '2:closed']);
    });

    it('detaches on dispose() and goes on alone', async () => {
      const store = new FakeBreakerStore();
      const [a, b] = pair(store);
      await b.execute(ok);
      const detach = sinon.spy();
      const never = circuitBreaker({ store: { attach: () => ({ publish() {}, acquireProbe: async () => true, releaseProbe() {}, detach }) } });
      never.dispose();
      await never.execute(ok);
      expect(detach.called).to.equal(false);
      b.dispose();
      expect(store.detached).to.equal(1);
      await times(a, 1, boom);
      await clock.tickAsync(0);
      expect([a.state, b.state]).to.deep.equal(['open', 'closed']);
      await times(b, 1, boom);
      expect(store.published.map(({ state }) => state)).to.deep.equal(['open']);
    });

    it('goes on alone when the store cannot attach', async () => {
      const warn = sinon.stub(process, 'emitWarning');
      const breaker = circuitBreaker({
        consecutiveFailures: 1,
        store: {
          attach() {
            throw new Error('store down');
          },
        },
      });
      await times(breaker, 1, boom);
      expect(breaker.state).to.equal('open');
      expect(warn.calledOnce).to.equal(true);
    });
  });
});
