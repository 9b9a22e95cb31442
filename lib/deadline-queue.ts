import type { Clock } from './clock.js';

/** The two fields the queue keeps on each entry; it sets both. */
export interface DeadlineEntry {
  /** Clock time (`clock.now()`) at which the entry expires; NaN until the queue stamps it, 0 when the queue has no timeout. */
  deadline: number;
  /** True while the entry is in the queue. */
  queued: boolean;
}

/**
 * A FIFO of entries that all wait the same `ms`, with one timer for the whole queue.
 *
 * Because every entry gets `now + ms`, deadlines come in the order entries arrive, so
 * only the head ever needs a timer: a timeout policy keeps one `setTimeout` however many
 * calls it times, instead of one per call (~140 ns to arm and clear each). Entries that
 * leave early are only marked (lazy deletion); the array is compacted once more than half
 * of it is dead, so memory follows the entries in the queue, not throughput × `ms`.
 *
 * The timer is `unref()`ed. When the queue empties, the timer is left to lapse: it fires
 * once more (at most one tick later), finds nothing, and is not armed again. Clearing it
 * instead would make a caller that runs one call at a time arm and clear a timer on every
 * call; scheduling that clear for the next turn (a `setImmediate`, as before) added an
 * immediate and a timer to every request of a guarded HTTP route.
 *
 * With `ms` undefined it is a plain FIFO with O(1) removal (a bulkhead without
 * `queueTimeoutMs`), and never creates a timer.
 *
 * @example
 * const queue = new DeadlineQueue<Waiter>(5000, systemClock, (waiter) => waiter.expire());
 * queue.push(waiter);           // expires in 5 s unless …
 * queue.delete(waiter);         // … it leaves first
 */
export class DeadlineQueue<E extends DeadlineEntry> {
  // Slots [first, end) hold the queue, dead entries included until they are swept. The
  // array is never truncated on the hot path: `length = 0` would free its backing store
  // and the next push would allocate it again.
  private entries: Array<E | undefined> = [];
  private first = 0;
  private end = 0;
  private live = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;

  /**
   * @param ms how long each entry may wait; undefined for no expiry
   * @param expire called with each entry whose deadline passed, after it left the queue
   */
  /** How often a busy queue stamps the entries that arrived since its last tick. */
  private readonly tickMs: number;

  constructor(
    private readonly ms: number | undefined,
    private readonly clock: Clock,
    private readonly expire: (entry: E) => void,
  ) {
    this.tickMs = ms === undefined ? 0 : Math.max(1, Math.min(ms / 16, 25));
  }

  /** Entries in the queue. */
  get size(): number {
    return this.live;
  }

  /** Whether the queue holds a timer right now (for tests and diagnostics). */
  get hasTimer(): boolean {
    return this.timer !== undefined;
  }

  /**
   * Appends `entry`. Its deadline is at least `ms` after this call and at most `ms` plus
   * one tick (`ms / 16`, between 1 and 25 ms) after it: reading the clock costs ~60 ns on
   * Node 20, more than the rest of a timeout, so while the queue is busy an entry is only
   * marked here and stamped `now + ms` on the queue's next tick (never early, since the
   * tick comes after the push). An idle queue, or `precise`, stamps at once.
   */
  push(entry: E, precise = false): void {
    entry.queued = true;
    const end = this.end++;
    if (end < this.entries.length) this.entries[end] = entry;
    else this.entries.push(entry);
    this.live++;
    // A timer exists only when `ms` does.
    if (this.timer !== undefined && !precise) entry.deadline = NaN;
    else this.stamp(entry);
  }

  // Apart from push() so that push stays small enough for V8 to inline into its callers.
  private stamp(entry: E): void {
    const ms = this.ms;
    if (ms === undefined) return;
    entry.deadline = this.clock.now() + ms;
    if (this.timer === undefined) this.arm(Math.min(ms, this.tickMs));
  }

  /** Takes `entry` out; false when it was not in the queue (it expired or left already). */
  delete(entry: E): boolean {
    if (!entry.queued) return false;
    entry.queued = false;
    this.left();
    return true;
  }

  /** Removes and returns the oldest entry, or undefined when the queue is empty. */
  shift(): E | undefined {
    const entries = this.entries;
    while (this.first < this.end) {
      const entry = entries[this.first];
      entries[this.first++] = undefined;
      if (entry !== undefined && entry.queued) {
        entry.queued = false;
        this.left();
        return entry;
      }
    }
    return undefined;
  }

  private left(): void {
    const live = --this.live;
    if (live === 0) this.idle();
    else if (this.end > 2 * live + 8) this.compact();
  }

  private compact(): void {
    const entries = this.entries;
    const end = this.end;
    let to = 0;
    for (let from = this.first; from < end; from++) {
      const entry = entries[from];
      if (entry !== undefined && entry.queued) entries[to++] = entry;
    }
    entries.fill(undefined, to, end);
    this.first = 0;
    this.end = to;
    // Give back what a burst made the array grow to.
    if (entries.length > 64 && entries.length > 4 * to) entries.length = 2 * to;
  }

  private idle(): void {
    const entries = this.entries;
    for (let i = this.first; i < this.end; i++) entries[i] = undefined;
    this.first = 0;
    this.end = 0;
    if (entries.length > 64) this.entries = [];
  }

  private arm(delayMs: number): void {
    // Node timers take whole milliseconds; rounding down would fire before the deadline.
    const timer = setTimeout(this.fire, Math.max(1, Math.ceil(delayMs)));
    timer.unref?.();
    this.timer = timer;
  }

  private readonly fire = (): void => {
    this.timer = undefined;
    if (this.live === 0) return;
    const now = this.clock.now();
    const entries = this.entries;
    // Entries pushed since the last tick are the unstamped tail of the queue.
    for (let i = this.end - 1; i >= this.first; i--) {
      const entry = entries[i];
      if (entry === undefined) continue;
      if (entry.deadline === entry.deadline) break;
      entry.deadline = now + this.ms!;
    }
    let expired: E[] | undefined;
    while (this.first < this.end) {
      const entry = entries[this.first];
      if (entry !== undefined && entry.queued) {
        if (entry.deadline > now) break;
        entry.queued = false;
        this.live--;
        (expired ??= []).push(entry);
      }
      entries[this.first++] = undefined;
    }
    if (this.live === 0) {
      this.first = 0;
      this.end = 0;
    } else {
      // The timer may fire a little early (libuv's loop time lags performance.now()).
      // While entries remain, it also ticks to stamp the ones that arrive meanwhile.
      this.arm(Math.min(entries[this.first]!.deadline - now, this.tickMs));
    }
    // Expiry callbacks run user code (abort handlers) that may push or delete entries:
    // the queue is consistent before the first one runs.
    if (expired !== undefined) {
      for (const entry of expired) {
        try {
          this.expire(entry);
        } catch (error) {
          // Every expired entry must still be expired; the error is not ours to swallow.
          queueMicrotask(() => {
            throw error;
          });
        }
      }
    }
  };
}
