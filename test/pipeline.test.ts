import { expect } from 'chai';
import sinon from 'sinon';
import { bulkhead } from '../lib/bulkhead.js';
import { TimeoutError } from '../lib/errors.js';
import { fallback } from '../lib/fallback.js';
import { pipeline, walk } from '../lib/pipeline.js';
import { Call, type CallContext, type ExecuteContext, type Policy } from '../lib/policy.js';
import { retry } from '../lib/retry.js';
import { timeout } from '../lib/timeout.js';
import { track } from './helpers/promises.js';


/** Counts `new AbortController()` while installed: the lazy signal must not be made unasked. */
function countAbortControllers(): { readonly count: number; restore(): void } {
  const Original = globalThis.AbortController;
  let count = 0;
  class Counting extends Original {
    constructor() {
      super();
      count++;
    }
  }
  globalThis.AbortController = Counting;
  return {
    get count() {
      return count;
    },
    restore() {
      globalThis.AbortController = Original;
    },
  };
}

const makers: Array<[string, () => Policy]> = [
  ['bulkhead', () => bulkhead({ limit: 10, queue: 10 })],
  ['timeout', () => timeout(1000)],
  ['retry', () => retry({ attempts: 2, backoff: { initialMs: 0 } })],
  ['fallback', () => fallback('fallback')],
];

