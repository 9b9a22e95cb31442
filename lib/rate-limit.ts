import { ipKey } from './client-ip.js';
import { resolveKey, SHARED_KEY, type KeyFunction } from './keys.js';
import { systemClock, type Clock } from './clock.js';
import { RateLimitError, withoutStack } from './errors.js';
import { BasePolicy, defaultName, invoke, run, type Call, type CallContext, type InternalFunction, type PolicyEvents } from './policy.js';
import { DEFER, enter, leave, refuse } from './fused.js';
import { memoryStore, MemoryStore } from './stores/memory.js';
import type { RateLimitAlgorithm, RateLimitDecision, RateLimitRule, RateLimitStore } from './stores/types.js';
import * as validate from './validate.js';

// The key used outside a request, for a key function that throws, or one that returns nothing.

export interface RateLimitOptions {
  /** Calls admitted per key per `windowMs` (required; a positive integer). */
  limit: number;
  /** The window, in milliseconds (required; a positive integer). */
  windowMs: number;
  /**
   * Which budget a call draws from. Receives the normalised request (`undefined` outside a
   * request) and the call's context; must answer synchronously. Default: the client IP
   * (IPv6 by its /64, IPv4-mapped IPv6 as IPv4), one shared key outside a request. A key
   * function that throws, or returns `undefined`, `null` or `''`, puts the call on the
   * shared key (and emits `keyError` when it threw).
   */
  key?: KeyFunction;
  /** `'sliding-window'` (default) or `'token-bucket'`. */
  algorithm?: RateLimitAlgorithm;
  /** Keys the default memory store keeps, least recently used first out (default 100000). */
  maxKeys?: number;
  /** Where budgets live (default: a memory store of its own). */
  store?: RateLimitStore;
  name?: string;
  /** Time source of the default store and of event durations. */
  clock?: Clock;
}

export interface RateLimitStats {
  /** Keys the store holds for this limiter. */
  keys: number;
  admitted: number;
  rejected: number;
  limit: number;
  windowMs: number;
  algorithm: RateLimitAlgorithm;
}

export interface RateLimitEvents extends PolicyEvents {
  rejected: PolicyEvents['rejected'] & { key: string };
  /** The key function threw; the call used the shared key. */
  keyError: { error: unknown };
}

const OPTIONS = ['limit', 'windowMs', 'key', 'algorithm', 'maxKeys', 'store', 'name', 'clock'] as const;

/**
 * Admits at most `limit` calls per key per `windowMs`; the rest are refused with a
 * `RateLimitError` (HTTP 429) whose `retryAfterMs` says when the key has room again. Every
 * decision, admitted or not, is written to `context.rateLimit = { limit, remaining, resetMs }`
 * for the `RateLimit-*` headers.
 *
 * @example
 * // 100 requests a minute per client IP, on a route
 * app.get('/search', guard(rateLimit({ limit: 100, windowMs: 60_000 })), search);
 *
 * // Per API key, bursts of 20 refilled at 20 a second, across instances
 * rateLimit({
 *   limit: 20, windowMs: 1000, algorithm: 'token-bucket',
 *   key: (request) => request?.headers['x-api-key']?.toString(),
 *   store: redisStore(redis),
 * });
 */
export function rateLimit(options: RateLimitOptions): RateLimit {
  return new RateLimit(options);
}

export class RateLimit extends BasePolicy<RateLimitStats, RateLimitEvents> {
  readonly kind = 'rate-limit';
  readonly limit: number;
  readonly windowMs: number;
  readonly algorithm: RateLimitAlgorithm;
  readonly store: RateLimitStore;
  private readonly rule: RateLimitRule;
  /** The built-in memory store decides synchronously, which lets a pipeline fuse this limiter. */
  private readonly synchronous: boolean = true;
  private readonly keyFn: RateLimitOptions['key'];
  private readonly clock: Clock;
  private admitted = 0;
  private rejected = 0;

