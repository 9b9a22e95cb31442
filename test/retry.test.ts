import { expect } from 'chai';
import sinon from 'sinon';
import { backoffCeiling, backoffDelay, backoffOptions, parseRetryAfter, retryAfterOf } from '../lib/backoff.js';
import { BulkheadFullError, CircuitOpenError, ClientDisconnectedError, OverloadError, RateLimitError, TimeoutError } from '../lib/errors.js';
import { pipeline } from '../lib/pipeline.js';
import { isTransientError, retry, type RetryOptions } from '../lib/retry.js';
import { timeout } from '../lib/timeout.js';
import { track } from './helpers/promises.js';

function httpError(status: number, extra: Record<string, unknown> = {}): Error {
  return Object.assign(new Error(`status ${status}`), { status }, extra);
}

function codeError(code: string): Error {
  return Object.assign(new Error(code), { code });
}


describe('retry', () => {
  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['options that are not an object', 3, 'retry: options must be an object, got 3'],
      ['attempts 0', { attempts: 0 }, 'retry: attempts must be a positive integer, got 0'],
      ['negative attempts', { attempts: -2 }, 'retry: attempts must be a positive integer, got -2'],
      ['fractional attempts', { attempts: 2.5 }, 'retry: attempts must be a positive integer, got 2.5'],
      ['NaN attempts', { attempts: NaN }, 'retry: attempts must be a positive integer, got NaN'],
      ['infinite attempts', { attempts: Infinity }, 'retry: attempts must be a positive integer, got Infinity'],
      ['string attempts', { attempts: '3' }, 'retry: attempts must be a positive integer, got "3"'],
      ['a backoff that is not an object', { backoff: 100 }, 'retry: backoff must be an object, got 100'],
      ['a negative initialMs', { backoff: { initialMs: -1 } }, 'retry: backoff.initialMs must be a finite number of milliseconds >= 0, got -1'],
      ['a NaN initialMs', { backoff: { initialMs: NaN } }, 'retry: backoff.initialMs must be a finite number of milliseconds >= 0, got NaN'],
      ['an infinite maxMs', { backoff: { maxMs: Infinity } }, 'retry: backoff.maxMs must be a finite number of milliseconds >= 0, got Infinity'],
      ['maxMs below initialMs', { backoff: { initialMs: 500, maxMs: 100 } }, 'retry: backoff.maxMs must be at least backoff.initialMs (500), got 100'],
      ['a multiplier below 1', { backoff: { multiplier: 0.5 } }, 'retry: backoff.multiplier must be a finite number >= 1, got 0.5'],
      ['a string multiplier', { backoff: { multiplier: '2' } }, 'retry: backoff.multiplier must be a finite number >= 1, got "2"'],
      ['an unknown jitter', { backoff: { jitter: 'decorrelated' } }, `retry: backoff.jitter must be one of 'full', 'equal', 'none', got "decorrelated"`],
      ['a typo in backoff', { backoff: { initialDelay: 5 } }, 'retry: backoff: unknown option "initialDelay" (allowed: initialMs, maxMs, multiplier, jitter)'],
      ['retryOn not a function', { retryOn: [503] }, 'retry: retryOn must be a function, got an array'],
      ['random not a function', { random: 0.5 }, 'retry: random must be a function, got 0.5'],
      ['a negative maxRetryAfterMs', { maxRetryAfterMs: -1 }, 'retry: maxRetryAfterMs must be a finite number of milliseconds >= 0, got -1'],
      ['an infinite maxRetryAfterMs', { maxRetryAfterMs: Infinity }, 'retry: maxRetryAfterMs must be a finite number of milliseconds >= 0, got Infinity'],
      ['an empty name', { name: '' }, 'retry: name must be a non-empty string, got ""'],
      ['a bad clock', { clock: { now: 1 } }, 'retry: clock must be an object with a now() method, got {"now":1}'],
      ['a typo', { attempt: 3 }, 'retry: unknown option "attempt" (allowed: attempts, backoff, retryOn, maxRetryAfterMs, random, name, clock)'],
    ];
    for (const [what, options, message] of cases) {
      it(`rejects ${what}`, () => {
        expect(() => retry(options as RetryOptions)).to.throw(TypeError, message);
      });
    }

    it('defaults to 3 attempts and a 100 ms … 10 s full-jitter backoff', () => {
      const guard = retry();
      expect(guard.kind).to.equal('retry');
      expect(guard.name).to.match(/^retry-\d+$/);
      expect(guard.attempts).to.equal(3);
      expect(guard.backoff).to.deep.equal({ initialMs: 100, maxMs: 10_000, multiplier: 2, jitter: 'full' });
      expect(guard.maxRetryAfterMs).to.equal(60_000);
      expect(guard.stats()).to.deep.equal({ maxAttempts: 3, calls: 0, retries: 0, successes: 0, failures: 0 });
    });
  });

  describe('retryOn default (isTransientError)', () => {
    for (const status of [408, 429, 500, 502, 503, 504]) {
      it(`retries status ${status}`, () => {
        expect(isTransientError(httpError(status))).to.equal(true);
        expect(isTransientError({ statusCode: status })).to.equal(true);
      });
    }
    for (const status of [400, 401, 403, 404, 409, 422, 501, 505]) {
      it(`does not retry status ${status}`, () => {
        expect(isTransientError(httpError(status))).to.equal(false);
        expect(isTransientError({ statusCode: status })).to.equal(false);
      });
    }
    for (const code of ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ENETUNREACH', 'EHOSTUNREACH', 'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT']) {
      it(`retries network error ${code}`, () => {
        expect(isTransientError(codeError(code))).to.equal(true);
      });
    }
    it('retries fetch failures by their cause', () => {
      expect(isTransientError(new TypeError('fetch failed', { cause: codeError('ECONNREFUSED') }))).to.equal(true);
      expect(isTransientError(new TypeError('fetch failed', { cause: new AggregateError([codeError('ECONNREFUSED'), codeError('ENETUNREACH')]) }))).to.equal(true);
      expect(isTransientError(new TypeError('fetch failed', { cause: codeError('ERR_INVALID_URL') }))).to.equal(false);
      expect(isTransientError(new TypeError('fetch failed'))).to.equal(false);
    });
    it('does not retry other errors', () => {
      for (const error of [new Error('bug'), new TypeError('x is not a function'), codeError('ENOTFOUND'), codeError('UND_ERR_ABORTED'), new DOMException('aborted', 'AbortError'), 'a string', undefined, null, 503]) {
        expect(isTransientError(error), String(error)).to.equal(false);
      }
    });
    it('retries bulwark timeouts and no other rejection', () => {
      expect(isTransientError(new TimeoutError(100))).to.equal(true);
      expect(isTransientError(new CircuitOpenError(1000))).to.equal(false);
      expect(isTransientError(new BulkheadFullError())).to.equal(false);
      expect(isTransientError(new RateLimitError(1000))).to.equal(false);
      expect(isTransientError(new OverloadError())).to.equal(false);
      expect(isTransientError(new ClientDisconnectedError())).to.equal(false);
    });
  });

  describe('backoff', () => {
    const b = backoffOptions('retry', { initialMs: 100, maxMs: 1000, multiplier: 3, jitter: 'none' });
    it('grows by the multiplier up to maxMs', () => {
      expect([1, 2, 3, 4, 5, 1000].map((n) => backoffCeiling(b, n))).to.deep.equal([100, 300, 900, 1000, 1000, 1000]);
    });
    it('jitters within [0, ceiling] (full), [ceiling/2, ceiling] (equal), or not at all (none)', () => {
      const full = { ...b, jitter: 'full' as const };
      const equal = { ...b, jitter: 'equal' as const };
      expect(backoffDelay(full, 2, () => 0)).to.equal(0);
      expect(backoffDelay(full, 2, () => 0.5)).to.equal(150);
      expect(backoffDelay(equal, 2, () => 0)).to.equal(150);
      expect(backoffDelay(equal, 2, () => 0.5)).to.equal(225);
      expect(backoffDelay(b, 2, () => 0.99)).to.equal(300);
      // A misbehaving random cannot stretch the bounds.
      expect(backoffDelay(full, 2, () => 7)).to.equal(300);
      expect(backoffDelay(equal, 2, () => -1)).to.equal(150);
    });
  });

  describe('Retry-After', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers(new Date('2025-01-01T00:00:00Z'));
    });
    afterEach(() => clock.restore());

    it('reads delay-seconds and HTTP-dates', () => {
      expect(parseRetryAfter('2')).to.equal(2000);
      expect(parseRetryAfter(' 0 ')).to.equal(0);
      expect(parseRetryAfter('Wed, 01 Jan 2025 00:00:05 GMT')).to.equal(5000);
      expect(parseRetryAfter('Tue, 31 Dec 2024 23:00:00 GMT')).to.equal(0);
      for (const bad of ['', '-1', '1.5', 'soon', undefined, null]) expect(parseRetryAfter(bad), String(bad)).to.equal(undefined);
    });

    it('finds the wait on the error or on its response', () => {
      expect(retryAfterOf({ retryAfterMs: 1234 })).to.equal(1234);
      expect(retryAfterOf({ response: { headers: new Headers({ 'Retry-After': '3' }) } })).to.equal(3000);
      expect(retryAfterOf({ response: { headers: { 'retry-after': 'Wed, 01 Jan 2025 00:00:07 GMT' } } })).to.equal(7000);
      expect(retryAfterOf({ response: { headers: { 'Retry-After': ['4'] } } })).to.equal(4000);
      expect(retryAfterOf({ response: { headers: {} } })).to.equal(undefined);
      expect(retryAfterOf(new Error('plain'))).to.equal(undefined);
      expect(retryAfterOf({ retryAfterMs: -5 })).to.equal(undefined);
    });
  });

  describe('retrying', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('tries `attempts` times in all, with growing waits, then throws the last error', async () => {
      const guard = retry({ random: () => 0.5 });
      const times: number[] = [];
      const attempts: number[] = [];
      const errors = [httpError(503), httpError(502), httpError(500)];
      const result = track(
        guard.execute(({ attempt }) => {
          times.push(Date.now());
          attempts.push(attempt);
          throw errors[attempt - 1];
        }),
      );
      await clock.tickAsync(10_000);
      expect(attempts).to.deep.equal([1, 2, 3]);
      // full jitter with random 0.5: half of 100, then half of 200
      expect(times).to.deep.equal([0, 50, 150]);
      expect(result.error).to.equal(errors[2]);
      expect(guard.stats()).to.deep.equal({ maxAttempts: 3, calls: 1, retries: 2, successes: 0, failures: 1 });
    });

    it('answers with the first success', async () => {
      const guard = retry({ attempts: 5, backoff: { jitter: 'none' } });
      const fn = sinon.stub();
      fn.onCall(0).rejects(codeError('ECONNRESET'));
      fn.onCall(1).rejects(httpError(429));
      fn.onCall(2).resolves('third time lucky');
      const result = track(guard.execute(fn));
      await clock.tickAsync(99);
      expect(fn.callCount).to.equal(1);
      await clock.tickAsync(1);
      expect(fn.callCount).to.equal(2);
      await clock.tickAsync(200);
      expect(result).to.deep.include({ state: 'fulfilled', value: 'third time lucky' });
      expect(fn.callCount).to.equal(3);
      expect(guard.stats()).to.include({ calls: 1, retries: 2, successes: 1, failures: 0 });
    });

    it('does not retry what retryOn refuses, and asks it with the attempt number', async () => {
      const retryOn = sinon.spy((error: unknown, attempt: number) => attempt < 2 && error instanceof RangeError);
      const guard = retry({ attempts: 5, retryOn, backoff: { initialMs: 0 } });
      const fn = sinon.spy(() => {
        throw new RangeError('again');
      });
      const error = await guard.execute(fn).catch((e: unknown) => e);
      expect(error).to.be.instanceOf(RangeError);
      expect(fn.callCount).to.equal(2);
      expect(retryOn.args.map(([, attempt]) => attempt)).to.deep.equal([1, 2]);

      const notFound = httpError(404);
      const once = sinon.spy(() => Promise.reject(notFound));
      expect(await retry().execute(once).catch((e: unknown) => e)).to.equal(notFound);
      expect(once.callCount).to.equal(1);
    });

    it('lets the original error stand when retryOn throws', async () => {
      const guard = retry({
        retryOn: () => {
          throw new Error('predicate bug');
        },
      });
      const original = httpError(503);
      const fn = sinon.spy(() => Promise.reject(original));
      expect(await guard.execute(fn).catch((e: unknown) => e)).to.equal(original);
      expect(fn.callCount).to.equal(1);
    });

    it('never retries a circuit-open rejection', async () => {
      const fn = sinon.spy(() => Promise.reject(new CircuitOpenError(5000)));
      await retry().execute(fn).catch(() => undefined);
      expect(fn.callCount).to.equal(1);
    });

    it('waits at least retryAfterMs, or the response Retry-After', async () => {
      const guard = retry({ random: () => 0 });
      const times: number[] = [];
      const result = track(
        guard.execute(({ attempt }) => {
          times.push(Date.now());
          if (attempt === 1) throw httpError(503, { retryAfterMs: 2000 });
          if (attempt === 2) throw httpError(429, { response: { headers: new Headers({ 'retry-after': '3' }) } });
          return 'ok';
        }),
      );
      await clock.tickAsync(10_000);
      expect(result.value).to.equal('ok');
      expect(times).to.deep.equal([0, 2000, 5000]);
    });

    it('ends the retries at once when the wait asked for is longer than maxRetryAfterMs', async () => {
      const guard = retry({ maxRetryAfterMs: 60_000 });
      const tooLong = httpError(503, { retryAfterMs: 86_400_000 });
      const fn = sinon.spy(() => Promise.reject(tooLong));
      const result = track(guard.execute(fn));
      await clock.tickAsync(0);
      expect(result.error).to.equal(tooLong);
      expect(fn.callCount).to.equal(1);
      expect(clock.countTimers()).to.equal(0);
    });

    it('never waits less than the backoff when Retry-After is shorter', async () => {
      const guard = retry({ attempts: 2, backoff: { initialMs: 400, jitter: 'none' } });
      const times: number[] = [];
      const result = track(
        guard.execute(({ attempt }) => {
          times.push(Date.now());
          if (attempt === 1) throw httpError(503, { retryAfterMs: 100 });
          return attempt;
        }),
      );
      await clock.tickAsync(1000);
      expect(result.value).to.equal(2);
      expect(times).to.deep.equal([0, 400]);
    });

    it('reports each retry to listeners with the attempt to come, the wait and the error', async () => {
      const guard = retry({ random: () => 1, backoff: { initialMs: 10 } });
      const seen: unknown[] = [];
      guard.on('retry', (e) => seen.push(e));
      guard.on('failure', (e) => seen.push(['failure', e.durationMs]));
      const errors = [httpError(500), httpError(502), httpError(503)];
      const result = track(guard.execute(({ attempt }) => Promise.reject(errors[attempt - 1])));
      await clock.tickAsync(100);
      expect(result.error).to.equal(errors[2]);
      expect(seen).to.deep.equal([{ attempt: 2, delayMs: 10, error: errors[0] }, { attempt: 3, delayMs: 20, error: errors[1] }, ['failure', 30]]);
    });
  });

  describe('cancellation', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('stops a wait at once when the signal aborts, rejecting with the abort reason', async () => {
      const guard = retry({ backoff: { initialMs: 5000, jitter: 'none' } });
      const controller = new AbortController();
      const fn = sinon.spy(() => Promise.reject(httpError(503)));
      const result = track(guard.execute(fn, controller.signal));
      await clock.tickAsync(100);
      expect(fn.callCount).to.equal(1);
      const reason = new ClientDisconnectedError();
      controller.abort(reason);
      await clock.tickAsync(0);
      expect(result.error).to.equal(reason);
      expect(clock.countTimers()).to.equal(0);
      await clock.tickAsync(60_000);
      expect(fn.callCount).to.equal(1);
      expect(guard.stats()).to.include({ failures: 1, retries: 1 });
    });

    it('makes no attempt at all when the signal has already aborted', async () => {
      const fn = sinon.spy();
      const reason = new Error('cancelled');
      expect(await retry().execute(fn, AbortSignal.abort(reason)).catch((e: unknown) => e)).to.equal(reason);
      expect(fn.called).to.equal(false);
    });

    it('does not retry a try that failed after the abort, and throws its error', async () => {
      const controller = new AbortController();
      const fn = sinon.spy(async ({ signal }: { signal: AbortSignal }) => {
        controller.abort(new Error('caller gave up'));
        throw Object.assign(new Error('socket hang up'), { code: 'ECONNRESET', aborted: signal.aborted });
      });
      const error = await retry().execute(fn, controller.signal).catch((e: unknown) => e);
      expect((error as Error).message).to.equal('socket hang up');
      expect(fn.callCount).to.equal(1);
    });

    it('stops when an outer timeout fires during a wait, and starts no further try', async () => {
      const fn = sinon.spy(() => Promise.reject(httpError(503)));
      const guard = pipeline(timeout(250), retry({ attempts: 10, backoff: { initialMs: 100, jitter: 'none' } }));
      const result = track(guard.execute(fn));
      await clock.tickAsync(250);
      expect(result.error).to.be.instanceOf(TimeoutError);
      // tries at 0, 100, 300 would be the schedule; the third never starts
      expect(fn.callCount).to.equal(2);
      await clock.tickAsync(10_000);
      expect(fn.callCount).to.equal(2);
      expect(clock.countTimers()).to.equal(0);
    });

    it('retries an inner timeout, each try with a fresh deadline and a fresh signal', async () => {
      const signals: AbortSignal[] = [];
      const guard = pipeline(retry({ backoff: { initialMs: 10, jitter: 'none' } }), timeout(100));
      const result = track(
        guard.execute(({ signal, attempt }) => {
          signals.push(signal);
          return attempt < 3 ? new Promise<never>(() => undefined) : 'third';
        }),
      );
      await clock.tickAsync(100 + 10 + 100 + 20);
      expect(result.value).to.equal('third');
      expect(signals).to.have.length(3);
      expect(signals.map((s) => s.aborted)).to.deep.equal([true, true, false]);
      expect(signals[0]!.reason).to.be.instanceOf(TimeoutError);
    });
  });
});
