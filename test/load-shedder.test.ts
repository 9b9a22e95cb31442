import { expect } from 'chai';
import sinon from 'sinon';
import { OverloadError, isGuardRejection } from '../lib/errors.js';
import { loadShedder, type LoadShedderOptions } from '../lib/load-shedder.js';
import { PressureSampler, processProbe, sharedSampler, type PressureMeasurements, type PressureProbe } from '../lib/pressure-sampler.js';

interface FakeProbe extends PressureProbe {
  values: PressureMeasurements;
  starts: number;
  reads: number;
  stops: number;
}

function fakeProbe(values: Partial<PressureMeasurements> = {}): FakeProbe {
  const probe: FakeProbe = {
    values: { eventLoopDelayMs: 0, eventLoopUtilization: 0, heapUsedBytes: 0, rssBytes: 0, ...values },
    starts: 0,
    reads: 0,
    stops: 0,
    start() {
      probe.starts++;
    },
    read() {
      probe.reads++;
      return { ...probe.values };
    },
    stop() {
      probe.stops++;
    },
  };
  return probe;
}

const ok = (): string => 'ok';

async function expectOverload(promise: Promise<unknown>): Promise<void> {
  const outcome = await promise.then(
    (value) => ({ value }),
    (error: unknown) => ({ error }),
  );
  expect(outcome).to.have.property('error').that.is.instanceOf(OverloadError);
}

