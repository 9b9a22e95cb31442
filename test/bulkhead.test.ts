import { expect } from 'chai';
import { getEventListeners } from 'node:events';
import sinon from 'sinon';
import { bulkhead, type BulkheadOptions } from '../lib/bulkhead.js';
import { BulkheadFullError, ClientDisconnectedError, isGuardRejection } from '../lib/errors.js';
import { deferred, flush, track } from './helpers/promises.js';




describe('bulkhead', () => {
  describe('options', () => {
    const cases: Array<[string, unknown, string]> = [
      ['no options', undefined, 'bulkhead: limit must be a positive integer, got undefined'],
      ['options that are not an object', 5, 'bulkhead: options must be an object, got 5'],
      ['a negative limit', { limit: -1 }, 'bulkhead: limit must be a positive integer, got -1'],
      ['a zero limit', { limit: 0 }, 'bulkhead: limit must be a positive integer, got 0'],
      ['a fractional limit', { limit: 1.5 }, 'bulkhead: limit must be a positive integer, got 1.5'],
      ['a NaN limit', { limit: NaN }, 'bulkhead: limit must be a positive integer, got NaN'],
      ['an infinite limit', { limit: Infinity }, 'bulkhead: limit must be a positive integer, got Infinity'],
      ['a string limit', { limit: '10' }, 'bulkhead: limit must be a positive integer, got "10"'],
      ['a negative queue', { limit: 1, queue: -1 }, 'bulkhead: queue must be a non-negative integer, got -1'],
      ['an infinite queue', { limit: 1, queue: Infinity }, 'bulkhead: queue must be a non-negative integer, got Infinity'],
      ['a string queue', { limit: 1, queue: '5' }, 'bulkhead: queue must be a non-negative integer, got "5"'],
      ['a zero queueTimeoutMs', { limit: 1, queue: 1, queueTimeoutMs: 0 }, 'bulkhead: queueTimeoutMs must be a finite number of milliseconds > 0, got 0'],
      ['a negative queueTimeoutMs', { limit: 1, queue: 1, queueTimeoutMs: -5 }, 'bulkhead: queueTimeoutMs must be a finite number of milliseconds > 0, got -5'],
      ['a NaN queueTimeoutMs', { limit: 1, queue: 1, queueTimeoutMs: NaN }, 'bulkhead: queueTimeoutMs must be a finite number of milliseconds > 0, got NaN'],
      ['an infinite queueTimeoutMs', { limit: 1, queue: 1, queueTimeoutMs: Infinity }, 'bulkhead: queueTimeoutMs must be a finite number of milliseconds > 0, got Infinity'],
      ['a queueTimeoutMs past the timer range', { limit: 1, queue: 1, queueTimeoutMs: 2 ** 31 }, 'bulkhead: queueTimeoutMs must be at most 2147483647 ms (about 24.8 days), got 2147483648'],
      ['an empty name', { limit: 1, name: '' }, 'bulkhead: name must be a non-empty string, got ""'],
      ['a clock without now()', { limit: 1, clock: {} }, 'bulkhead: clock must be an object with a now() method, got {}'],
      ['a typo', { limit: 1, queueTimeout: 5 }, 'bulkhead: unknown option "queueTimeout" (allowed: limit, queue, queueTimeoutMs, name, clock)'],
    ];
    for (const [what, options, message] of cases) {
      it(`rejects ${what}`, () => {
        expect(() => bulkhead(options as BulkheadOptions)).to.throw(TypeError, message);
      });
    }

    it('defaults queue to 0 and names itself', () => {
      const guard = bulkhead({ limit: 2 });
      expect(guard.kind).to.equal('bulkhead');
      expect(guard.name).to.match(/^bulkhead-\d+$/);
      expect(guard.stats()).to.deep.equal({ active: 0, queued: 0, limit: 2, queue: 0, admitted: 0, rejected: 0, queueTimeouts: 0, abandoned: 0 });
    });

    it('does not change the options object', () => {
      const options = Object.freeze({ limit: 3, queue: 2, queueTimeoutMs: 100, name: 'db' });
      const guard = bulkhead(options);
      expect(guard.name).to.equal('db');
      expect(guard.queueTimeoutMs).to.equal(100);
    });
  });

  describe('admission', () => {
    it('runs up to limit calls at once and refuses the next at once with BulkheadFullError', async () => {
      const guard = bulkhead({ limit: 2, name: 'db' });
      const gates = [deferred<number>(), deferred<number>()];
      const running = gates.map((gate) => guard.execute(() => gate.promise));
      expect(guard.stats()).to.include({ active: 2, queued: 0 });

      const fn = sinon.spy(() => 3);
      const refused = await guard.execute(fn).catch((error: unknown) => error);
      expect(refused).to.be.instanceOf(BulkheadFullError);
      expect(isGuardRejection(refused)).to.equal(true);
      expect(refused).to.include({ reason: 'bulkhead_full', status: 503, policy: 'db', code: 'BULWARK_BULKHEAD_FULL' });
      expect(fn.called).to.equal(false);

      gates[0]!.resolve(1);
      gates[1]!.resolve(2);
      expect(await Promise.all(running)).to.deep.equal([1, 2]);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 2, rejected: 1 });
    });

    it('passes the call context and attempt through', async () => {
      const guard = bulkhead({ limit: 1 });
      const context = { tenant: 'a' };
      const seen = await guard.execute((ctx) => ctx, undefined, context);
      expect(seen.context).to.equal(context);
      expect(seen.attempt).to.equal(1);
    });

    const outcomes: Array<[string, () => unknown]> = [
      ['resolves', () => Promise.resolve('ok')],
      ['rejects', () => Promise.reject(new Error('boom'))],
      ['throws synchronously', () => {
        throw new Error('sync boom');
      }],
      ['returns a plain value', () => 'plain'],
      ['returns a foreign thenable', () => ({ then: (resolve: (value: string) => void) => resolve('thenable') })],
    ];
    for (const [what, fn] of outcomes) {
      it(`releases its place exactly once when the function ${what}`, async () => {
        const guard = bulkhead({ limit: 1, queue: 1 });
        const blocker = deferred();
        const first = guard.execute(async () => {
          await blocker.promise;
          return fn();
        });
        const second = guard.execute(() => 'second');
        expect(guard.stats()).to.include({ active: 1, queued: 1 });
        blocker.resolve();
        await first.catch(() => undefined);
        expect(await second).to.equal('second');
        // A second release would have driven `active` below zero.
        expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 2 });
        await guard.execute(fn as () => unknown).catch(() => undefined);
        expect(guard.stats()).to.include({ active: 0, queued: 0 });
      });
    }
  });

  describe('queue', () => {
    it('serves waiters first in, first out and refuses beyond the queue at once', async () => {
      const guard = bulkhead({ limit: 1, queue: 3 });
      const order: string[] = [];
      const gate = deferred();
      const first = guard.execute(async () => {
        order.push('a');
        await gate.promise;
      });
      const waiting = ['b', 'c', 'd'].map((label) => guard.execute(() => void order.push(label)));
      expect(guard.stats()).to.include({ active: 1, queued: 3 });
      const refused = await guard.execute(() => order.push('e')).catch((error: unknown) => error);
      expect(refused).to.be.instanceOf(BulkheadFullError);

      gate.resolve();
      await Promise.all([first, ...waiting]);
      expect(order).to.deep.equal(['a', 'b', 'c', 'd']);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 4, rejected: 1 });
    });

    it('hands a freed place to the oldest waiter, never to a newcomer', async () => {
      const guard = bulkhead({ limit: 1, queue: 5 });
      const order: string[] = [];
      const gate = deferred();
      const first = guard.execute(() => gate.promise);
      const waiter = guard.execute(() => void order.push('waiter'));
      gate.resolve();
      await first;
      // The place is the waiter's now, even if its turn has not come round yet.
      const newcomer = guard.execute(() => void order.push('newcomer'));
      await Promise.all([waiter, newcomer]);
      expect(order).to.deep.equal(['waiter', 'newcomer']);
    });

    it('never has more than limit running while waiters take their turns', async () => {
      const guard = bulkhead({ limit: 3, queue: 20 });
      let running = 0;
      let peak = 0;
      const calls = Array.from({ length: 23 }, (_, i) =>
        guard.execute(async () => {
          running++;
          peak = Math.max(peak, running);
          for (let t = 0; t < (i % 4) + 1; t++) await Promise.resolve();
          running--;
          return i;
        }),
      );
      expect(await Promise.all(calls)).to.deep.equal(Array.from({ length: 23 }, (_, i) => i));
      expect(peak).to.equal(3);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 23 });
    });
  });

  describe('aborts', () => {
    it('takes a waiter whose signal aborts out of the queue at once, with the abort reason, and never runs it', async () => {
      const guard = bulkhead({ limit: 1, queue: 2 });
      const gate = deferred();
      const first = guard.execute(() => gate.promise);
      const controller = new AbortController();
      const fn = sinon.spy(() => 'never');
      const waiter = track(guard.execute(fn, controller.signal));
      const next = guard.execute(() => 'next');
      expect(guard.stats().queued).to.equal(2);

      const reason = new ClientDisconnectedError();
      controller.abort(reason);
      await flush();
      expect(waiter.state).to.equal('rejected');
      expect(waiter.error).to.equal(reason);
      expect(guard.stats()).to.include({ queued: 1, abandoned: 1, active: 1 });

      gate.resolve();
      await first;
      expect(await next).to.equal('next');
      expect(fn.called).to.equal(false);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 2 });
    });

    it('refuses a caller whose signal already aborted, without running it', async () => {
      const guard = bulkhead({ limit: 1, queue: 1 });
      const fn = sinon.spy();
      const reason = new Error('gone');
      const error = await guard.execute(fn, AbortSignal.abort(reason)).catch((e: unknown) => e);
      expect(error).to.equal(reason);
      expect(fn.called).to.equal(false);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 0 });
    });

    it('leaves no abort listener on a long-lived signal', async () => {
      const guard = bulkhead({ limit: 2, queue: 10 });
      const controller = new AbortController();
      // Batches of 5: 2 run, 3 wait (and subscribe to the signal) at any time.
      for (let batch = 0; batch < 200; batch++) {
        const calls = Array.from({ length: 5 }, (_, i) =>
          guard.execute(async ({ signal }) => {
            await Promise.resolve();
            return signal.aborted ? -1 : i;
          }, controller.signal),
        );
        expect(await Promise.all(calls)).to.deep.equal([0, 1, 2, 3, 4]);
      }
      expect(getEventListeners(controller.signal, 'abort')).to.have.length(0);
      expect(guard.stats()).to.include({ active: 0, queued: 0 });
    });
  });

  describe('queueTimeoutMs', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('refuses a waiter with BulkheadFullError when its wait runs out, and never grants it the place later', async () => {
      const guard = bulkhead({ limit: 1, queue: 1, queueTimeoutMs: 100, name: 'pool' });
      const gate = deferred();
      const first = guard.execute(() => gate.promise);
      const fn = sinon.spy(() => 'late');
      const waiter = track(guard.execute(fn));

      await clock.tickAsync(99);
      expect(waiter.state).to.equal('pending');
      await clock.tickAsync(1);
      expect(waiter.state).to.equal('rejected');
      expect(waiter.error).to.be.instanceOf(BulkheadFullError);
      expect(guard.stats()).to.include({ queued: 0, active: 1, rejected: 1, queueTimeouts: 1 });

      gate.resolve();
      await first;
      await clock.tickAsync(1000);
      expect(fn.called).to.equal(false);
      expect(guard.stats()).to.include({ active: 0, queued: 0, admitted: 1 });
      expect(clock.countTimers()).to.equal(0);
    });

    it('gives each waiter its own deadline', async () => {
      const guard = bulkhead({ limit: 1, queue: 3, queueTimeoutMs: 100 });
      const gate = deferred();
      const first = guard.execute(() => gate.promise);
      const a = track(guard.execute(() => 'a'));
      await clock.tickAsync(30);
      const b = track(guard.execute(() => 'b'));
      await clock.tickAsync(30);
      const c = track(guard.execute(() => 'c'));

      await clock.tickAsync(40); // t = 100
      expect([a.state, b.state, c.state]).to.deep.equal(['rejected', 'pending', 'pending']);
      // b queued while the queue's timer ran: its deadline is stamped on the next tick
      // (every ceil(100 / 16) = 7 ms): never early, at most one tick late.
      await clock.tickAsync(29); // t = 129
      expect(b.state).to.equal('pending');
      await clock.tickAsync(8); // t = 137
      expect([b.state, c.state]).to.deep.equal(['rejected', 'pending']);
      gate.resolve();
      await first;
      await clock.tickAsync(0);
      expect(c.state).to.equal('fulfilled');
      expect(c.value).to.equal('c');
      expect(guard.stats()).to.include({ queueTimeouts: 2, active: 0, queued: 0 });
    });

    it('keeps one timer for the whole queue, and none once the queue has been empty for a tick', async () => {
      const guard = bulkhead({ limit: 1, queue: 100, queueTimeoutMs: 1000 });
      const gate = deferred();
      const first = guard.execute(() => gate.promise);
      const waiters = Array.from({ length: 100 }, () => guard.execute(() => 1));
      expect(clock.countTimers()).to.equal(1);
      gate.resolve();
      await first;
      await Promise.all(waiters);
      // The idle timer lapses at its next tick (1000 / 16, at most 25 ms) instead of being cleared.
      await clock.tickAsync(25);
      expect(clock.countTimers()).to.equal(0);
    });

    it('drops an aborted waiter without waiting for its timeout', async () => {
      const guard = bulkhead({ limit: 1, queue: 1, queueTimeoutMs: 1000 });
      const gate = deferred();
      void guard.execute(() => gate.promise);
      const controller = new AbortController();
      const waiter = track(guard.execute(() => 1, controller.signal));
      controller.abort(new ClientDisconnectedError());
      await clock.tickAsync(0);
      expect(waiter.error).to.be.instanceOf(ClientDisconnectedError);
      expect(guard.stats()).to.include({ queued: 0, queueTimeouts: 0, abandoned: 1 });
      await clock.tickAsync(2000);
      expect(guard.stats()).to.include({ queueTimeouts: 0 });
      gate.resolve();
    });
  });

  describe('events', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('reports success, failure, queued, queueTimeout and rejected to listeners', async () => {
      const guard = bulkhead({ limit: 1, queue: 1, queueTimeoutMs: 50 });
      const seen: unknown[][] = [];
      guard.on('success', (e) => seen.push(['success', e]));
      guard.on('failure', (e) => seen.push(['failure', (e.error as Error).message, e.durationMs]));
      guard.on('queued', (e) => seen.push(['queued', e]));
      guard.on('queueTimeout', (e) => seen.push(['queueTimeout', e]));
      guard.on('rejected', (e) => seen.push(['rejected', e.reason]));

      const slow = guard
        .execute(async () => {
          await new Promise((resolve) => setTimeout(resolve, 80));
          throw new Error('slow failure');
        })
        .catch(() => undefined);
      const waiter = guard.execute(() => 'x').catch((e: unknown) => e);
      const refused = await guard.execute(() => 'y').catch((e: unknown) => e);
      expect(refused).to.be.instanceOf(BulkheadFullError);
      await clock.tickAsync(50);
      expect(await waiter).to.be.instanceOf(BulkheadFullError);
      await clock.tickAsync(30);
      await slow;
      const quick = guard.execute(async () => {
        await new Promise((resolve) => setTimeout(resolve, 5));
      });
      await clock.tickAsync(5);
      await quick;

      expect(seen).to.deep.equal([
        ['queued', { queued: 1 }],
        ['rejected', 'bulkhead_full'],
        ['queueTimeout', { waitedMs: 50 }],
        ['rejected', 'bulkhead_full'],
        ['failure', 'slow failure', 80],
        ['success', { durationMs: 5 }],
      ]);
    });
  });
});