  constructor(options: RateLimitOptions) {
    const o = validate.optionsObject('rateLimit', options);
    validate.knownKeys('rateLimit', o, OPTIONS);
    super(validate.name('rateLimit', o.name) ?? defaultName('rateLimit'));
    this.limit = validate.positiveInteger('rateLimit', 'limit', o.limit);
    if (typeof o.windowMs !== 'number' || !Number.isSafeInteger(o.windowMs) || o.windowMs < 1) {
      validate.fail('rateLimit', 'windowMs', 'a positive integer (milliseconds)', o.windowMs);
    }
    this.windowMs = o.windowMs;
    this.algorithm = validate.oneOf('rateLimit', 'algorithm', o.algorithm ?? 'sliding-window', ['sliding-window', 'token-bucket']);
    this.keyFn = o.key === undefined ? undefined : validate.func('rateLimit', 'key', o.key);
    if (o.clock !== undefined && (typeof o.clock !== 'object' || o.clock === null || typeof o.clock.now !== 'function')) {
      validate.fail('rateLimit', 'clock', 'an object with a now() method', o.clock);
    }
    this.clock = o.clock ?? systemClock;
    if (o.store !== undefined) {
      const store = o.store as Partial<RateLimitStore> | null;
      if (typeof store !== 'object' || store === null || typeof store.consume !== 'function' || typeof store.size !== 'function') {
        validate.fail('rateLimit', 'store', 'a rate-limit store (an object with consume() and size())', o.store);
      }
      // maxKeys belongs to the store; silently ignoring it would leave memory unbounded.
      if (o.maxKeys !== undefined) throw new TypeError('rateLimit: maxKeys cannot be combined with store (give maxKeys to the store)');
      this.store = o.store;
      this.synchronous = o.store instanceof MemoryStore;
    } else {
      const maxKeys = validate.positiveInteger('rateLimit', 'maxKeys', o.maxKeys ?? 100_000);
      this.store = memoryStore({ maxKeys, clock: this.clock });
    }
    this.rule = Object.freeze({ name: this.name, limit: this.limit, windowMs: this.windowMs, algorithm: this.algorithm });
  }

  /**
   * Fused pipelines: with the memory store the decision is synchronous, so the limiter
   * admits or refuses on the spot and needs to hear nothing afterwards.
   */
  [enter](call: Call): unknown {
    if (!this.synchronous || this.hearsOutcomes()) return DEFER;
    const key = this.keyOf(call.context);
    const decision = this.store.consume(this.rule, key) as RateLimitDecision;
    record(call.context, decision);
    if (!decision.allowed) return refuse(this.refuse(decision, key));
    this.admitted++;
    this.admittedCall();
    return undefined;
  }

  [leave](): void {}

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    const key = this.keyOf(call.context);
    let decision: RateLimitDecision | Promise<RateLimitDecision>;
    try {
      decision = this.store.consume(this.rule, key);
    } catch (error) {
      return Promise.reject(error);
    }
    // Only a network store answers with a promise; the memory path stays synchronous.
    if (decision instanceof Promise || typeof (decision as Partial<PromiseLike<unknown>>).then === 'function') {
      return Promise.resolve(decision).then((settled) => this.decide(settled, key, fn, call));
    }
    return this.decide(decision, key, fn, call);
  }

  stats(): RateLimitStats {
    return {
      keys: this.store.size(this.rule),
      admitted: this.admitted,
      rejected: this.rejected,
      limit: this.limit,
      windowMs: this.windowMs,
      algorithm: this.algorithm,
    };
  }

  private keyOf(context: CallContext): string {
    const request = context.request;
    if (this.keyFn === undefined) {
      const ip = request?.ip;
      return typeof ip === 'string' && ip.length > 0 ? ipKey(ip) : SHARED_KEY;
    }
    return resolveKey(this.keyFn, context, this.reportKeyError);
  }

  private readonly reportKeyError = (error: unknown): void => {
    if (this.events?.has('keyError')) this.events.emit('keyError', { error });
  };

  private decide<T>(decision: RateLimitDecision, key: string, fn: InternalFunction<T>, call: Call): Promise<T> {
    record(call.context, decision);
    if (!decision.allowed) return Promise.reject(this.refuse(decision, key));
    this.admitted++;
    this.admittedCall();
    return this.hearsOutcomes() ? this.runObserved(fn, call, this.clock) : invoke(fn, call);
  }

  private refuse(decision: RateLimitDecision, key: string): RateLimitError {
    this.rejected++;
    const error = withoutStack(() => new RateLimitError(decision.retryAfterMs, this.name));
    if (this.events?.has('rejected')) this.events.emit('rejected', { reason: 'rate_limited', error, key });
    return error;
  }
}

/**
 * Writes the decision for the `RateLimit-*` headers. When several limiters decide on one
 * call, the headers describe the tightest: a refusal wins, then the fewest calls remaining.
 */
function record(context: CallContext, decision: RateLimitDecision): void {
  const previous = context.rateLimit;
  if (previous !== undefined && decision.allowed && decision.remaining > previous.remaining) return;
  context.rateLimit = { limit: decision.limit, remaining: decision.remaining, resetMs: decision.resetMs };
}
