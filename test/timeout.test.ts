import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { getEventListeners } from 'node:events';
import { fileURLToPath } from 'node:url';
import sinon from 'sinon';
import { DeadlineQueue, type DeadlineEntry } from '../lib/deadline-queue.js';
import { ClientDisconnectedError, isGuardRejection, TimeoutError } from '../lib/errors.js';
import { timeout, type TimeoutOptions } from '../lib/timeout.js';
import { deferred, track } from './helpers/promises.js';



const never = (): Promise<never> => new Promise<never>(() => undefined);
// Taken before any test fakes the timers: a real turn of the event loop.
const realSetImmediate = setImmediate;

describe('timeout', () => {
  describe('options', () => {
    const cases: Array<[string, unknown, unknown, string]> = [
      ['ms 0', 0, undefined, 'timeout: ms must be a finite number of milliseconds > 0, got 0'],
      ['a negative ms', -1, undefined, 'timeout: ms must be a finite number of milliseconds > 0, got -1'],
      ['ms NaN', NaN, undefined, 'timeout: ms must be a finite number of milliseconds > 0, got NaN'],
      ['ms Infinity', Infinity, undefined, 'timeout: ms must be a finite number of milliseconds > 0, got Infinity'],
      ['a string ms', '100', undefined, 'timeout: ms must be a finite number of milliseconds > 0, got "100"'],
      ['no ms', undefined, undefined, 'timeout: ms must be a finite number of milliseconds > 0, got undefined'],
      ['ms past the timer range', 2 ** 31, undefined, 'timeout: ms must be at most 2147483647 ms (about 24.8 days), got 2147483648'],
      ['options that are not an object', 100, 'fast', 'timeout: options must be an object, got "fast"'],
      ['an empty name', 100, { name: '' }, 'timeout: name must be a non-empty string, got ""'],
      ['a bad clock', 100, { clock: () => 1 }, 'timeout: clock must be an object with a now() method, got a function'],
      ['a typo', 100, { nam: 'x' }, 'timeout: unknown option "nam" (allowed: name, clock)'],
    ];
    for (const [what, ms, options, message] of cases) {
      it(`rejects ${what}`, () => {
        expect(() => timeout(ms as number, options as TimeoutOptions)).to.throw(TypeError, message);
      });
    }

    it('accepts the largest timer delay and names itself', () => {
      const guard = timeout(2 ** 31 - 1);
      expect(guard.kind).to.equal('timeout');
      expect(guard.ms).to.equal(2 ** 31 - 1);
      expect(guard.name).to.match(/^timeout-\d+$/);
      expect(timeout(5, { name: 'upstream' }).name).to.equal('upstream');
    });
  });

  describe('deadline', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('answers with the value when the function settles in time', async () => {
      const guard = timeout(100);
      const result = track(
        guard.execute(async () => {
          await new Promise((resolve) => setTimeout(resolve, 99));
          return 'in time';
        }),
      );
      await clock.tickAsync(99);
      expect(result).to.deep.include({ state: 'fulfilled', value: 'in time' });
      expect(guard.stats()).to.deep.equal({ timeoutMs: 100, pending: 0, calls: 1, timedOut: 0 });
    });

    it('passes failures of the function through unchanged', async () => {
      const guard = timeout(100);
      const boom = new Error('boom');
      expect(await guard.execute(() => Promise.reject(boom)).catch((e: unknown) => e)).to.equal(boom);
      const sync = new Error('sync');
      expect(
        await guard
          .execute(() => {
            throw sync;
          })
          .catch((e: unknown) => e),
      ).to.equal(sync);
      expect(await guard.execute(() => 'plain')).to.equal('plain');
      expect(guard.stats()).to.include({ pending: 0, calls: 3, timedOut: 0 });
    });

    it('rejects with a TimeoutError at the deadline even if the function never settles', async () => {
      const guard = timeout(100, { name: 'slow-api' });
      const result = track(guard.execute(never));
      await clock.tickAsync(99);
      expect(result.state).to.equal('pending');
      await clock.tickAsync(1);
      expect(result.state).to.equal('rejected');
      const error = result.error as TimeoutError;
      expect(error).to.be.instanceOf(TimeoutError);
      expect(isGuardRejection(error)).to.equal(true);
      expect(error).to.include({ reason: 'timeout', status: 503, timeoutMs: 100, policy: 'slow-api', code: 'BULWARK_TIMEOUT' });
      expect(guard.stats()).to.include({ pending: 0, timedOut: 1 });
    });

    it('aborts the signal with that same TimeoutError as its reason', async () => {
      const guard = timeout(50);
      let signal: AbortSignal | undefined;
      const result = track(
        guard.execute((ctx) => {
          signal = ctx.signal;
          return never();
        }),
      );
      expect(signal!.aborted).to.equal(false);
      await clock.tickAsync(50);
      expect(signal!.aborted).to.equal(true);
      expect(signal!.reason).to.equal(result.error);
      expect(signal!.reason).to.be.instanceOf(TimeoutError);
    });

    it('lets the signal tell a caller abort from a timeout', async () => {
      const guard = timeout(50);
      const controller = new AbortController();
      let signal: AbortSignal | undefined;
      const result = track(
        guard.execute((ctx) => {
          signal = ctx.signal;
          return new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
        }, controller.signal),
      );
      const reason = new ClientDisconnectedError();
      controller.abort(reason);
      await clock.tickAsync(0);
      expect(signal!.reason).to.equal(reason);
      expect(result.error).to.equal(reason);
      expect(guard.stats().timedOut).to.equal(0);
    });

    it('ignores what the function does after the deadline, and leaves no unhandled rejection', async () => {
      const unhandled = sinon.spy();
      process.on('unhandledRejection', unhandled);
      try {
        const guard = timeout(10);
        const late = deferred<string>();
        const result = track(guard.execute(() => late.promise));
        await clock.tickAsync(10);
        late.reject(new Error('too late'));
        await clock.tickAsync(0);
        expect(result.error).to.be.instanceOf(TimeoutError);
        const lateValue = deferred<string>();
        const second = track(guard.execute(() => lateValue.promise));
        await clock.tickAsync(10);
        lateValue.resolve('too late');
        await clock.tickAsync(0);
        expect(second.error).to.be.instanceOf(TimeoutError);
        await new Promise((resolve) => realSetImmediate(resolve));
        expect(unhandled.called).to.equal(false);
      } finally {
        process.off('unhandledRejection', unhandled);
      }
    });

    it('gives every call its own deadline', async () => {
      const guard = timeout(100);
      const a = track(guard.execute(never));
      await clock.tickAsync(30);
      const b = track(guard.execute(never));
      await clock.tickAsync(30);
      const c = track(guard.execute(never));
      await clock.tickAsync(40); // t = 100
      expect([a.state, b.state, c.state]).to.deep.equal(['rejected', 'pending', 'pending']);
      // b and c arrived while the queue was busy: stamped on its next tick (every
      // ceil(100 / 16) = 7 ms), so each expires no earlier than its 100 ms and at most
      // one tick later.
      await clock.tickAsync(29); // t = 129
      expect(b.state).to.equal('pending');
      await clock.tickAsync(8); // t = 137
      expect([b.state, c.state]).to.deep.equal(['rejected', 'pending']);
      await clock.tickAsync(22); // t = 159
      expect(c.state).to.equal('pending');
      await clock.tickAsync(8); // t = 167
      expect(c.state).to.equal('rejected');
      expect(guard.stats()).to.include({ pending: 0, timedOut: 3 });
    });

    it('expires calls that started in the same millisecond together, and the ones that settled not at all', async () => {
      const guard = timeout(100);
      const gates = Array.from({ length: 10 }, () => deferred<number>());
      const results = gates.map((gate) => track(guard.execute(() => gate.promise)));
      gates.forEach((gate, i) => i % 2 === 0 && gate.resolve(i));
      // The first call stamped its deadline at once (idle queue), the others on the first tick.
      await clock.tickAsync(100 + 7);
      expect(results.map((r) => r.state)).to.deep.equal(Array.from({ length: 10 }, (_, i) => (i % 2 === 0 ? 'fulfilled' : 'rejected')));
      expect(guard.stats()).to.include({ timedOut: 5, pending: 0 });
    });

    it('uses one timer however many calls are in flight, and none once nothing is pending', async () => {
      const guard = timeout(1000);
      const gates = Array.from({ length: 1000 }, () => deferred<number>());
      const calls = gates.map((gate) => guard.execute(() => gate.promise));
      expect(clock.countTimers()).to.equal(1);
      expect(guard.stats().pending).to.equal(1000);
      gates.forEach((gate, i) => gate.resolve(i));
      await Promise.all(calls);
      expect(guard.stats().pending).to.equal(0);
      // Not cleared on every call: the idle timer lapses at its next tick (1000 / 16, at most 25 ms).
      expect(clock.countTimers()).to.equal(1);
      await clock.tickAsync(25);
      expect(clock.countTimers()).to.equal(0);
    });

    it('reports success, failure and rejected (timeout) to listeners, with durations', async () => {
      const guard = timeout(100);
      const seen: unknown[] = [];
      guard.on('success', (e) => seen.push(['success', e.durationMs]));
      guard.on('failure', (e) => seen.push(['failure', (e.error as Error).message, e.durationMs]));
      guard.on('rejected', (e) => seen.push(['rejected', e.reason, e.error instanceof TimeoutError]));
      const ok = guard.execute(() => new Promise((resolve) => setTimeout(resolve, 20)));
      const bad = guard.execute(() => new Promise((_, reject) => setTimeout(() => reject(new Error('bad')), 40))).catch(() => undefined);
      const slow = guard.execute(never).catch(() => undefined);
      await clock.tickAsync(100);
      await Promise.all([ok, bad, slow]);
      expect(seen).to.deep.equal([
        ['success', 20],
        ['failure', 'bad', 40],
        ['rejected', 'timeout', true],
      ]);
    });
  });

  describe('resources', () => {
    it('leaves no abort listener on a long-lived caller signal after 10,000 calls', async () => {
      const guard = timeout(30_000);
      const controller = new AbortController();
      for (let i = 0; i < 10_000; i++) {
        // Reading ctx.signal links the call's scope to the caller's signal.
        await guard.execute(async ({ signal }) => signal.aborted, controller.signal);
      }
      await guard.execute(async () => 'not read', controller.signal);
      expect(getEventListeners(controller.signal, 'abort')).to.have.length(0);
      expect(guard.stats()).to.include({ pending: 0, calls: 10_001 });
    });

    it('does not keep a process alive', function () {
      this.timeout(20_000);
      const lib = fileURLToPath(new URL('../lib/timeout.ts', import.meta.url));
      const script = `
        const { timeout } = await import(${JSON.stringify(lib)});
        const guard = timeout(60_000);
        await guard.execute(async () => 1);
        guard.execute(() => new Promise(() => {})); // pending, never settles
        console.log('done');`;
      const started = Date.now();
      const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 15_000 });
      expect(child.stdout.trim()).to.equal('done');
      expect(child.status).to.equal(0);
      expect(Date.now() - started).to.be.below(15_000);
    });
  });
});

