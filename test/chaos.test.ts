import { expect } from 'chai';
import fc from 'fast-check';
import sinon from 'sinon';
import { chaos, ChaosFaultError, type ChaosOptions } from '../lib/chaos.js';
import { TimeoutError } from '../lib/errors.js';
import type { NormalizedRequest } from '../lib/policy.js';

/** A `random` that returns the given values in turn (and fails the test if asked for more). */
function sequence(...values: number[]): sinon.SinonSpy<[], number> {
  return sinon.spy(() => {
    const value = values.shift();
    if (value === undefined) throw new Error('random() called more often than the test expected');
    return value;
  });
}

function request(headers: Record<string, string> = {}): NormalizedRequest {
  return { ip: '203.0.113.7', method: 'GET', path: '/orders', headers };
}

describe('chaos', () => {
  let clock: sinon.SinonFakeTimers;

  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });

  afterEach(() => {
    clock.restore();
  });

  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['no options', undefined, 'chaos: options must be an object with latency or fault, got undefined'],
      ['neither latency nor fault', {}, 'chaos: at least one of latency or fault is required'],
      ['latency not an object', { latency: 100 }, 'chaos: latency must be an object { ms, rate }, got 100'],
      ['a negative latency', { latency: { ms: -1, rate: 0.5 } }, 'chaos: latency.ms must be a finite number of milliseconds > 0, got -1'],
      ['a zero latency', { latency: { ms: 0, rate: 0.5 } }, 'chaos: latency.ms must be a finite number of milliseconds > 0, got 0'],
      ['an infinite latency', { latency: { ms: Infinity, rate: 0.5 } }, 'chaos: latency.ms must be a finite number of milliseconds > 0, got Infinity'],
      ['a missing latency rate', { latency: { ms: 10 } }, 'chaos: latency.rate must be a number from 0 to 1, got undefined'],
      ['a latency rate above 1', { latency: { ms: 10, rate: 1.5 } }, 'chaos: latency.rate must be a number from 0 to 1, got 1.5'],
      ['a latency rate in percent', { latency: { ms: 10, rate: '50%' } }, 'chaos: latency.rate must be a number from 0 to 1, got "50%"'],
      ['an unknown latency key', { latency: { ms: 10, rate: 1, jitter: 5 } }, 'chaos: unknown option "jitter"'],
      ['fault not an object', { fault: true }, 'chaos: fault must be an object { rate, status?, error? }, got true'],
      ['a negative fault rate', { fault: { rate: -0.1 } }, 'chaos: fault.rate must be a number from 0 to 1, got -0.1'],
      ['a NaN fault rate', { fault: { rate: NaN } }, 'chaos: fault.rate must be a number from 0 to 1, got NaN'],
      ['a success status', { fault: { rate: 1, status: 200 } }, 'chaos: fault.status must be an HTTP error status from 400 to 599, got 200'],
      ['a fractional status', { fault: { rate: 1, status: 500.5 } }, 'chaos: fault.status must be an HTTP error status from 400 to 599, got 500.5'],
      ['a string error', { fault: { rate: 1, error: 'boom' } }, 'chaos: fault.error must be an Error or a function returning one, got "boom"'],
      ['status with error', { fault: { rate: 1, status: 503, error: new Error('x') } }, 'chaos: fault.status and fault.error cannot be combined'],
      ['enabled as a string', { fault: { rate: 1 }, enabled: 'yes' }, 'chaos: enabled must be a boolean or a function of the request, got "yes"'],
      ['random not a function', { fault: { rate: 1 }, random: 0.5 }, 'chaos: random must be a function, got 0.5'],
      ['an empty name', { fault: { rate: 1 }, name: '' }, 'chaos: name must be a non-empty string, got ""'],
      ['a typo', { fault: { rate: 1 }, enable: false }, 'chaos: unknown option "enable"'],
    ];
    for (const [label, options, message] of cases) {
      it(`rejects ${label}`, () => {
        expect(() => chaos(options as ChaosOptions)).to.throw(TypeError, message);
      });
    }

    it('rejects a non-boolean set on enabled at run time', () => {
      const monkey = chaos({ fault: { rate: 1 } });
      expect(() => {
        (monkey as { enabled: unknown }).enabled = 1;
      }).to.throw(TypeError, 'chaos: enabled must be a boolean or a function of the request, got 1');
    });
  });

  describe('latency', () => {
    it('waits latency.ms before calling, with probability latency.rate', async () => {
      const monkey = chaos({ latency: { ms: 500, rate: 0.3 }, random: sequence(0.29, 0.3) });
      const fn = sinon.spy(() => 'ok');
      let settled = false;
      const delayed = monkey.execute(fn).then((value) => {
        settled = true;
        return value;
      });
      await clock.tickAsync(499);
      expect(fn.called).to.equal(false);
      expect(settled).to.equal(false);
      await clock.tickAsync(1);
      expect(await delayed).to.equal('ok');
      expect(fn.calledOnce).to.equal(true);

      // 0.3 is not below the rate of 0.3: no delay.
      expect(await monkey.execute(fn)).to.equal('ok');
      expect(fn.calledTwice).to.equal(true);
      expect(monkey.stats()).to.deep.equal({ enabled: true, injectedLatency: 1, injectedFaults: 0, calls: 2 });
    });

    it('stops waiting when the call is aborted, with the abort reason, and clears its timer', async () => {
      const monkey = chaos({ latency: { ms: 10_000, rate: 1 }, random: () => 0 });
      const controller = new AbortController();
      const fn = sinon.spy(() => 'ok');
      const outcome = monkey.execute(fn, controller.signal).catch((e: unknown) => e);
      await clock.tickAsync(100);
      expect(clock.countTimers()).to.equal(1);
      const reason = new TimeoutError(100);
      controller.abort(reason);
      expect(await outcome).to.equal(reason);
      expect(clock.countTimers()).to.equal(0);
      await clock.tickAsync(20_000);
      expect(fn.called).to.equal(false);
    });

    it('does not wait at all for a call aborted before it starts', async () => {
      const monkey = chaos({ latency: { ms: 10_000, rate: 1 }, random: () => 0 });
      const reason = new Error('gone');
      const outcome = await monkey.execute(() => 'ok', AbortSignal.abort(reason)).catch((e: unknown) => e);
      expect(outcome).to.equal(reason);
      expect(clock.countTimers()).to.equal(0);
    });

    it('emits a latency event', async () => {
      const monkey = chaos({ latency: { ms: 20, rate: 1 }, random: () => 0 });
      const listener = sinon.spy();
      monkey.on('latency', listener);
      const call = monkey.execute(() => 1);
      await clock.tickAsync(20);
      await call;
      expect(listener.calledOnceWith({ ms: 20 })).to.equal(true);
    });
  });

  describe('faults', () => {
    it('throws a ChaosFaultError instead of calling, with probability fault.rate', async () => {
      const monkey = chaos({ fault: { rate: 0.1, status: 503 }, name: 'orders', random: sequence(0.05, 0.5) });
      const fn = sinon.spy(() => 'ok');
      const error = await monkey.execute(fn).catch((e: unknown) => e);
      expect(error).to.be.instanceOf(ChaosFaultError);
      expect(error).to.be.instanceOf(Error);
      const fault = error as ChaosFaultError;
      expect(fault.status).to.equal(503);
      expect(fault.statusCode).to.equal(503);
      expect(fault.code).to.equal('BULWARK_CHAOS_FAULT');
      expect(fault.name).to.equal('ChaosFaultError');
      expect(fault.message).to.contain('orders');
      expect(fn.called).to.equal(false);

      expect(await monkey.execute(fn)).to.equal('ok');
      expect(monkey.stats()).to.deep.equal({ enabled: true, injectedLatency: 0, injectedFaults: 1, calls: 2 });
    });

    it('defaults to status 500', async () => {
      const error = (await chaos({ fault: { rate: 1 } }).execute(() => 1).catch((e: unknown) => e)) as ChaosFaultError;
      expect(error.status).to.equal(500);
      expect(error.statusCode).to.equal(500);
    });

    it('throws the given error, or what the given function makes from the request', async () => {
      const custom = new RangeError('custom');
      expect(await chaos({ fault: { rate: 1, error: custom } }).execute(() => 1).catch((e: unknown) => e)).to.equal(custom);

      const make = sinon.spy((req: NormalizedRequest | undefined) => new Error(`fault for ${req?.path}`));
      const monkey = chaos({ fault: { rate: 1, error: make } });
      const error = (await monkey.execute(() => 1, undefined, { request: request() }).catch((e: unknown) => e)) as Error;
      expect(error.message).to.equal('fault for /orders');
      expect(make.calledOnce).to.equal(true);
    });

    it('reports a fault function that returns something other than an Error', async () => {
      const monkey = chaos({ fault: { rate: 1, error: (() => 'oops') as unknown as () => Error } });
      const error = await monkey.execute(() => 1).catch((e: unknown) => e);
      expect(error).to.be.instanceOf(TypeError);
      expect((error as Error).message).to.equal('chaos: fault.error() must return an Error, got string');
    });

    it('waits, then fails, when both strike', async () => {
      const monkey = chaos({ latency: { ms: 300, rate: 1 }, fault: { rate: 1, status: 502 }, random: () => 0 });
      const fault = sinon.spy();
      monkey.on('fault', fault);
      const outcome = monkey.execute(() => 1).catch((e: unknown) => e);
      await clock.tickAsync(299);
      expect(fault.called).to.equal(false);
      await clock.tickAsync(1);
      expect(((await outcome) as ChaosFaultError).status).to.equal(502);
      expect(fault.calledOnce).to.equal(true);
      expect(monkey.stats()).to.deep.include({ injectedLatency: 1, injectedFaults: 1 });
    });

    it('injects exactly when random() falls below the rate', async () => {
      await fc.assert(
        fc.asyncProperty(fc.double({ min: 0, max: 1, noNaN: true }), fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), async (rate, draw) => {
          const monkey = chaos({ fault: { rate }, random: () => draw });
          const failed = await monkey.execute(() => false).then(
            () => false,
            () => true,
          );
          return failed === draw < rate;
        }),
      );
    });

    it('passes results and errors through when nothing is injected', async () => {
      const monkey = chaos({ fault: { rate: 0 }, latency: { ms: 10, rate: 0 } });
      expect(await monkey.execute(async () => 7)).to.equal(7);
      const boom = new Error('boom');
      expect(
        await monkey
          .execute(() => {
            throw boom;
          })
          .catch((e: unknown) => e),
      ).to.equal(boom);
    });
  });

  describe('enabled', () => {
    it('when false, calls straight through without drawing a number or starting a timer', async () => {
      const random = sinon.spy(() => 0);
      const monkey = chaos({ latency: { ms: 100, rate: 1 }, fault: { rate: 1 }, enabled: false, random });
      expect(await monkey.execute(() => 'ok')).to.equal('ok');
      expect(random.called).to.equal(false);
      expect(clock.countTimers()).to.equal(0);
      expect(monkey.stats()).to.deep.equal({ enabled: false, injectedLatency: 0, injectedFaults: 0, calls: 1 });
    });

    it('decides per request with a function of the normalised request', async () => {
      const decide = sinon.spy((req: NormalizedRequest | undefined) => req?.headers['x-chaos'] === 'on');
      const monkey = chaos({ fault: { rate: 1 }, enabled: decide });
      expect(await monkey.execute(() => 'ok', undefined, { request: request() })).to.equal('ok');
      expect(await monkey.execute(() => 'ok').catch((e: unknown) => e)).to.equal('ok');
      expect(decide.secondCall.args[0]).to.equal(undefined);
      const error = await monkey.execute(() => 'ok', undefined, { request: request({ 'x-chaos': 'on' }) }).catch((e: unknown) => e);
      expect(error).to.be.instanceOf(ChaosFaultError);
      expect(monkey.stats()).to.deep.include({ enabled: true, injectedFaults: 1, calls: 3 });
    });

    it('stays off, with one warning, when the decision function throws', async () => {
      const warn = sinon.stub(process, 'emitWarning');
      try {
        const monkey = chaos({
          fault: { rate: 1 },
          enabled: () => {
            throw new Error('bad header parsing');
          },
        });
        expect(await monkey.execute(() => 'ok')).to.equal('ok');
        expect(await monkey.execute(() => 'ok')).to.equal('ok');
        expect(warn.calledOnce).to.equal(true);
        expect(String(warn.firstCall.args[0])).to.contain('bad header parsing');
      } finally {
        warn.restore();
      }
    });

    it('can be switched at run time', async () => {
      const monkey = chaos({ fault: { rate: 1 }, enabled: false });
      expect(await monkey.execute(() => 'ok')).to.equal('ok');
      monkey.enabled = true;
      expect(await monkey.execute(() => 'ok').catch((e: unknown) => e)).to.be.instanceOf(ChaosFaultError);
      monkey.enabled = (req) => req !== undefined;
      expect(await monkey.execute(() => 'ok')).to.equal('ok');
      expect(monkey.stats().enabled).to.equal(true);
    });
  });

  it('has kind chaos and a default name', () => {
    const monkey = chaos({ fault: { rate: 0.5 } });
    expect(monkey.kind).to.equal('chaos');
    expect(monkey.name).to.match(/^chaos-\d+$/);
  });
});