describe('loadShedder', () => {
  let clock: sinon.SinonFakeTimers;
  let probe: FakeProbe;
  let sampler: PressureSampler;

  beforeEach(() => {
    clock = sinon.useFakeTimers();
    probe = fakeProbe();
    sampler = new PressureSampler({ probe });
  });

  afterEach(() => {
    sampler.stop();
    clock.restore();
  });

  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['no options', undefined, 'loadShedder: options must be an object with at least one limit, got undefined'],
      ['no limit', { sampleIntervalMs: 500 }, 'loadShedder: at least one limit is required (maxEventLoopDelayMs, maxHeapUsedBytes, maxRssBytes, maxEventLoopUtilization)'],
      ['negative delay', { maxEventLoopDelayMs: -1 }, 'loadShedder: maxEventLoopDelayMs must be a finite number of milliseconds > 0, got -1'],
      ['zero delay', { maxEventLoopDelayMs: 0 }, 'loadShedder: maxEventLoopDelayMs must be a finite number of milliseconds > 0, got 0'],
      ['NaN delay', { maxEventLoopDelayMs: NaN }, 'loadShedder: maxEventLoopDelayMs must be a finite number of milliseconds > 0, got NaN'],
      ['string heap', { maxHeapUsedBytes: '1gb' }, 'loadShedder: maxHeapUsedBytes must be a finite number of bytes > 0, got "1gb"'],
      ['infinite rss', { maxRssBytes: Infinity }, 'loadShedder: maxRssBytes must be a finite number of bytes > 0, got Infinity'],
      ['zero rss', { maxRssBytes: 0 }, 'loadShedder: maxRssBytes must be a finite number of bytes > 0, got 0'],
      ['utilisation 1', { maxEventLoopUtilization: 1 }, 'loadShedder: maxEventLoopUtilization must be a number above 0 and below 1, got 1'],
      ['utilisation 0', { maxEventLoopUtilization: 0 }, 'loadShedder: maxEventLoopUtilization must be a number above 0 and below 1, got 0'],
      ['utilisation as percent', { maxEventLoopUtilization: 90 }, 'loadShedder: maxEventLoopUtilization must be a number above 0 and below 1, got 90'],
      ['interval too short', { maxRssBytes: 1, sampleIntervalMs: 5 }, 'loadShedder: sampleIntervalMs must be a finite number >= 10, got 5'],
      ['interval Infinity', { maxRssBytes: 1, sampleIntervalMs: Infinity }, 'loadShedder: sampleIntervalMs must be a finite number >= 10, got Infinity'],
      ['interval too long', { maxRssBytes: 1, sampleIntervalMs: 2 ** 31 }, 'loadShedder: sampleIntervalMs must be at most 2147483647 ms (about 24.8 days), got 2147483648'],
      ['retryAfterMs negative', { maxRssBytes: 1, retryAfterMs: -5 }, 'loadShedder: retryAfterMs must be a finite number of milliseconds > 0, got -5'],
      ['empty name', { maxRssBytes: 1, name: '' }, 'loadShedder: name must be a non-empty string, got ""'],
      ['bad sampler', { maxRssBytes: 1, sampler: {} }, 'loadShedder: sampler must be a PressureSampler, got {}'],
      ['bad clock', { maxRssBytes: 1, clock: Date }, 'loadShedder: clock must be an object with a now() method, got a function'],
      ['typo', { maxEventLoopDelay: 100 }, 'loadShedder: unknown option "maxEventLoopDelay"'],
    ];
    for (const [label, options, message] of cases) {
      it(`rejects ${label}`, () => {
        expect(() => loadShedder(options as LoadShedderOptions)).to.throw(TypeError, message);
      });
    }

    it('does not touch the caller object', () => {
      const options = Object.freeze({ maxEventLoopDelayMs: 100, sampler });
      const shedder = loadShedder(options);
      expect(shedder.retryAfterMs).to.equal(1000);
      expect(shedder.sampleIntervalMs).to.equal(1000);
      expect(shedder.kind).to.equal('load-shedder');
      expect(shedder.name).to.match(/^loadShedder-\d+$/);
    });
  });

  describe('shedding', () => {
    it('admits while every measure is under its limit', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 100, sampler });
      probe.values.eventLoopDelayMs = 99;
      await shedder.execute(ok);
      await clock.tickAsync(1000);
      expect(await shedder.execute(ok)).to.equal('ok');
      expect(shedder.shedding).to.equal(false);
    });

    const measures: Array<[keyof PressureMeasurements, LoadShedderOptions, number]> = [
      ['eventLoopDelayMs', { maxEventLoopDelayMs: 100 }, 150],
      ['heapUsedBytes', { maxHeapUsedBytes: 1e9 }, 2e9],
      ['rssBytes', { maxRssBytes: 2e9 }, 3e9],
      ['eventLoopUtilization', { maxEventLoopUtilization: 0.9 }, 0.95],
    ];
    for (const [measure, limit, over] of measures) {
      it(`rejects with OverloadError while ${measure} is over its limit, and recovers`, async () => {
        const shedder = loadShedder({ ...limit, sampleIntervalMs: 500, name: 'api', sampler });
        await shedder.execute(ok);
        probe.values[measure] = over;
        await clock.tickAsync(500);

        const fn = sinon.spy(ok);
        const error = await shedder.execute(fn).then(() => undefined, (e: unknown) => e);
        expect(error).to.be.instanceOf(OverloadError);
        expect(isGuardRejection(error)).to.equal(true);
        const rejection = error as OverloadError;
        expect(rejection.status).to.equal(503);
        expect(rejection.reason).to.equal('overloaded');
        expect(rejection.retryAfterMs).to.equal(500);
        expect(rejection.policy).to.equal('api');
        expect(fn.called).to.equal(false);
        expect(shedder.shedding).to.equal(true);
        expect(shedder.stats()[measure]).to.equal(over);

        probe.values[measure] = 0;
        await clock.tickAsync(500);
        expect(shedder.shedding).to.equal(false);
        expect(await shedder.execute(fn)).to.equal('ok');
        expect(fn.calledOnce).to.equal(true);
      });
    }

    it('builds rejections without a stack trace (cheap on the overload path)', async () => {
      const shedder = loadShedder({ maxHeapUsedBytes: 10, sampler });
      probe.values.heapUsedBytes = 11;
      const error = (await shedder.execute(ok).catch((e: unknown) => e)) as Error;
      expect(error).to.be.instanceOf(OverloadError);
      expect(error.stack?.split('\n')).to.have.length(1);
    });

    it('takes a retryAfterMs of its own', async () => {
      const shedder = loadShedder({ maxHeapUsedBytes: 10, retryAfterMs: 5000, sampler });
      probe.values.heapUsedBytes = 11;
      const error = (await shedder.execute(ok).catch((e: unknown) => e)) as OverloadError;
      expect(error.retryAfterMs).to.equal(5000);
    });

    it('sees a loop blocked for longer than the interval by its own timer being late', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 200, sampleIntervalMs: 100, sampler });
      await shedder.execute(ok);
      await clock.tickAsync(100);
      expect(shedder.shedding).to.equal(false);

      // jump() fires due timers once, late, as a loop blocked for 400 ms would.
      clock.jump(400);
      await clock.tickAsync(0);
      expect(probe.values.eventLoopDelayMs).to.equal(0);
      expect(shedder.stats().eventLoopDelayMs).to.be.at.least(300);
      expect(shedder.shedding).to.equal(true);
      await expectOverload(shedder.execute(ok));

      await clock.tickAsync(100);
      expect(shedder.shedding).to.equal(false);
      expect(await shedder.execute(ok)).to.equal('ok');
    });

    it('keeps the last figures, and its timer, when a measurement fails', async () => {
      const shedder = loadShedder({ maxHeapUsedBytes: 100, maxEventLoopDelayMs: 200, sampleIntervalMs: 100, sampler });
      probe.values.heapUsedBytes = 150;
      await shedder.execute(ok).catch(() => undefined);
      probe.read = () => {
        throw new Error('EMFILE: too many open files, uv_resident_set_memory');
      };
      await clock.tickAsync(100);
      expect(shedder.stats().heapUsedBytes).to.equal(150);
      expect(shedder.shedding).to.equal(true);
      clock.jump(500);
      await clock.tickAsync(0);
      expect(shedder.stats().eventLoopDelayMs).to.be.at.least(400);
      expect(sampler.running).to.equal(true);
    });

    it('counts admitted and rejected calls in stats()', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 50, sampleIntervalMs: 100, sampler });
      probe.values = { eventLoopDelayMs: 10, eventLoopUtilization: 0.4, heapUsedBytes: 123, rssBytes: 456 };
      await shedder.execute(ok);
      await shedder.execute(ok);
      probe.values.eventLoopDelayMs = 80;
      await clock.tickAsync(100);
      await shedder.execute(ok).catch(() => undefined);
      expect(shedder.stats()).to.deep.equal({
        shedding: true,
        eventLoopDelayMs: 80,
        heapUsedBytes: 123,
        rssBytes: 456,
        eventLoopUtilization: 0.4,
        admitted: 2,
        rejected: 1,
      });
    });

    it('passes results and errors of the guarded function through', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 50, sampler });
      expect(await shedder.execute(async () => 42)).to.equal(42);
      const boom = new Error('boom');
      const thrown = await shedder
        .execute(() => {
          throw boom;
        })
        .catch((e: unknown) => e);
      expect(thrown).to.equal(boom);
    });

    it('emits rejected, success and failure events', async () => {
      const shedder = loadShedder({ maxHeapUsedBytes: 100, sampler });
      const rejected = sinon.spy();
      const success = sinon.spy();
      const failure = sinon.spy();
      shedder.on('rejected', rejected);
      shedder.on('success', success);
      shedder.on('failure', failure);
      await shedder.execute(async () => {
        await clock.tickAsync(5);
        return 1;
      });
      await shedder.execute(() => Promise.reject(new Error('x'))).catch(() => undefined);
      probe.values.heapUsedBytes = 101;
      await clock.tickAsync(1000);
      await shedder.execute(ok).catch(() => undefined);
      expect(success.calledOnce).to.equal(true);
      expect(success.firstCall.args[0].durationMs).to.equal(5);
      expect(failure.calledOnce).to.equal(true);
      expect(rejected.calledOnce).to.equal(true);
      expect(rejected.firstCall.args[0].reason).to.equal('overloaded');
    });
  });

  describe('cutting loop turns short', () => {
    // Turn time runs on a clock of the test's own, so that it moves while the fake
    // immediate that ends the turn has not run (i.e. inside one loop turn).
    let now: number;
    let idle: number;
    let turns: PressureSampler;

    beforeEach(() => {
      now = 0;
      idle = 0;
      turns = new PressureSampler({ probe, clock: { now: () => now }, loopIdleTime: () => idle });
    });

    afterEach(() => turns.stop());

    it('refuses the rest of a turn that has run longer than maxEventLoopDelayMs, then admits the next turn', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 5, sampler: turns });
      const fn = sinon.spy(ok);
      const first = shedder.execute(fn);
      now = 5;
      const atLimit = shedder.execute(fn);
      now = 5.5;
      const late = shedder.execute(fn);
      expect(await first).to.equal('ok');
      expect(await atLimit).to.equal('ok');
      await expectOverload(late);
      expect(fn.callCount).to.equal(2);
      expect(shedder.shedding).to.equal(true);
      expect(shedder.stats()).to.include({ admitted: 2, rejected: 1 });

      await clock.tickAsync(0); // the check phase: the turn is over
      now = 6;
      expect(await shedder.execute(fn)).to.equal('ok');
      now = 11;
      expect(await shedder.execute(fn)).to.equal('ok');
    });

    it('starts a new turn when the loop waited for I/O since the turn began', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 5, sampler: turns });
      await shedder.execute(ok);
      // A turn opened in a check phase lasts until the next one: the idle time tells.
      now = 50;
      idle = 40;
      expect(await shedder.execute(ok)).to.equal('ok');
      now = 56;
      await expectOverload(shedder.execute(ok));
    });

    it('forgets the turn in progress on stop(), whose end may never come (fake timers removed)', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 5, sampler: turns });
      await shedder.execute(ok);
      now = 100;
      turns.stop();
      expect(await shedder.execute(ok)).to.equal('ok');
      now = 106;
      await expectOverload(shedder.execute(ok));
    });

    it('leaves turns alone without an event-loop delay limit', async () => {
      const shedder = loadShedder({ maxHeapUsedBytes: 1e12, sampler: turns });
      await shedder.execute(ok);
      now = 1000;
      expect(await shedder.execute(ok)).to.equal('ok');
    });

    it('does not shed every call on a sampled delay its own turn cutting lets through', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 5, sampleIntervalMs: 100, sampler: turns });
      await shedder.execute(ok);
      now = 6;
      await expectOverload(shedder.execute(ok));

      // The sample of the interval in which it cut a turn reads the delay of that turn.
      probe.values.eventLoopDelayMs = 6;
      now = 100;
      await clock.tickAsync(100);
      expect(shedder.stats().eventLoopDelayMs).to.equal(6);
      expect(await shedder.execute(ok)).to.equal('ok');
      expect(shedder.shedding).to.equal(true);

      // An interval without a cut turn: the sampled delay is someone else's, and sheds.
      now = 200;
      await clock.tickAsync(100);
      await expectOverload(shedder.execute(ok));
      probe.values.eventLoopDelayMs = 0;
      now = 300;
      await clock.tickAsync(100);
      expect(shedder.shedding).to.equal(false);
      expect(await shedder.execute(ok)).to.equal('ok');
    });

    it('cuts a real turn of synchronous calls once it has run longer than the limit', async () => {
      clock.restore();
      try {
        const burn = (ms: number): string => {
          const until = performance.now() + ms;
          while (performance.now() < until) {
            // a synchronous handler
          }
          return 'ok';
        };
        const shedder = loadShedder({ maxEventLoopDelayMs: 30, name: 'turns' });
        // Requests the loop read in one turn, each handler taking 20 ms of CPU.
        const outcomes = await Promise.allSettled(Array.from({ length: 6 }, () => shedder.execute(() => burn(20))));
        const admitted = outcomes.filter((o) => o.status === 'fulfilled').length;
        expect(outcomes[0]!.status).to.equal('fulfilled');
        expect(admitted).to.be.within(1, 2);
        expect(outcomes.at(-1)).to.have.property('reason').that.is.instanceOf(OverloadError);
        // The next turn starts afresh.
        await new Promise((resolve) => setImmediate(resolve));
        expect(await shedder.execute(ok)).to.equal('ok');
      } finally {
        sharedSampler.stop();
        clock = sinon.useFakeTimers();
      }
    });
  });

  describe('the shared sampler', () => {
    it('validates its own options', () => {
      expect(() => new PressureSampler({ idleMs: -1 })).to.throw(TypeError, 'PressureSampler: idleMs must be a finite number of milliseconds > 0, got -1');
      expect(() => new PressureSampler({ probe: {} as PressureProbe })).to.throw(TypeError, 'PressureSampler: probe must be an object with start(), read() and stop()');
      expect(() => new PressureSampler({ idle: 5 } as object)).to.throw(TypeError, 'PressureSampler: unknown option "idle"');
      expect(() => new PressureSampler({ loopIdleTime: 5 as unknown as () => number })).to.throw(TypeError, 'PressureSampler: loopIdleTime must be a function, got 5');
    });

    it('starts nothing before the first call', async () => {
      loadShedder({ maxEventLoopDelayMs: 100, sampler });
      expect(clock.countTimers()).to.equal(0);
      expect(probe.starts).to.equal(0);
      expect(sampler.running).to.equal(false);
    });

    it('uses one timer and one measurement per tick for every shedder', async () => {
      const strict = loadShedder({ maxEventLoopDelayMs: 50, sampler });
      const lenient = loadShedder({ maxEventLoopDelayMs: 500, sampler });
      await strict.execute(ok);
      await lenient.execute(ok);
      await clock.tickAsync(0); // the loop turn ends (its immediate runs): only the sampling timer is left
      expect(clock.countTimers()).to.equal(1);
      expect(probe.starts).to.equal(1);
      const readsBefore = probe.reads;

      probe.values.eventLoopDelayMs = 100;
      await clock.tickAsync(1000);
      expect(probe.reads - readsBefore).to.equal(1);
      expect(strict.shedding).to.equal(true);
      expect(lenient.shedding).to.equal(false);
      await expectOverload(strict.execute(ok));
      expect(await lenient.execute(ok)).to.equal('ok');
    });

    it('samples at the shortest interval any shedder asked for', async () => {
      const slow = loadShedder({ maxEventLoopDelayMs: 50, sampleIntervalMs: 1000, sampler });
      await slow.execute(ok);
      await clock.tickAsync(100);
      const fast = loadShedder({ maxEventLoopDelayMs: 50, sampleIntervalMs: 200, sampler });
      await fast.execute(ok);
      const reads = probe.reads;
      await clock.tickAsync(200);
      expect(probe.reads - reads).to.equal(1);
      await clock.tickAsync(600);
      expect(probe.reads - reads).to.equal(4);
      expect(clock.countTimers()).to.equal(1);
    });

    it('makes no syscall-like work per call: calls do not read the probe', async () => {
      const shedder = loadShedder({ maxEventLoopDelayMs: 50, sampler });
      await shedder.execute(ok);
      const reads = probe.reads;
      for (let i = 0; i < 100; i++) await shedder.execute(ok);
      expect(probe.reads).to.equal(reads);
    });

    it('stops when no shedder has been used for a while, and starts again on the next call', async () => {
      const idleSampler = new PressureSampler({ probe, idleMs: 5000 });
      const shedder = loadShedder({ maxEventLoopDelayMs: 50, sampleIntervalMs: 1000, sampler: idleSampler });
      await shedder.execute(ok);
      await clock.tickAsync(3000);
      await shedder.execute(ok);
      await clock.tickAsync(5000);
      expect(idleSampler.running).to.equal(true);
      await clock.tickAsync(1000);
      expect(idleSampler.running).to.equal(false);
      expect(clock.countTimers()).to.equal(0);
      expect(probe.stops).to.equal(1);
      expect(idleSampler.subscribers).to.equal(0);

      probe.values.eventLoopDelayMs = 99;
      await clock.tickAsync(1000);
      // Stale figures never shed: sampling is off.
      expect(shedder.shedding).to.equal(false);
      expect(await shedder.execute(ok).catch((e: unknown) => e)).to.be.instanceOf(OverloadError);
      expect(probe.starts).to.equal(2);
      expect(idleSampler.running).to.equal(true);
      idleSampler.stop();
    });

    it('keeps sampling while any shedder is in use', async () => {
      const idleSampler = new PressureSampler({ probe, idleMs: 2000 });
      const busy = loadShedder({ maxEventLoopDelayMs: 50, sampler: idleSampler });
      const idle = loadShedder({ maxEventLoopDelayMs: 50, sampler: idleSampler });
      await idle.execute(ok);
      for (let i = 0; i < 10; i++) {
        await busy.execute(ok);
        await clock.tickAsync(1000);
      }
      expect(idleSampler.running).to.equal(true);
      expect(idleSampler.subscribers).to.equal(1);
      idleSampler.stop();
    });

    it('unrefs its timer', async () => {
      clock.restore();
      const real = new PressureSampler({ probe });
      const unref = sinon.spy();
      const fakeTimer = { unref } as unknown as ReturnType<typeof setTimeout>;
      const setTimeoutStub = sinon.stub(globalThis, 'setTimeout').returns(fakeTimer);
      const clearTimeoutStub = sinon.stub(globalThis, 'clearTimeout');
      try {
        real.subscribe(1000);
        expect(unref.calledOnce).to.equal(true);
        real.stop();
        expect(clearTimeoutStub.calledOnceWith(fakeTimer)).to.equal(true);
      } finally {
        setTimeoutStub.restore();
        clearTimeoutStub.restore();
        clock = sinon.useFakeTimers();
      }
    });
  });

  describe('on the real process', () => {
    before(function () {
      // Runs on real timers; guard against a shared sampler left running elsewhere.
      sharedSampler.stop();
    });
    after(() => sharedSampler.stop());

    it('measures each interval on its own, never since start-up', async () => {
      clock.restore();
      const probe = processProbe();
      try {
        const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
        probe.start();
        await sleep(30);
        const blockedUntil = performance.now() + 150;
        while (performance.now() < blockedUntil) {
          // busy
        }
        await sleep(30);
        const busy = probe.read();
        await sleep(150);
        const calm = probe.read();
        expect(busy.eventLoopDelayMs).to.be.above(10);
        expect(busy.eventLoopUtilization).to.be.above(0.5);
        // Cumulative figures would still carry the busy spell.
        expect(calm.eventLoopDelayMs).to.be.below(busy.eventLoopDelayMs / 2);
        expect(calm.eventLoopUtilization).to.be.below(0.3);
        expect(calm.heapUsedBytes).to.be.above(0);
        expect(calm.rssBytes).to.be.above(calm.heapUsedBytes);
      } finally {
        probe.stop();
        clock = sinon.useFakeTimers();
      }
    });

    it('sheds right after the event loop was blocked, then recovers within a few intervals', async function () {
      clock.restore();
      try {
        this.timeout(3000);
        const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
        const shedder = loadShedder({ maxEventLoopDelayMs: 100, sampleIntervalMs: 50, name: 'real' });
        expect(await shedder.execute(ok)).to.equal('ok');
        await sleep(120);
        expect(shedder.shedding, `delay ${shedder.stats().eventLoopDelayMs} ms before blocking`).to.equal(false);

        const blockedUntil = performance.now() + 300;
        while (performance.now() < blockedUntil) {
          // Block the event loop synchronously, as a CPU-bound handler would.
        }
        await sleep(1);
        expect(shedder.stats().eventLoopDelayMs).to.be.at.least(200);
        expect(shedder.shedding).to.equal(true);
        await expectOverload(shedder.execute(ok));

        const shedAt = performance.now();
        while (shedder.shedding && performance.now() - shedAt < 1000) await sleep(10);
        const recoveredAfter = performance.now() - shedAt;
        expect(shedder.shedding).to.equal(false);
        expect(recoveredAfter).to.be.below(500);
        expect(await shedder.execute(ok)).to.equal('ok');
      } finally {
        clock = sinon.useFakeTimers();
      }
    });
  });
});