describe('DeadlineQueue', () => {
  class Entry implements DeadlineEntry {
    deadline = 0;
    queued = false;
    constructor(readonly id: number) {}
  }
  const internals = (queue: DeadlineQueue<Entry>): { entries: unknown[]; end: number } => queue as unknown as { entries: unknown[]; end: number };

  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  it('is a FIFO with removal from anywhere', () => {
    const queue = new DeadlineQueue<Entry>(undefined, { now: () => 0 }, () => undefined);
    const entries = [1, 2, 3, 4].map((id) => new Entry(id));
    entries.forEach((entry) => queue.push(entry));
    expect(queue.delete(entries[1]!)).to.equal(true);
    expect(queue.delete(entries[1]!)).to.equal(false);
    expect(queue.size).to.equal(3);
    expect(queue.shift()?.id).to.equal(1);
    expect(queue.shift()?.id).to.equal(3);
    expect(queue.shift()?.id).to.equal(4);
    expect(queue.shift()).to.equal(undefined);
    expect(queue.hasTimer).to.equal(false);
  });

  it('keeps memory to the entries in the queue, not to the traffic through it', () => {
    const queue = new DeadlineQueue<Entry>(60_000, { now: () => performance.now() }, () => undefined);
    const resident = new Entry(-1);
    queue.push(resident);
    let peak = 0;
    for (let i = 0; i < 100_000; i++) {
      const entry = new Entry(i);
      queue.push(entry);
      if (i % 3 === 0) queue.push(new Entry(-i)); // one that stays
      queue.delete(entry);
      peak = Math.max(peak, internals(queue).end);
    }
    // Every third iteration leaves an entry behind: about 33,000 live ones.
    expect(queue.size).to.equal(1 + Math.ceil(100_000 / 3));
    expect(peak).to.be.at.most(2 * queue.size + 9);
  });

  it('stays small when one slow entry sits at the head of many fast ones', () => {
    const queue = new DeadlineQueue<Entry>(60_000, { now: () => performance.now() }, () => undefined);
    queue.push(new Entry(0));
    for (let i = 1; i < 100_000; i++) {
      const entry = new Entry(i);
      queue.push(entry);
      queue.delete(entry);
    }
    expect(queue.size).to.equal(1);
    expect(internals(queue).end).to.be.below(16);
    expect(internals(queue).entries.length).to.be.below(100);
  });

  it('expires entries in order, re-arming one timer for the next head', async () => {
    const expired: Array<[number, number]> = [];
    const queue = new DeadlineQueue<Entry>(100, { now: () => Date.now() }, (entry) => expired.push([entry.id, Date.now()]));
    const a = new Entry(1);
    queue.push(a);
    await clock.tickAsync(10);
    const b = new Entry(2);
    queue.push(b);
    await clock.tickAsync(10);
    queue.push(new Entry(3));
    queue.delete(a); // the timer armed for a now finds b at the head
    await clock.tickAsync(200);
    // b and c came while the timer ran: stamped on its next tick (every 7 ms), so each
    // expires no earlier than its own 100 ms and at most one tick later.
    expect(expired.map(([id]) => id)).to.deep.equal([2, 3]);
    expect(expired[0]![1]).to.be.within(110, 117);
    expect(expired[1]![1]).to.be.within(120, 127);
    expect(queue.size).to.equal(0);
    expect(clock.countTimers()).to.equal(0);
  });

  it('lets an expiry callback push and delete entries', async () => {
    const seen: number[] = [];
    const queue: DeadlineQueue<Entry> = new DeadlineQueue<Entry>(50, { now: () => Date.now() }, (entry) => {
      seen.push(entry.id);
      if (entry.id < 3) queue.push(new Entry(entry.id + 1));
    });
    queue.push(new Entry(1));
    await clock.tickAsync(200);
    expect(seen).to.deep.equal([1, 2, 3]);
    expect(queue.size).to.equal(0);
  });

  it('still expires every entry when a callback throws, and reports the error', async () => {
    const seen: number[] = [];
    const queue = new DeadlineQueue<Entry>(50, { now: () => Date.now() }, (entry) => {
      seen.push(entry.id);
      if (entry.id === 1) throw new Error('listener bug');
    });
    queue.push(new Entry(1));
    queue.push(new Entry(2));
    const thrown: unknown[] = [];
    const original = globalThis.queueMicrotask;
    globalThis.queueMicrotask = (callback) => {
      try {
        callback();
      } catch (error) {
        thrown.push(error);
      }
    };
    try {
      clock.tick(50 + 4); // the second entry is stamped on the first tick, ceil(50 / 16) ms in
    } finally {
      globalThis.queueMicrotask = original;
    }
    expect(seen).to.deep.equal([1, 2]);
    expect((thrown[0] as Error).message).to.equal('listener bug');
  });
});