describe('pipeline of the core guards', () => {
  describe('any order, any depth', () => {
    // Every ordering of the four guards, flat and nested two ways.
    const orders: number[][] = [];
    const permute = (rest: number[], prefix: number[]): void => {
      if (rest.length === 0) orders.push(prefix);
      rest.forEach((x, i) => permute([...rest.slice(0, i), ...rest.slice(i + 1)], [...prefix, x]));
    };
    permute([0, 1, 2, 3], []);

    for (const order of orders) {
      const label = order.map((i) => makers[i]![0]).join(', ');
      it(`${label}: returns the value and hands the context through unchanged`, async () => {
        const make = (): Policy[] => order.map((i) => makers[i]![1]());
        const flat = pipeline(...make());
        const [a, b, c, d] = make();
        const nested = pipeline(pipeline(a!, b!), pipeline(c!, pipeline(d!)));
        const deep = pipeline(pipeline(pipeline(pipeline(...make()))));
        for (const guard of [flat, nested, deep]) {
          const context: CallContext = { tenant: 't1' };
          const seen: ExecuteContext[] = [];
          const value = await guard.execute((ctx) => {
            seen.push(ctx);
            return `value for ${(ctx.context as { tenant: string }).tenant}`;
          }, undefined, context);
          expect(value).to.equal('value for t1');
          expect(seen).to.have.length(1);
          expect(seen[0]!.context).to.equal(context);
          expect(seen[0]!.attempt).to.equal(1);
        }
        expect([...walk(nested)].map((p) => p.kind)).to.deep.equal(['pipeline', 'pipeline', order.map((i) => makers[i]![0])[0], order.map((i) => makers[i]![0])[1], 'pipeline', order.map((i) => makers[i]![0])[2], 'pipeline', order.map((i) => makers[i]![0])[3]]);
      });
    }

    it('lets a fallback anywhere outside answer for failures inside', async () => {
      const guard = pipeline(pipeline(fallback((reason) => `degraded: ${reason}`), bulkhead({ limit: 1 })), pipeline(timeout(100), retry({ attempts: 1 })));
      expect(await guard.execute(() => Promise.reject(new Error('down')))).to.equal('degraded: error');
    });
  });

  describe('attempts', () => {
    it('numbers the tries of a retry, through the guards inside it', async () => {
      const guard = pipeline(bulkhead({ limit: 1 }), retry({ attempts: 4, backoff: { initialMs: 0 } }), pipeline(timeout(1000), bulkhead({ limit: 1 })));
      const attempts: number[] = [];
      const context = { id: 7 };
      const contexts: unknown[] = [];
      const value = await guard.execute(
        (ctx) => {
          attempts.push(ctx.attempt);
          contexts.push(ctx.context);
          if (ctx.attempt < 4) throw Object.assign(new Error('busy'), { status: 503 });
          return ctx.attempt;
        },
        undefined,
        context,
      );
      expect(value).to.equal(4);
      expect(attempts).to.deep.equal([1, 2, 3, 4]);
      expect(contexts.every((c) => c === context)).to.equal(true);
    });

    it('restarts the numbering in a retry nested inside another', async () => {
      const guard = pipeline(retry({ attempts: 2, backoff: { initialMs: 0 } }), retry({ attempts: 2, backoff: { initialMs: 0 } }));
      const attempts: number[] = [];
      await guard
        .execute(({ attempt }) => {
          attempts.push(attempt);
          throw Object.assign(new Error('busy'), { status: 503 });
        })
        .catch(() => undefined);
      expect(attempts).to.deep.equal([1, 2, 1, 2]);
    });
  });

  describe('signal', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('aborts on a timeout inside the pipeline, and the guards outside let go', async () => {
      const outer = bulkhead({ limit: 1 });
      const guard = pipeline(outer, pipeline(retry({ attempts: 1 }), timeout(100)));
      let signal: AbortSignal | undefined;
      const result = track(
        guard.execute((ctx) => {
          signal = ctx.signal;
          return new Promise<never>(() => undefined); // ignores its signal
        }),
      );
      await clock.tickAsync(99);
      expect(signal!.aborted).to.equal(false);
      expect(outer.stats().active).to.equal(1);
      await clock.tickAsync(1);
      expect(signal!.aborted).to.equal(true);
      expect(signal!.reason).to.be.instanceOf(TimeoutError);
      expect(result.error).to.equal(signal!.reason);
      expect(outer.stats()).to.include({ active: 0, queued: 0 });
    });

    it('aborts every signal of the calls a timeout covers, inner pipelines included', async () => {
      const guard = pipeline(timeout(50), pipeline(bulkhead({ limit: 5 }), pipeline(fallback('x'))));
      const signals: AbortSignal[] = [];
      const calls = [1, 2, 3].map(() =>
        track(
          guard.execute((ctx) => {
            signals.push(ctx.signal);
            return new Promise<never>(() => undefined);
          }),
        ),
      );
      // The later calls' deadlines are stamped on the timeout's next tick (ceil(50 / 16) ms).
      await clock.tickAsync(50 + 4);
      expect(signals.map((s) => s.aborted)).to.deep.equal([true, true, true]);
      // The fallback sits inside the timeout: it never saw the rejection.
      expect(calls.map((c) => c.error instanceof TimeoutError)).to.deep.equal([true, true, true]);
    });

    it('combines a caller signal with the timeout signal', async () => {
      const guard = pipeline(bulkhead({ limit: 1 }), timeout(1000));
      const controller = new AbortController();
      let signal: AbortSignal | undefined;
      const result = track(
        guard.execute((ctx) => {
          signal = ctx.signal;
          return new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
        }, controller.signal),
      );
      const reason = new Error('caller left');
      controller.abort(reason);
      await clock.tickAsync(0);
      expect(signal!.reason).to.equal(reason);
      expect(result.error).to.equal(reason);
    });
  });

  describe('the lazy signal', () => {
    it('is never created when the function does not read it', async () => {
      const counter = countAbortControllers();
      try {
        const guard = pipeline(bulkhead({ limit: 2, queue: 5 }), pipeline(retry({ attempts: 2, backoff: { initialMs: 0 } }), timeout(1000)), fallback(0));
        for (let i = 0; i < 100; i++) await guard.execute(() => i);
        // Queued calls and retried calls too.
        await Promise.all(Array.from({ length: 7 }, (_, i) => guard.execute(async () => i)));
        let failures = 0;
        await guard.execute(() => {
          if (failures++ === 0) throw Object.assign(new Error('reset'), { code: 'ECONNRESET' });
          return 1;
        });
        expect(counter.count).to.equal(0);

        await guard.execute((ctx) => ctx.signal.aborted);
        expect(counter.count).to.equal(1);
      } finally {
        counter.restore();
      }
    });

    it('hands the guards a scope only when something can cancel the call', async () => {
      const scopes: unknown[] = [];
      const probe: Policy = pipeline(bulkhead({ limit: 1 }), retry({ attempts: 1 }));
      await probe.execute((ctx) => {
        scopes.push((ctx as Call).scope);
      });
      expect(scopes).to.deep.equal([undefined]);
      await pipeline(probe, timeout(1000)).execute((ctx) => {
        scopes.push((ctx as Call).scope);
      });
      expect(scopes[1]).to.not.equal(undefined);
    });
  });
});
