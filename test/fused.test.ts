import { expect } from 'chai';
import sinon from 'sinon';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { BulkheadFullError, CircuitOpenError, ClientDisconnectedError, OverloadError, TimeoutError } from '../lib/errors.js';
import { fallback } from '../lib/fallback.js';
import { loadShedder } from '../lib/load-shedder.js';
import { PressureSampler } from '../lib/pressure-sampler.js';
import { compile, FusedCall, FusedSegment, Refusal } from '../lib/fused.js';
import { pipeline } from '../lib/pipeline.js';
import { rateLimit } from '../lib/rate-limit.js';
import { retry } from '../lib/retry.js';
import { RateLimitError } from '../lib/errors.js';
import { Call, type CallContext } from '../lib/policy.js';
import { timeout } from '../lib/timeout.js';

// A pipeline runs each run of guards that admit synchronously as one layer. These tests
// hold that layer to the behaviour of the nested guards it replaces.

const hang = (): Promise<never> => new Promise<never>(() => undefined);

async function outcome(promise: Promise<unknown>): Promise<unknown> {
  try {
    return await promise;
  } catch (error) {
    return error;
  }
}

describe('fused pipeline segments', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  describe('compile', () => {
    it('fuses runs of synchronous guards, one timeout per segment, and leaves the others alone', () => {
      const [b, t1, c, t2, f, r] = [bulkhead({ limit: 1 }), timeout(10), circuitBreaker(), timeout(20), fallback(0), retry()];
      const parts = compile([b, t1, c, t2, f, r, bulkhead({ limit: 2 })]);
      expect(parts).to.have.length(5);
      expect((parts[0] as FusedSegment).policies).to.deep.equal([b, t1, c]);
      expect((parts[0] as FusedSegment).timeoutAt).to.equal(1);
      expect((parts[1] as FusedSegment).policies).to.deep.equal([t2]);
      expect(parts[2]).to.equal(f);
      expect(parts[3]).to.equal(r);
      expect(parts[4]).to.not.be.instanceOf(FusedSegment);
    });

    it('opens up nested pipelines so their guards fuse with their neighbours', async () => {
      const b = bulkhead({ limit: 1 });
      const guard = pipeline(b, pipeline(timeout(10), circuitBreaker()));
      expect(await guard.execute(() => 'ok')).to.equal('ok');
      expect(b.stats().active).to.equal(0);
      expect([...guard.children()]).to.have.length(2);
    });
  });

  it('runs the function once, hands back its value, and frees every place', async () => {
    const b = bulkhead({ limit: 2 });
    const breaker = circuitBreaker();
    const guard = pipeline(b, timeout(1000), breaker);
    let calls = 0;
    expect(await guard.execute(() => ++calls)).to.equal(1);
    expect(calls).to.equal(1);
    expect(b.stats()).to.include({ active: 0, queued: 0 });
    expect(breaker.stats().totals.successes).to.equal(1);
  });

  it('counts a hung call as a breaker failure the moment the timeout fires, and frees the bulkhead place', async () => {
    const b = bulkhead({ limit: 5 });
    const breaker = circuitBreaker({ consecutiveFailures: 2 });
    const guard = pipeline(b, timeout(100), breaker);
    const first = outcome(guard.execute(hang));
    const second = outcome(guard.execute(hang));
    expect(b.stats().active).to.equal(2);
    await clock.tickAsync(100 + 7);
    expect(await first).to.be.instanceOf(TimeoutError);
    expect(await second).to.be.instanceOf(TimeoutError);
    expect(b.stats().active).to.equal(0);
    expect(breaker.state).to.equal('open');
    expect(await outcome(guard.execute(() => 'not called'))).to.be.instanceOf(CircuitOpenError);
  });

  it('gives the signal a TimeoutError as its reason, and ignores the late answer', async () => {
    const breaker = circuitBreaker();
    const guard = pipeline(timeout(50), breaker);
    let signal: AbortSignal | undefined;
    let finish!: (value: string) => void;
    const result = outcome(
      guard.execute((ctx) => {
        signal = ctx.signal;
        return new Promise<string>((resolve) => (finish = resolve));
      }),
    );
    await clock.tickAsync(50);
    expect(signal!.reason).to.be.instanceOf(TimeoutError);
    finish('late');
    expect(await result).to.be.instanceOf(TimeoutError);
    await clock.tickAsync(0);
    expect(breaker.stats().totals).to.include({ failures: 1, successes: 0 });
  });

  it('frees the outer places when an inner guard refuses', async () => {
    const b = bulkhead({ limit: 1 });
    const breaker = circuitBreaker();
    breaker.forceOpen();
    const t = timeout(100);
    const guard = pipeline(b, t, breaker);
    expect(await outcome(guard.execute(() => 'x'))).to.be.instanceOf(CircuitOpenError);
    expect(b.stats().active).to.equal(0);
    expect(t.stats().pending).to.equal(0);
  });

  it('takes the ordinary path when the bulkhead must queue, and still frees everything', async () => {
    const b = bulkhead({ limit: 1, queue: 1 });
    const breaker = circuitBreaker();
    const guard = pipeline(b, timeout(1000), breaker);
    let release!: () => void;
    const first = guard.execute(() => new Promise<string>((resolve) => (release = () => resolve('first'))));
    const second = guard.execute(() => 'second');
    expect(b.stats()).to.include({ active: 1, queued: 1 });
    expect(await outcome(guard.execute(() => 'third'))).to.be.instanceOf(BulkheadFullError);
    release();
    expect(await first).to.equal('first');
    expect(await second).to.equal('second');
    expect(b.stats()).to.include({ active: 0, queued: 0 });
    expect(breaker.stats().totals.successes).to.equal(2);
  });

  it('counts neither way a call whose caller went away', async () => {
    const breaker = circuitBreaker();
    const guard = pipeline(bulkhead({ limit: 1 }), timeout(1000), breaker);
    const controller = new AbortController();
    const result = outcome(
      guard.execute(
        ({ signal }) =>
          new Promise((_, reject) => {
            signal.addEventListener('abort', () => reject(signal.reason));
          }),
        controller.signal,
      ),
    );
    controller.abort(new ClientDisconnectedError());
    expect(await result).to.be.instanceOf(ClientDisconnectedError);
    expect(breaker.stats().totals).to.include({ failures: 0, successes: 0, ignored: 1 });
  });


  it('counts neither way a call whose caller went away, when the function ignores its signal and the deadline passes', async () => {
    const breaker = circuitBreaker();
    const places = bulkhead({ limit: 1 });
    const guard = pipeline(places, timeout(1000), breaker);
    const controller = new AbortController();
    const result = outcome(guard.execute(hang, controller.signal));
    controller.abort(new ClientDisconnectedError());
    await clock.tickAsync(1000);
    expect(await result).to.be.instanceOf(TimeoutError);
    expect(breaker.stats().totals).to.include({ failures: 0, successes: 0, ignored: 1 });
    expect(places.stats().active).to.equal(0);
  });

  it('hands a call without a signal its context and first attempt, and a signal made on demand', async () => {
    const context: CallContext = { tag: 'x' };
    const guard = pipeline(bulkhead({ limit: 1 }), timeout(1000), circuitBreaker());
    const seen = await guard.execute(({ context: received, attempt, signal }) => ({ same: received === context, attempt, aborted: signal.aborted }), undefined, context);
    expect(seen).to.deep.equal({ same: true, attempt: 1, aborted: false });
    const late = guard.execute(({ signal }) => new Promise((resolve) => signal.addEventListener('abort', () => resolve(signal.reason))));
    // The deadline is stamped at the queue's next tick, at most 25 ms after the call began.
    await clock.tickAsync(1025);
    expect(await outcome(late)).to.be.instanceOf(TimeoutError);
  });
  it('reports a synchronous throw of the function as a failure to every guard', async () => {
    const b = bulkhead({ limit: 1 });
    const breaker = circuitBreaker({ consecutiveFailures: 1 });
    const guard = pipeline(b, breaker);
    const error = new Error('sync');
    expect(
      await outcome(
        guard.execute(() => {
          throw error;
        }),
      ),
    ).to.equal(error);
    expect(b.stats().active).to.equal(0);
    expect(breaker.state).to.equal('open');
  });

  it('fuses a rate limit on the memory store: records the decision, refuses in place, frees the outer places', async () => {
    const b = bulkhead({ limit: 1 });
    const limiter = rateLimit({ limit: 1, windowMs: 60_000 });
    const guard = pipeline(b, limiter, timeout(1000));
    expect(compile([b, limiter])).to.have.length(1);
    const context: CallContext = {};
    expect(await guard.execute(() => 'first', undefined, context)).to.equal('first');
    expect(context.rateLimit).to.include({ limit: 1, remaining: 0 });
    const refused = await outcome(guard.execute(() => 'second', undefined, {}));
    expect(refused).to.be.instanceOf(RateLimitError);
    expect(b.stats()).to.include({ active: 0, queued: 0 });
    expect(limiter.stats()).to.include({ admitted: 1, rejected: 1 });
  });

  it('refuses through an open breaker in place, without a rejected promise for a driven call', () => {
    const b = bulkhead({ limit: 1 });
    const breaker = circuitBreaker({ openMs: 1000 });
    breaker.forceOpen();
    const segment = compile([b, timeout(100), breaker])[0] as FusedSegment;
    const owner = { expired: sinon.spy(), runDeferred: sinon.spy(async () => 'deferred') };
    const started = segment.begin(new Call(undefined, 1, undefined), owner);
    expect(started).to.be.instanceOf(Refusal);
    expect((started as Refusal).error).to.be.instanceOf(CircuitOpenError);
    expect(b.stats().active).to.equal(0);
    expect(breaker.stats().totals.rejections).to.equal(1);
    expect(owner.runDeferred.called).to.equal(false);
  });

  it('hands a driven call its record: the function runs when the caller says, the guards hear finish(), the owner hears of the timeout', () => {
    const b = bulkhead({ limit: 2 });
    const breaker = circuitBreaker({ consecutiveFailures: 1 });
    const t = timeout(100);
    const segment = compile([b, t, breaker])[0] as FusedSegment;
    const owner = { expired: sinon.spy(), runDeferred: sinon.spy(async () => 'deferred') };
    const ended = segment.begin(new Call(undefined, 1, undefined), owner) as FusedCall;
    expect(ended).to.be.instanceOf(FusedCall);
    expect(ended.inner).to.equal(ended);
    expect(b.stats().active).to.equal(1);
    ended.finish('done', false);
    expect(b.stats().active).to.equal(0);
    expect(breaker.stats().totals.successes).to.equal(1);

    const hung = segment.begin(new Call(undefined, 1, undefined), owner) as FusedCall;
    expect(hung.aborted).to.equal(false);
    clock.tick(100 + 7);
    expect(owner.expired.calledOnce).to.equal(true);
    expect(owner.expired.firstCall.args[0]).to.be.instanceOf(TimeoutError);
    // The scope made after the fact is already aborted with the timeout.
    expect(hung.signal.aborted).to.equal(true);
    expect(hung.signal.reason).to.be.instanceOf(TimeoutError);
    expect(breaker.stats().state).to.equal('open');
    expect(b.stats().active).to.equal(0);
    hung.finish('late', false);
    expect(breaker.stats().totals.successes).to.equal(1);
  });

  it('fuses a load shedder: admits in place, and refuses in place while it sheds', async () => {
    const pressure = { eventLoopDelayMs: 0, eventLoopUtilization: 0, heapUsedBytes: 0, rssBytes: 0 };
    const sampler = new PressureSampler({ probe: { start() {}, read: () => ({ ...pressure }), stop() {} } });
    try {
      const b = bulkhead({ limit: 1 });
      const shedder = loadShedder({ maxHeapUsedBytes: 100, sampleIntervalMs: 10, sampler });
      expect(compile([b, shedder])).to.have.length(1);
      const guard = pipeline(b, shedder);
      expect(await guard.execute(() => 'ok')).to.equal('ok');
      pressure.heapUsedBytes = 1000;
      await clock.tickAsync(10);
      expect(await outcome(guard.execute(() => 'never'))).to.be.instanceOf(OverloadError);
      expect(b.stats()).to.include({ active: 0, admitted: 2 });
      expect(shedder.stats()).to.include({ admitted: 1, rejected: 1 });
    } finally {
      sampler.stop();
    }
  });

  it('leaves a rate limit on a network store to its own path', async () => {
    const store = {
      consume: async () => ({ allowed: true, limit: 5, remaining: 4, resetMs: 1000, retryAfterMs: 0 }),
      size: () => 0,
    };
    const limiter = rateLimit({ limit: 5, windowMs: 1000, store });
    const context: CallContext = {};
    expect(await pipeline(bulkhead({ limit: 1 }), limiter).execute(() => 'ok', undefined, context)).to.equal('ok');
    expect(context.rateLimit).to.include({ remaining: 4 });
  });
});
