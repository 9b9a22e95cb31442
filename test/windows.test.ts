import { expect } from 'chai';
import fc from 'fast-check';
import { CountWindow } from '../lib/windows/count-window.js';
import { TimeWindow } from '../lib/windows/time-window.js';
import { FAILED, SLOW, type Outcome } from '../lib/windows/types.js';

const outcome = fc.constantFrom<Outcome>(0, FAILED, SLOW, (FAILED | SLOW) as Outcome);

function tally(outcomes: readonly Outcome[]): { calls: number; failures: number; slowCalls: number } {
  return {
    calls: outcomes.length,
    failures: outcomes.filter((o) => (o & FAILED) !== 0).length,
    slowCalls: outcomes.filter((o) => (o & SLOW) !== 0).length,
  };
}

function figures(window: { calls: number; failures: number; slowCalls: number }): { calls: number; failures: number; slowCalls: number } {
  return { calls: window.calls, failures: window.failures, slowCalls: window.slowCalls };
}

describe('CountWindow', () => {
  it('counts calls, failures and slow calls', () => {
    const window = new CountWindow(10);
    window.record(0, 0);
    window.record(FAILED, 0);
    window.record(SLOW, 0);
    window.record((FAILED | SLOW) as Outcome, 0);
    expect(figures(window)).to.deep.equal({ calls: 4, failures: 2, slowCalls: 2 });
    expect(window.needsTime).to.equal(false);
  });

  it('keeps only the last `size` outcomes', () => {
    const window = new CountWindow(3);
    window.record(FAILED, 0);
    window.record(FAILED, 0);
    window.record(0, 0);
    expect(figures(window)).to.deep.equal({ calls: 3, failures: 2, slowCalls: 0 });
    window.record(0, 0); // evicts the first failure
    expect(figures(window)).to.deep.equal({ calls: 3, failures: 1, slowCalls: 0 });
    window.record(SLOW, 0);
    window.record(SLOW, 0);
    expect(figures(window)).to.deep.equal({ calls: 3, failures: 0, slowCalls: 2 });
  });

  it('starts empty again after clear()', () => {
    const window = new CountWindow(4);
    for (let i = 0; i < 6; i++) window.record(FAILED, 0);
    window.clear();
    expect(figures(window)).to.deep.equal({ calls: 0, failures: 0, slowCalls: 0 });
    // Stale bits from before clear() must not be evicted as if they were outcomes.
    for (let i = 0; i < 6; i++) window.record(0, 0);
    expect(figures(window)).to.deep.equal({ calls: 4, failures: 0, slowCalls: 0 });
  });

  it('matches the last `size` entries of a plain array, for any size and sequence', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 70 }), fc.array(outcome, { maxLength: 300 }), fc.integer({ min: -1, max: 300 }), (size, outcomes, clearAt) => {
        const window = new CountWindow(size);
        let model: Outcome[] = [];
        outcomes.forEach((o, index) => {
          if (index === clearAt) {
            window.clear();
            model = [];
          }
          window.record(o, 0);
          model.push(o);
          expect(figures(window)).to.deep.equal(tally(model.slice(-size)));
        });
      }),
    );
  });
});

describe('TimeWindow', () => {
  it('forgets outcomes bucket by bucket as time passes', () => {
    const window = new TimeWindow(1000, 10); // 100 ms buckets
    window.record(FAILED, 0);
    window.record(0, 50);
    window.record(FAILED, 150);
    expect(figures(window)).to.deep.equal({ calls: 3, failures: 2, slowCalls: 0 });
    window.roll(999);
    expect(window.calls).to.equal(3);
    window.roll(1000); // the bucket [0, 100) leaves the window
    expect(figures(window)).to.deep.equal({ calls: 1, failures: 1, slowCalls: 0 });
    window.roll(1100);
    expect(figures(window)).to.deep.equal({ calls: 0, failures: 0, slowCalls: 0 });
    expect(window.needsTime).to.equal(true);
  });

  it('clears everything after a long idle period', () => {
    const window = new TimeWindow(60_000, 10);
    for (let t = 0; t < 60_000; t += 1000) window.record(SLOW, t);
    expect(window.slowCalls).to.equal(60);
    window.record(FAILED, 3_600_000);
    expect(figures(window)).to.deep.equal({ calls: 1, failures: 1, slowCalls: 0 });
  });

  it('ignores a clock that goes backwards', () => {
    const window = new TimeWindow(1000, 10);
    window.record(FAILED, 500);
    window.roll(100);
    window.record(0, 100);
    expect(figures(window)).to.deep.equal({ calls: 2, failures: 1, slowCalls: 0 });
  });

  it('starts empty again after clear()', () => {
    const window = new TimeWindow(1000, 4);
    window.record(FAILED, 0);
    window.record(FAILED, 300);
    window.clear();
    expect(figures(window)).to.deep.equal({ calls: 0, failures: 0, slowCalls: 0 });
    window.record(0, 400);
    window.roll(1100); // would have evicted the cleared bucket at 0-250 and 250-500
    expect(figures(window)).to.deep.equal({ calls: 1, failures: 0, slowCalls: 0 });
  });

  it('matches a list of timestamped outcomes, for any buckets and clock steps', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 5000 }),
        fc.integer({ min: 1, max: 12 }),
        fc.array(fc.tuple(fc.integer({ min: 0, max: 3000 }), outcome), { maxLength: 120 }),
        (ms, buckets, steps) => {
          fc.pre(buckets <= ms);
          const width = ms / buckets;
          const window = new TimeWindow(ms, buckets);
          const model: Array<{ bucket: number; outcome: Outcome }> = [];
          let now = 0;
          for (const [advance, o] of steps) {
            now += advance;
            window.record(o, now);
            model.push({ bucket: Math.floor(now / width), outcome: o });
            const current = Math.floor(now / width);
            const live = model.filter((entry) => entry.bucket > current - buckets).map((entry) => entry.outcome);
            expect(figures(window)).to.deep.equal(tally(live));
          }
        },
      ),
    );
  });
});
