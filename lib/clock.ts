/**
 * Where guards read the time. Monotonic by default (`performance.now()`), so a jump of the
 * wall clock never opens, closes or stalls a breaker. Read through the global on every call
 * so that `sinon.useFakeTimers()` installed after import still takes effect.
 */
export interface Clock {
  /** Milliseconds on a monotonic scale; only differences are meaningful. */
  now(): number;
}

export const systemClock: Clock = {
  now: () => performance.now(),
};
