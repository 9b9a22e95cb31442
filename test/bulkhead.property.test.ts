import { expect } from 'chai';
import fc from 'fast-check';
import sinon from 'sinon';
import { bulkhead } from '../lib/bulkhead.js';
import { BulkheadFullError, ClientDisconnectedError } from '../lib/errors.js';

type Action =
  | { kind: 'call'; withSignal: boolean; syncThrow: boolean }
  | { kind: 'resolve' | 'reject'; index: number }
  | { kind: 'abort'; index: number }
  | { kind: 'settleThenAbort'; index: number; victim: number; ticks: number; nextInLine: boolean }
  | { kind: 'tick'; ms: number };

interface Record {
  controller: AbortController | undefined;
  started: boolean;
  /** The function has settled (or threw synchronously): its place should be free. */
  fnDone: boolean;
  /** Aborted before its function started: it must never start. */
  abortedUnstarted: boolean;
  outcome: 'pending' | 'fulfilled' | 'rejected';
  error?: unknown;
  resolve: () => void;
  reject: (error: unknown) => void;
}

const action: fc.Arbitrary<Action> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('call' as const), withSignal: fc.nat(3).map((n) => n > 0), syncThrow: fc.nat(5).map((n) => n === 0) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constantFrom('resolve' as const, 'reject' as const), index: fc.nat(20) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('abort' as const), index: fc.nat(20) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('settleThenAbort' as const), index: fc.nat(20), victim: fc.nat(20), ticks: fc.nat(4), nextInLine: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('tick' as const), ms: fc.integer({ min: 0, max: 60 }) }) },
);

async function microticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await Promise.resolve();
}

describe('bulkhead properties', () => {
  it('never more than limit active nor queue queued; back to 0/0 after any mix of resolve, reject, throw, abort while queued and queue timeout', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 0, max: 5 }),
        fc.option(fc.integer({ min: 5, max: 80 }), { nil: undefined }),
        fc.array(action, { minLength: 5, maxLength: 60 }),
        async (limit, queue, queueTimeoutMs, actions) => {
          const clock = sinon.useFakeTimers();
          try {
            const guard = bulkhead({ limit, queue, queueTimeoutMs });
            const records: Record[] = [];

            const check = (): void => {
              const stats = guard.stats();
              expect(stats.active).to.be.within(0, limit);
              expect(stats.queued).to.be.within(0, queue);
              // Places are held exactly by the functions that run.
              expect(stats.active).to.equal(records.filter((r) => r.started && !r.fnDone).length);
              expect(stats.queued).to.equal(records.filter((r) => !r.started && r.outcome === 'pending').length);
              for (const r of records) if (r.abortedUnstarted) expect(r.started).to.equal(false);
            };
            const running = (): Record[] => records.filter((r) => r.started && !r.fnDone);
            const abortable = (): Record[] => records.filter((r) => r.controller !== undefined && r.outcome === 'pending' && !r.controller.signal.aborted);
            const abort = (r: Record): void => {
              if (!r.started) r.abortedUnstarted = true;
              r.controller!.abort(new ClientDisconnectedError());
            };

            for (const a of actions) {
              switch (a.kind) {
                case 'call': {
                  let resolve!: () => void;
                  let reject!: (error: unknown) => void;
                  const gate = new Promise<void>((res, rej) => {
                    resolve = res;
                    reject = rej;
                  });
                  const record: Record = {
                    controller: a.withSignal ? new AbortController() : undefined,
                    started: false,
                    fnDone: false,
                    abortedUnstarted: false,
                    outcome: 'pending',
                    resolve: () => {
                      record.fnDone = true;
                      resolve();
                    },
                    reject: (error) => {
                      record.fnDone = true;
                      reject(error);
                    },
                  };
                  records.push(record);
                  guard
                    .execute(() => {
                      record.started = true;
                      if (a.syncThrow) {
                        record.fnDone = true;
                        throw new Error('sync');
                      }
                      return gate;
                    }, record.controller?.signal)
                    .then(
                      () => (record.outcome = 'fulfilled'),
                      (error: unknown) => {
                        record.outcome = 'rejected';
                        record.error = error;
                      },
                    );
                  break;
                }
                case 'resolve':
                case 'reject': {
                  const list = running();
                  if (list.length === 0) break;
                  const r = list[a.index % list.length]!;
                  if (a.kind === 'resolve') r.resolve();
                  else r.reject(new Error('failed'));
                  break;
                }
                case 'abort': {
                  const list = abortable();
                  if (list.length > 0) abort(list[a.index % list.length]!);
                  break;
                }
                case 'settleThenAbort': {
                  // Aborts a waiter a few microtasks after a place frees: sometimes while it
                  // is queued, sometimes between the grant and its start.
                  const list = running();
                  if (list.length > 0) list[a.index % list.length]!.resolve();
                  await microticks(a.ticks);
                  const victims = a.nextInLine ? abortable().filter((r) => !r.started).slice(0, 1) : abortable();
                  if (victims.length > 0) abort(victims[a.victim % victims.length]!);
                  break;
                }
                case 'tick':
                  await clock.tickAsync(a.ms);
                  break;
              }
              await clock.tickAsync(0);
              check();
            }

            // Drain: finish what runs, let waiters in or time out, until everything settled.
            for (let round = 0; round < 100 && records.some((r) => r.outcome === 'pending'); round++) {
              for (const r of running()) r.resolve();
              await clock.tickAsync(queueTimeoutMs ?? 1);
              check();
            }
            expect(records.every((r) => r.outcome !== 'pending')).to.equal(true);
            const stats = guard.stats();
            expect(stats).to.include({ active: 0, queued: 0 });
            expect(stats.admitted).to.equal(records.filter((r) => r.started).length);
            expect(stats.rejected).to.equal(records.filter((r) => r.error instanceof BulkheadFullError).length);
            // An idle queue's timer lapses at its next tick (at most 25 ms).
            await clock.tickAsync(25);
            expect(clock.countTimers()).to.equal(0);
          } finally {
            clock.restore();
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});
