import { expect } from 'chai';
import sinon from 'sinon';
import { bulkhead } from '../lib/bulkhead.js';
import { BulkheadFullError, CircuitOpenError, RateLimitError, TimeoutError } from '../lib/errors.js';
import { fallback, type FallbackOptions } from '../lib/fallback.js';
import { pipeline } from '../lib/pipeline.js';
import { timeout } from '../lib/timeout.js';

describe('fallback', () => {
  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['options that are not an object', 'x', 'fallback: options must be an object, got "x"'],
      ['shouldFallback not a function', { shouldFallback: true }, 'fallback: shouldFallback must be a function, got true'],
      ['an empty name', { name: '' }, 'fallback: name must be a non-empty string, got ""'],
      ['a typo', { shouldFalback: () => true }, 'fallback: unknown option "shouldFalback" (allowed: shouldFallback, name)'],
    ];
    for (const [what, options, message] of cases) {
      it(`rejects ${what}`, () => {
        expect(() => fallback(0, options as FallbackOptions)).to.throw(TypeError, message);
      });
    }

    it('is a policy of kind fallback', () => {
      const guard = fallback(null, { name: 'prices' });
      expect(guard.kind).to.equal('fallback');
      expect(guard.name).to.equal('prices');
      expect(fallback(1).name).to.match(/^fallback-\d+$/);
    });
  });

  it('passes a success through untouched', async () => {
    const answer = sinon.spy(() => 'stand-in');
    const guard = fallback(answer);
    expect(await guard.execute(() => 'real')).to.equal('real');
    expect(answer.called).to.equal(false);
    expect(guard.stats()).to.deep.equal({ calls: 1, fallbacks: 0, fallbackFailures: 0 });
  });

  it('answers with the value on a failure, a rejection or a synchronous throw', async () => {
    const guard = fallback({ items: [] });
    expect(await guard.execute(() => Promise.reject(new Error('down')))).to.deep.equal({ items: [] });
    expect(await guard.execute(() => Promise.reject(new CircuitOpenError()))).to.deep.equal({ items: [] });
    expect(
      await guard.execute(() => {
        throw new Error('sync');
      }),
    ).to.deep.equal({ items: [] });
    expect(guard.stats()).to.include({ calls: 3, fallbacks: 3 });
  });

  it('calls the function with the rejection reason, or "error" for a failure', async () => {
    const answer = sinon.spy((reason: string) => `because ${reason}`);
    const guard = fallback(answer);
    const cases: Array<[unknown, string]> = [
      [new CircuitOpenError(1000), 'circuit_open'],
      [new BulkheadFullError(), 'bulkhead_full'],
      [new TimeoutError(100), 'timeout'],
      [new RateLimitError(1000), 'rate_limited'],
      [new Error('bug'), 'error'],
      ['a thrown string', 'error'],
    ];
    for (const [error, reason] of cases) {
      expect(await guard.execute(() => Promise.reject(error))).to.equal(`because ${reason}`);
      expect(answer.lastCall.args).to.deep.equal([reason, error]);
    }
  });

  it('awaits an async fallback', async () => {
    const guard = fallback(async (reason) => {
      await new Promise((resolve) => setImmediate(resolve));
      return reason.toUpperCase();
    });
    expect(await guard.execute(() => Promise.reject(new TimeoutError(5)))).to.equal('TIMEOUT');
  });

  it('lets the original error stand when the fallback throws or rejects', async () => {
    const original = new Error('original');
    const throwing = fallback(() => {
      throw new Error('fallback bug');
    });
    expect(await throwing.execute(() => Promise.reject(original)).catch((e: unknown) => e)).to.equal(original);
    const rejecting = fallback(() => Promise.reject(new Error('fallback down')));
    expect(await rejecting.execute(() => Promise.reject(original)).catch((e: unknown) => e)).to.equal(original);
    expect(rejecting.stats()).to.include({ fallbacks: 0, fallbackFailures: 1 });
  });

  it('lets through the errors shouldFallback refuses', async () => {
    const guard = fallback('stand-in', { shouldFallback: (error) => !(error instanceof RangeError) });
    const passing = new RangeError('caller mistake');
    expect(await guard.execute(() => Promise.reject(passing)).catch((e: unknown) => e)).to.equal(passing);
    expect(await guard.execute(() => Promise.reject(new Error('upstream')))).to.equal('stand-in');
    const broken = fallback('stand-in', {
      shouldFallback: () => {
        throw new Error('predicate bug');
      },
    });
    expect(await broken.execute(() => Promise.reject(passing)).catch((e: unknown) => e)).to.equal(passing);
  });

  it('reports each fallback to listeners', async () => {
    const guard = fallback(0);
    const seen: unknown[] = [];
    guard.on('fallback', (e) => seen.push(e));
    const error = new BulkheadFullError();
    await guard.execute(() => Promise.reject(error));
    await guard.execute(() => 1);
    expect(seen).to.deep.equal([{ reason: 'bulkhead_full', error }]);
  });

  it('answers for the guards inside it: a full bulkhead', async () => {
    const inner = bulkhead({ limit: 1 });
    const guard = pipeline(fallback((reason) => reason), inner);
    let release!: () => void;
    const first = guard.execute(() => new Promise<string>((resolve) => (release = () => resolve('first'))));
    expect(await guard.execute(() => 'second')).to.equal('bulkhead_full');
    release();
    expect(await first).to.equal('first');
  });

  describe('with a timeout inside', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('runs exactly once when the function rejects after its timeout, and leaves no unhandled rejection', async () => {
      const unhandled = sinon.spy();
      process.on('unhandledRejection', unhandled);
      try {
        const answer = sinon.spy((reason: string) => reason);
        const guard = pipeline(fallback(answer), timeout(50));
        const result = guard.execute(() => new Promise((_, reject) => setTimeout(() => reject(new Error('late')), 80)));
        await clock.tickAsync(100);
        expect(await result).to.equal('timeout');
        expect(answer.callCount).to.equal(1);
        await clock.tickAsync(0);
        expect(unhandled.called).to.equal(false);
      } finally {
        process.off('unhandledRejection', unhandled);
      }
    });
  });
});
