import { expect } from 'chai';
import fc from 'fast-check';
import { circuitBreaker, type CircuitBreaker, type CircuitBreakerOptions } from '../lib/circuit-breaker.js';
import { ClientDisconnectedError, TimeoutError } from '../lib/errors.js';

// Every move the breaker may make, written out independently of its own table.
const LEGAL = new Set([
  'closed>open:failure-rate',
  'closed>open:consecutive-failures',
  'closed>open:slow-call-rate',
  'closed>open:peer',
  'closed>open:forced',
  'closed>closed:forced',
  'closed>closed:reset',
  'open>half-open:open-elapsed',
  'open>open:forced',
  'open>closed:peer',
  'open>closed:forced',
  'open>closed:reset',
  'half-open>closed:probes-succeeded',
  'half-open>closed:peer',
  'half-open>closed:forced',
  'half-open>closed:reset',
  'half-open>open:probe-failed',
  'half-open>open:probe-timeout',
  'half-open>open:peer',
  'half-open>open:forced',
]);

/**
 * Checks every stateChange against LEGAL and against the one before it. Problems are
 * collected, not thrown: the breaker (rightly) keeps a throwing listener from the call.
 */
function watchTransitions(breaker: CircuitBreaker): { problems: string[]; state: () => string } {
  const problems: string[] = [];
  let state = 'closed';
  breaker.on('stateChange', ({ from, to, reason }) => {
    const move = `${from}>${to}:${reason}`;
    if (!LEGAL.has(move)) problems.push(`illegal move ${move}`);
    if (from !== state) problems.push(`move ${move} does not start where the last one ended (${state})`);
    state = to;
  });
  return { problems, state: () => state };
}

class Excluded extends Error {}

type Kind = 'success' | 'failure' | 'slow' | 'slow-failure' | 'excluded';
type Op = { op: 'call'; kind: Kind } | { op: 'tick'; ms: number } | { op: 'forceOpen' } | { op: 'forceClosed' } | { op: 'reset' };

const configs = fc.record({
  window: fc.oneof(
    fc.record({ kind: fc.constant('count' as const), size: fc.integer({ min: 1, max: 8 }) }),
    fc.record({ kind: fc.constant('time' as const), ms: fc.integer({ min: 100, max: 1000 }), buckets: fc.integer({ min: 1, max: 5 }) }),
  ),
  minimumCalls: fc.integer({ min: 1, max: 6 }),
  failureRateThreshold: fc.integer({ min: 1, max: 100 }),
  consecutiveFailures: fc.option(fc.integer({ min: 1, max: 4 }), { nil: undefined }),
  slow: fc.option(fc.record({ slowCallMs: fc.integer({ min: 10, max: 50 }), slowCallRateThreshold: fc.integer({ min: 1, max: 100 }) }), { nil: undefined }),
  openMs: fc.integer({ min: 10, max: 200 }),
  halfOpenProbes: fc.integer({ min: 1, max: 3 }),
  // Longer than any call in this property: probe time-outs are the second property's business.
  halfOpenMaxMs: fc.integer({ min: 60, max: 200 }),
});

const ops = fc.array(
  fc.oneof(
    { weight: 12, arbitrary: fc.record({ op: fc.constant('call' as const), kind: fc.constantFrom<Kind>('success', 'failure', 'slow', 'slow-failure', 'excluded') }) },
    { weight: 4, arbitrary: fc.record({ op: fc.constant('tick' as const), ms: fc.integer({ min: 0, max: 300 }) }) },
    { weight: 1, arbitrary: fc.constantFrom<Op>({ op: 'forceOpen' }, { op: 'forceClosed' }, { op: 'reset' }) },
  ),
  { maxLength: 80 },
);

