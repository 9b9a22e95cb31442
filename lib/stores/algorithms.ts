import type { RateLimitDecision } from './types.js';

// The two rate-limit algorithms as pure functions over a small state record. The memory
// store runs them as they are; the Redis store's Lua scripts are line-for-line ports, so
// a limit means the same thing whichever store holds it.

// Refills and weights are sums and products of fractions: without a tolerance, a caller who
// waited exactly `retryAfterMs` can find 0.9999999999999999 tokens and be refused again.
// A billionth of a call is far below anything a limit can mean.
const EPSILON = 1e-9;

/**
 * Sliding window counter: the previous fixed window's count, weighted by how much of it
 * still overlaps the sliding window, plus the current window's count (the scheme Cloudflare
 * and Upstash use). Smooth at window edges, two numbers per key.
 */
export interface SlidingWindowState {
  /** Start of the current fixed window (a multiple of `windowMs`). */
  start: number;
  previous: number;
  current: number;
}

export function slidingWindowConsume(state: SlidingWindowState, now: number, limit: number, windowMs: number): RateLimitDecision {
  // A clock that steps back (a wall clock, another instance's) must not reset a spent
  // window: an earlier time counts as the start of the current window.
  if (now < state.start) now = state.start;
  const windowStart = Math.floor(now / windowMs) * windowMs;
  if (windowStart !== state.start) {
    state.previous = windowStart - state.start === windowMs ? state.current : 0;
    state.current = 0;
    state.start = windowStart;
  }
  const elapsed = now - windowStart;
  const left = windowMs - elapsed;
  const estimate = (state.previous * left) / windowMs + state.current;
  if (estimate + 1 <= limit + EPSILON) {
    state.current += 1;
    return {
      allowed: true,
      limit,
      remaining: Math.max(0, Math.floor(limit - estimate - 1)),
      resetMs: Math.ceil(left + windowMs),
      retryAfterMs: 0,
    };
  }
  return {
    allowed: false,
    limit,
    remaining: 0,
    resetMs: Math.ceil(state.current > 0 ? left + windowMs : left),
    retryAfterMs: Math.max(1, Math.ceil(slidingWindowWait(state, elapsed, limit, windowMs))),
  };
}

/** Milliseconds until one more call fits, if nobody else is admitted meanwhile. */
function slidingWindowWait(state: SlidingWindowState, elapsed: number, limit: number, windowMs: number): number {
  const left = windowMs - elapsed;
  const room = limit - 1 - state.current;
  // Within this window, only the previous window's weight decays.
  if (room >= 0 && state.previous > 0) {
    const wait = left - (windowMs * room) / state.previous;
    if (wait <= left) return Math.max(0, wait);
  }
  // Next window: this window's count becomes the decaying one.
  if (state.current <= limit - 1) return left;
  return left + windowMs - (windowMs * (limit - 1)) / state.current;
}

/** Whether a sliding-window key holds nothing that affects a future decision. */
export function slidingWindowIdle(state: SlidingWindowState, now: number, windowMs: number): boolean {
  return now >= state.start + 2 * windowMs;
}

/**
 * Token bucket: holds up to `limit` tokens and refills `limit` per `windowMs`, continuously.
 * Allows a burst of `limit`, then a steady `limit / windowMs`.
 */
export interface TokenBucketState {
  tokens: number;
  /** When `tokens` was last brought up to date. */
  at: number;
}

export function tokenBucketConsume(state: TokenBucketState, now: number, limit: number, windowMs: number): RateLimitDecision {
  // A clock that steps back must not move `at` back: the same span would refill twice.
  if (now > state.at) {
    state.tokens = Math.min(limit, state.tokens + ((now - state.at) * limit) / windowMs);
    state.at = now;
  }
  if (state.tokens >= 1 - EPSILON) {
    state.tokens = Math.max(0, state.tokens - 1);
    return {
      allowed: true,
      limit,
      remaining: Math.floor(state.tokens),
      resetMs: Math.ceil(((limit - state.tokens) * windowMs) / limit),
      retryAfterMs: 0,
    };
  }
  return {
    allowed: false,
    limit,
    remaining: 0,
    resetMs: Math.ceil(((limit - state.tokens) * windowMs) / limit),
    retryAfterMs: Math.max(1, Math.ceil(((1 - state.tokens) * windowMs) / limit)),
  };
}

export function tokenBucketIdle(state: TokenBucketState, now: number, limit: number, windowMs: number): boolean {
  return state.tokens + ((now - state.at) * limit) / windowMs >= limit;
}
