import { expect } from 'chai';
import fc from 'fast-check';
import sinon from 'sinon';
import { backoffCeiling, backoffFloor, backoffOptions, type Jitter } from '../lib/backoff.js';
import { retry } from '../lib/retry.js';

const config = fc.record({
  attempts: fc.integer({ min: 1, max: 7 }),
  initialMs: fc.integer({ min: 0, max: 2000 }),
  extraMaxMs: fc.integer({ min: 0, max: 20_000 }),
  multiplier: fc.double({ min: 1, max: 5, noNaN: true }),
  jitter: fc.constantFrom<Jitter>('full', 'equal', 'none'),
  randoms: fc.array(fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), { minLength: 8, maxLength: 8 }),
  succeedOn: fc.option(fc.integer({ min: 1, max: 8 }), { nil: undefined }),
});

describe('retry properties', () => {
  it('never exceeds `attempts`, and every wait lies within the jitter bounds: at least the floor, at most the ceiling, never above maxMs', async () => {
    await fc.assert(
      fc.asyncProperty(config, async (c) => {
        const clock = sinon.useFakeTimers();
        try {
          const maxMs = c.initialMs + c.extraMaxMs;
          const backoff = { initialMs: c.initialMs, maxMs, multiplier: c.multiplier, jitter: c.jitter };
          const randoms = [...c.randoms];
          const guard = retry({ attempts: c.attempts, backoff, random: () => randoms.shift() ?? 0 });
          const delays: number[] = [];
          guard.on('retry', (e) => delays.push(e.delayMs));
          const times: number[] = [];
          let settled = false;
          const result = guard
            .execute(({ attempt }) => {
              times.push(Date.now());
              if (attempt === c.succeedOn) return attempt;
              throw Object.assign(new Error('unavailable'), { status: 503 });
            })
            .then(
              (value) => ({ value }),
              (error: unknown) => ({ error }),
            )
            .finally(() => (settled = true));
          // Timer by timer, so that each try is logged at the moment its wait ended.
          for (let i = 0; i < 50 && !settled; i++) {
            await clock.tickAsync(0);
            if (!settled) await clock.nextAsync();
          }
          const outcome = await result;

          const expectedTries = c.succeedOn !== undefined && c.succeedOn <= c.attempts ? c.succeedOn : c.attempts;
          expect(times).to.have.length(expectedTries);
          expect(delays).to.have.length(expectedTries - 1);
          if (c.succeedOn !== undefined && c.succeedOn <= c.attempts) expect(outcome).to.deep.equal({ value: c.succeedOn });
          else expect(outcome).to.have.property('error');

          const filled = backoffOptions('retry', backoff);
          delays.forEach((delay, i) => {
            const retryNumber = i + 1;
            expect(delay).to.be.at.least(backoffFloor(filled, retryNumber));
            expect(delay).to.be.at.most(backoffCeiling(filled, retryNumber));
            expect(delay).to.be.at.most(maxMs);
            // The clock agrees: the next try came after that wait (timers count whole ms).
            const gap = times[i + 1]! - times[i]!;
            expect(gap).to.be.at.least(Math.floor(delay));
            expect(gap).to.be.at.most(Math.ceil(delay) + 1);
          });
          expect(guard.stats()).to.include({ calls: 1, retries: expectedTries - 1 });
          expect(clock.countTimers()).to.equal(0);
        } finally {
          clock.restore();
        }
      }),
      { numRuns: 200 },
    );
  });

  it('the ceiling grows geometrically and saturates at maxMs', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 5000 }), fc.integer({ min: 0, max: 100_000 }), fc.double({ min: 1, max: 10, noNaN: true }), fc.integer({ min: 1, max: 2000 }), (initialMs, extra, multiplier, n) => {
        const b = backoffOptions('retry', { initialMs, maxMs: initialMs + extra, multiplier, jitter: 'none' });
        const ceiling = backoffCeiling(b, n);
        expect(ceiling).to.be.at.least(initialMs);
        expect(ceiling).to.be.at.most(b.maxMs);
        expect(backoffCeiling(b, n + 1)).to.be.at.least(ceiling);
        expect(Number.isFinite(ceiling)).to.equal(true);
      }),
    );
  });
});