describe('circuitBreaker properties', () => {
  it('takes only legal moves, and its window and verdicts match a naive model', async () => {
    await fc.assert(
      fc.asyncProperty(configs, ops, async (config, script) => {
        let now = 0;
        const options: CircuitBreakerOptions = {
          window: config.window,
          minimumCalls: config.minimumCalls,
          failureRateThreshold: config.failureRateThreshold,
          consecutiveFailures: config.consecutiveFailures,
          openMs: config.openMs,
          halfOpenProbes: config.halfOpenProbes,
          halfOpenMaxMs: config.halfOpenMaxMs,
          exclude: [Excluded],
          clock: { now: () => now },
          ...(config.slow ?? {}),
        };
        const breaker = circuitBreaker(options);
        const moves = watchTransitions(breaker);
        const slowMs = config.slow?.slowCallMs;
        const minimumCalls = config.window.kind === 'count' ? Math.min(config.minimumCalls, config.window.size) : config.minimumCalls;

        // The model: outcomes recorded since the breaker last (re)entered closed.
        let recorded: Array<{ at: number; failed: boolean; slow: boolean }> = [];
        let run = 0;
        let forced: 'open' | 'closed' | undefined;
        let probeSuccesses = 0;
        breaker.on('stateChange', ({ from, to, reason }) => {
          if (to === 'closed' && (from !== 'closed' || reason === 'reset')) {
            recorded = [];
            run = 0;
          }
          if (to === 'half-open') probeSuccesses = 0;
        });
        const inWindow = (): typeof recorded => {
          if (config.window.kind === 'count') return recorded.slice(-config.window.size);
          const width = config.window.ms / config.window.buckets;
          const current = Math.floor(now / width);
          const buckets = config.window.buckets;
          return recorded.filter((entry) => Math.floor(entry.at / width) > current - buckets);
        };

        for (const step of script) {
          if (step.op === 'tick') {
            now += step.ms;
          } else if (step.op === 'forceOpen') {
            breaker.forceOpen();
            forced = 'open';
          } else if (step.op === 'forceClosed') {
            breaker.forceClosed();
            forced = 'closed';
          } else if (step.op === 'reset') {
            breaker.reset();
            forced = undefined;
            recorded = [];
            run = 0;
          } else {
            const before = breaker.state;
            const slow = step.kind === 'slow' || step.kind === 'slow-failure';
            const failed = step.kind === 'failure' || step.kind === 'slow-failure';
            const took = slow ? (slowMs ?? 5) : 0;
            let ran = false;
            try {
              await breaker.execute(() => {
                ran = true;
                now += took;
                if (step.kind === 'excluded') return Promise.reject(new Excluded());
                return failed ? Promise.reject(new Error('down')) : Promise.resolve('ok');
              });
            } catch {
              // outcomes are checked through the breaker's state and stats
            }
            expect(ran).to.equal(before !== 'open');
            const isSlow = slowMs !== undefined && took >= slowMs;
            if (before === 'closed' && step.kind !== 'excluded') {
              recorded.push({ at: now, failed, slow: isSlow });
              run = failed ? run + 1 : 0;
              if (forced !== 'closed') {
                const window = inWindow();
                const calls = window.length;
                const failures = window.filter((entry) => entry.failed).length;
                const slowCalls = window.filter((entry) => entry.slow).length;
                const trips =
                  (failed && config.consecutiveFailures !== undefined && run >= config.consecutiveFailures) ||
                  (calls >= minimumCalls && (failures * 100 >= config.failureRateThreshold * calls || (config.slow !== undefined && slowCalls * 100 >= config.slow.slowCallRateThreshold * calls)));
                expect(breaker.state).to.equal(trips ? 'open' : 'closed');
              }
            } else if (before === 'half-open') {
              if (step.kind === 'excluded') expect(breaker.state).to.equal('half-open');
              else if (failed || isSlow) expect(breaker.state).to.equal('open');
              else expect(breaker.state).to.equal(++probeSuccesses >= config.halfOpenProbes ? 'closed' : 'half-open');
            }
          }
          expect(moves.problems).to.deep.equal([]);
          const window = inWindow();
          const stats = breaker.stats();
          expect({ calls: stats.calls, failures: stats.failures, slowCalls: stats.slowCalls }).to.deep.equal({
            calls: window.length,
            failures: window.filter((entry) => entry.failed).length,
            slowCalls: window.filter((entry) => entry.slow).length,
          });
          expect(stats.state).to.equal(moves.state());
          expect(stats.forced).to.equal(forced !== undefined && stats.state === forced);
          if (stats.state === 'open' && !stats.forced) expect(stats.remainingOpenMs).to.be.within(0, config.openMs);
        }
      }),
      { numRuns: 150 },
    );
  });

  it('never lets more than halfOpenProbes probes hold a place at once', async () => {
    type Action =
      | { op: 'start'; withSignal: boolean }
      | { op: 'settle'; index: number; how: 'success' | 'failure' | 'excluded' | 'client-gone' | 'timeout' }
      | { op: 'tick'; ms: number };
    const actions: fc.Arbitrary<Action[]> = fc.array(
      fc.oneof(
        { weight: 5, arbitrary: fc.record({ op: fc.constant('start' as const), withSignal: fc.boolean() }) },
        {
          weight: 5,
          arbitrary: fc.record({
            op: fc.constant('settle' as const),
            index: fc.nat(),
            how: fc.constantFrom('success' as const, 'failure' as const, 'excluded' as const, 'client-gone' as const, 'timeout' as const),
          }),
        },
        { weight: 3, arbitrary: fc.record({ op: fc.constant('tick' as const), ms: fc.integer({ min: 0, max: 150 }) }) },
      ),
      { maxLength: 60 },
    );

    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 20, max: 300 }), actions, async (halfOpenProbes, halfOpenMaxMs, script) => {
        let now = 0;
        const breaker = circuitBreaker({ consecutiveFailures: 1, openMs: 100, halfOpenProbes, halfOpenMaxMs, exclude: [Excluded], clock: { now: () => now } });
        const moves = watchTransitions(breaker);
        let episode = 0;
        let held = 0; // places taken in the current half-open period
        let mostHeld = 0;
        breaker.on('stateChange', ({ to }) => {
          if (to === 'half-open') {
            episode++;
            held = 0;
          }
        });
        interface Pending {
          episode: number | undefined;
          resolve(value: string): void;
          reject(error: unknown): void;
          controller: AbortController | undefined;
          done: boolean;
        }
        const pending: Pending[] = [];
        const flush = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
        /** A probe's outcome is known: a failure or success keeps its place, a freed one gives it back. */
        const release = (call: Pending, frees: boolean): void => {
          if (call.done) return;
          call.done = true;
          if (frees && call.episode === episode && moves.state() === 'half-open') held--;
        };

        for (const action of script) {
          if (action.op === 'tick') {
            now += action.ms;
          } else if (action.op === 'start') {
            const controller = action.withSignal ? new AbortController() : undefined;
            const call: Pending = { episode: undefined, resolve: () => undefined, reject: () => undefined, controller, done: false };
            const promise = breaker.execute(() => {
              if (moves.state() === 'half-open') {
                call.episode = episode;
                mostHeld = Math.max(mostHeld, ++held);
              }
              return new Promise<string>((resolve, reject) => {
                call.resolve = resolve;
                call.reject = reject;
              });
            }, controller?.signal);
            promise.catch(() => undefined);
            pending.push(call);
          } else if (pending.length > 0) {
            const call = pending[action.index % pending.length]!;
            if (action.how === 'success') {
              call.resolve('ok');
              release(call, false);
            } else if (action.how === 'failure') {
              call.reject(new Error('down'));
              release(call, false);
            } else if (action.how === 'excluded') {
              call.reject(new Excluded());
              release(call, true);
            } else if (call.controller !== undefined) {
              call.controller.abort(action.how === 'timeout' ? new TimeoutError(1) : new ClientDisconnectedError());
              release(call, action.how === 'client-gone');
            }
          }
          await flush();
          expect(moves.problems).to.deep.equal([]);
          expect(mostHeld).to.be.at.most(halfOpenProbes);
          const stats = breaker.stats();
          expect(stats.state).to.equal(moves.state());
          if (stats.probes !== undefined) expect(stats.probes.inFlight + stats.probes.succeeded).to.be.at.most(halfOpenProbes);
        }
      }),
      { numRuns: 150 },
    );
  });
});
