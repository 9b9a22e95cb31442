/**
 * The outcome of one call as a window stores it: two bits, so that a count window can pack
 * fifteen of them into one small integer.
 * @example window.record((FAILED | SLOW) as Outcome, now); // a slow failure
 */
export type Outcome = 0 | 1 | 2 | 3;

/**
 * Bit set in an {@link Outcome} when the call failed.
 * @example window.record(FAILED, now);
 */
export const FAILED = 1;
/**
 * Bit set in an {@link Outcome} when the call took at least `slowCallMs`.
 * @example window.record(SLOW, now); // slow, but a success
 */
export const SLOW = 2;

/**
 * How a breaker measures recent calls: the last N of them, or those of the last N ms.
 * @example circuitBreaker({ window: { kind: 'time', ms: 10_000, buckets: 10 } });
 */
export type WindowOptions = { kind: 'count'; size?: number } | { kind: 'time'; ms?: number; buckets?: number };

/**
 * Recent outcomes with their totals kept in O(1). Memory is fixed at construction and does
 * not grow with traffic.
 * @example
 * window.record(FAILED, now);
 * const rate = window.calls === 0 ? 0 : window.failures / window.calls;
 */
export interface OutcomeWindow {
  /** Whether `record` and `roll` need the time; a count window is timeless. */
  readonly needsTime: boolean;
  /** Calls in the window (every outcome recorded, failed or not). */
  readonly calls: number;
  readonly failures: number;
  readonly slowCalls: number;
  record(outcome: Outcome, now: number): void;
  /** Drops what has left the window by `now` (time windows only). */
  roll(now: number): void;
  clear(): void;
}
