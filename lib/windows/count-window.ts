import { FAILED, type Outcome, type OutcomeWindow } from './types.js';

// Fifteen 2-bit outcomes per element keeps every element within 30 bits, a small integer
// (Smi) on every V8 build, so the array stays a packed array of integers: a window of
// 100 calls is 7 numbers, not 100 objects.
const PER_WORD = 15;

/**
 * The last `size` outcomes as a ring of packed bits, with running totals.
 *
 * @example
 * const window = new CountWindow(100);
 * window.record(FAILED, 0);
 * window.failures; // 1
 */
export class CountWindow implements OutcomeWindow {
  calls = 0;
  failures = 0;
  slowCalls = 0;
  private words: number[] | undefined;
  /** Ring position the next outcome is written to. */
  private next = 0;

  constructor(readonly size: number) {}

  // On the prototype, not in every instance.
  get needsTime(): boolean {
    return false;
  }

  record(outcome: Outcome, _now: number): void {
    // Allocated on first use: a breaker that never sees a call costs no array.
    const words = (this.words ??= Array.from({ length: Math.ceil(this.size / PER_WORD) }, () => 0));
    const position = this.next;
    const index = (position / PER_WORD) | 0;
    const shift = (position - index * PER_WORD) << 1;
    const word = words[index]!;
    const held = (word >>> shift) & 3;
    if (this.calls === this.size) {
      this.failures -= held & FAILED;
      this.slowCalls -= held >>> 1;
    } else {
      this.calls++;
    }
    // Most outcomes are successes written over successes: the slot then stays as it is.
    if (held !== outcome) words[index] = (word & ~(3 << shift)) | (outcome << shift);
    this.next = position + 1 === this.size ? 0 : position + 1;
    if (outcome !== 0) {
      this.failures += outcome & FAILED;
      this.slowCalls += outcome >>> 1;
    }
  }

  roll(_now: number): void {}

  clear(): void {
    this.calls = 0;
    this.failures = 0;
    this.slowCalls = 0;
    this.next = 0;
    // Stale bits are harmless: a slot is only read once the ring is full, after rewriting.
  }
}
