/**
 * The contracts between guards and the places that keep their state. The in-memory store
 * (the default) and the Redis store (`bulwark/redis`) implement them alike.
 */

export type RateLimitAlgorithm = 'sliding-window' | 'token-bucket';

/** The settings of one limiter, as the store needs them to decide. */
export interface RateLimitRule {
  /** The limiter's name: the identity of its shared state. */
  name: string;
  limit: number;
  windowMs: number;
  algorithm: RateLimitAlgorithm;
}

export interface RateLimitDecision {
  allowed: boolean;
  limit: number;
  remaining: number;
  /** Milliseconds until the budget is whole again. */
  resetMs: number;
  /** When refused: milliseconds until one more call would be admitted. */
  retryAfterMs: number;
}

/**
 * Keeps per-key budgets. `consume` takes one unit from `key` and says whether the call is
 * admitted; it must be atomic per key. It may answer synchronously (memory) or with a
 * promise (network stores), and must never reject: a failing store answers from local
 * state instead.
 */
export interface RateLimitStore {
  consume(rule: RateLimitRule, key: string): RateLimitDecision | Promise<RateLimitDecision>;
  /** Keys the store holds for this limiter (what `stats().keys` reports). */
  size(rule: RateLimitRule): number;
}

export type SharedBreakerState = 'closed' | 'open' | 'half-open';

/** What a breaker learns from other instances through its store. */
export interface BreakerPeerHandler {
  /** Another instance opened the breaker; it stays open for `remainingMs` from now. */
  opened(remainingMs: number): void;
  /** Another instance closed it (its probes succeeded, or `forceClosed`/`reset`). */
  closed(): void;
}

/** One breaker's link to shared state; made by `BreakerStore.attach`. */
export interface BreakerLink {
  /** Tells the other instances about a local transition. Fire and forget: never throws. */
  publish(state: SharedBreakerState, openMs: number): void;
  /**
   * Asks for the right to probe in half-open, across instances, for at most `ttlMs`.
   * Resolves `true` when this instance may probe; resolves `true` too when the store cannot
   * answer within its time bound (each instance then probes on its own).
   */
  acquireProbe(ttlMs: number): Promise<boolean>;
  /** Gives the probe right back early (the probe finished). */
  releaseProbe(): void;
  /** Stops listening; the breaker no longer hears from peers. */
  detach(): void;
}

/** Shares breaker state between instances. */
export interface BreakerStore {
  attach(name: string, peer: BreakerPeerHandler): BreakerLink;
}
