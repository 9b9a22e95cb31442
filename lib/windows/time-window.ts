import { FAILED, SLOW, type Outcome, type OutcomeWindow } from './types.js';

/**
 * The outcomes of the last `ms` milliseconds, kept in `buckets` buckets of `ms / buckets`
 * each. Buckets roll lazily when the window is touched: no timer, and a window left alone
 * for an hour costs one pass over its buckets when it is next used. The window covers the
 * current (partial) bucket and the `buckets - 1` before it.
 *
 * @example
 * const window = new TimeWindow(60_000, 10);
 * window.record(FAILED, performance.now());
 */
export class TimeWindow implements OutcomeWindow {
  calls = 0;
  failures = 0;
  slowCalls = 0;
  /** calls, failures, slow calls: three numbers per bucket, made on first use. */
  private counts: number[] | undefined;
  private head = 0;
  /** Number of the bucket at `head` on the time scale (`floor(now / width)`). */
  private headEpoch = -Infinity;
  private readonly width: number;

  constructor(
    readonly ms: number,
    readonly buckets: number,
  ) {
    this.width = ms / buckets;
  }

  // On the prototype, not in every instance.
  get needsTime(): boolean {
    return true;
  }

  record(outcome: Outcome, now: number): void {
    this.roll(now);
    const counts = (this.counts ??= Array.from({ length: this.buckets * 3 }, () => 0));
    const base = this.head * 3;
    const failed = outcome & FAILED;
    const slow = (outcome & SLOW) >>> 1;
    counts[base]!++;
    counts[base + 1]! += failed;
    counts[base + 2]! += slow;
    this.calls++;
    this.failures += failed;
    this.slowCalls += slow;
  }

  roll(now: number): void {
    const epoch = Math.floor(now / this.width);
    let steps = epoch - this.headEpoch;
    // A clock that went backwards (only an injected one can) leaves the window as it is.
    if (!(steps > 0)) return;
    this.headEpoch = epoch;
    const counts = this.counts;
    if (counts === undefined) return;
    if (steps >= this.buckets) {
      this.clear();
      return;
    }
    let head = this.head;
    while (steps-- > 0) {
      head = head + 1 === this.buckets ? 0 : head + 1;
      const base = head * 3;
      this.calls -= counts[base]!;
      this.failures -= counts[base + 1]!;
      this.slowCalls -= counts[base + 2]!;
      counts[base] = 0;
      counts[base + 1] = 0;
      counts[base + 2] = 0;
    }
    this.head = head;
  }

  clear(): void {
    this.calls = 0;
    this.failures = 0;
    this.slowCalls = 0;
    this.counts?.fill(0);
  }
}
