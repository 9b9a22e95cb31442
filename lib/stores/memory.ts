import { systemClock, type Clock } from '../clock.js';
import { Lru } from '../lru.js';
import * as validate from '../validate.js';
import {
  slidingWindowConsume,
  slidingWindowIdle,
  tokenBucketConsume,
  tokenBucketIdle,
  type SlidingWindowState,
  type TokenBucketState,
} from './algorithms.js';
import type { RateLimitDecision, RateLimitRule, RateLimitStore } from './types.js';

export interface MemoryStoreOptions {
  /** Keys kept per limiter; the least recently used go first (default 100000). */
  maxKeys?: number;
  /** Time source (default: the monotonic `performance.now()`). */
  clock?: Clock;
}

/** A key's state, and when it was last moved to the recent end of the map. */
type KeyState = (SlidingWindowState | TokenBucketState) & { moved: number };

// How many idle keys one decision drops from the cold end of the map: more than the one
// key a decision can add, so the map shrinks under any traffic once keys go idle.
const PRUNE_PER_DECISION = 2;

/** The keys of one limiter (one rule name). */
class Table {
  readonly keys: Lru<string, KeyState>;
  readonly slidingWindow: boolean;
  /** The time of the decision in progress, read by `isIdle` (kept here to avoid a closure per call). */
  now = 0;
  readonly isIdle: (state: KeyState) => boolean;
  /** Decisions so far: the clock of `KeyState.moved`. */
  decisions = 0;

  constructor(
    readonly rule: RateLimitRule,
    maxKeys: number,
  ) {
    this.keys = new Lru({ maxSize: maxKeys });
    this.slidingWindow = rule.algorithm === 'sliding-window';
    const { limit, windowMs } = rule;
    this.isIdle = this.slidingWindow
      ? (state) => slidingWindowIdle(state as SlidingWindowState, this.now, windowMs)
      : (state) => tokenBucketIdle(state as TokenBucketState, this.now, limit, windowMs);
  }
}

/**
 * Creates the in-process rate-limit store, the default of `rateLimit`. It keeps, per
 * limiter name, at most `maxKeys` keys: the least recently used key goes first when a new
 * one arrives, and keys whose budget is whole again (idle) are dropped lazily as decisions
 * are made, without timers. One store can serve several limiters; limiters with the same
 * name share their budgets.
 *
 * @example
 * const store = memoryStore({ maxKeys: 50_000 });
 * const perMinute = rateLimit({ name: 'api-minute', limit: 100, windowMs: 60_000, store });
 * const perHour = rateLimit({ name: 'api-hour', limit: 2_000, windowMs: 3_600_000, store });
 */
export function memoryStore(options?: MemoryStoreOptions): MemoryStore {
  return new MemoryStore(options);
}

export class MemoryStore implements RateLimitStore {
  readonly maxKeys: number;
  private readonly clock: Clock;
  private readonly tables = new Map<string, Table>();
  /** The last rule seen and its table: most stores serve one limiter. */
  private lastRule: RateLimitRule | undefined;
  private lastTable: Table | undefined;

  constructor(options?: MemoryStoreOptions) {
    const o = validate.optionsObject('memoryStore', options);
    validate.knownKeys('memoryStore', o, ['maxKeys', 'clock']);
    this.maxKeys = validate.positiveInteger('memoryStore', 'maxKeys', o.maxKeys ?? 100_000);
    if (o.clock !== undefined && (typeof o.clock !== 'object' || o.clock === null || typeof o.clock.now !== 'function')) {
      validate.fail('memoryStore', 'clock', 'an object with a now() method', o.clock);
    }
    this.clock = o.clock ?? systemClock;
  }

  consume(rule: RateLimitRule, key: string): RateLimitDecision {
    const table = rule === this.lastRule ? this.lastTable! : this.table(rule);
    const now = this.clock.now();
    table.now = now;
    const keys = table.keys;
    keys.prune(table.isIdle, PRUNE_PER_DECISION);
    const decision = ++table.decisions;
    let state = keys.peek(key);
    if (state === undefined) {
      state = table.slidingWindow
        ? { start: Math.floor(now / rule.windowMs) * rule.windowMs, previous: 0, current: 0, moved: decision }
        : { tokens: rule.limit, at: now, moved: decision };
      keys.set(key, state);
    } else if (decision - state.moved >= keys.size >>> 1) {
      // Moving a key to the recent end costs a delete and an insert, so a hot key moves at
      // most once per (keys held / 2) decisions. Eviction only happens with maxKeys keys
      // held, so a key used within the last maxKeys/2 decisions is never the one evicted;
      // and a hot key left at the cold end holds up the lazy dropping of idle keys behind
      // it for at most about (keys held / 2) decisions.
      keys.get(key);
      state.moved = decision;
    }
    return table.slidingWindow
      ? slidingWindowConsume(state as SlidingWindowState & KeyState, now, rule.limit, rule.windowMs)
      : tokenBucketConsume(state as TokenBucketState & KeyState, now, rule.limit, rule.windowMs);
  }

  /** Keys held for `rule`'s limiter, after dropping the idle ones. */
  size(rule: RateLimitRule): number {
    const table = this.tables.get(rule.name);
    if (table === undefined) return 0;
    table.now = this.clock.now();
    table.keys.prune(table.isIdle);
    return table.keys.size;
  }

  private table(rule: RateLimitRule): Table {
    const table = this.tables.get(rule.name);
    if (table === undefined) {
      const created = new Table(rule, this.maxKeys);
      this.tables.set(rule.name, created);
      this.lastRule = rule;
      this.lastTable = created;
      return created;
    }
    if (table.rule !== rule && !sameSettings(table.rule, rule)) {
      // Sharing a table between different settings would read one algorithm's state with
      // the other's rules; this is a configuration mistake, so it is loud.
      throw new TypeError(
        `memoryStore: two limiters named "${rule.name}" use this store with different settings ` +
          `(${describe(table.rule)} and ${describe(rule)}); give them different names`,
      );
    }
    this.lastRule = rule;
    this.lastTable = table;
    return table;
  }
}

function sameSettings(a: RateLimitRule, b: RateLimitRule): boolean {
  return a.limit === b.limit && a.windowMs === b.windowMs && a.algorithm === b.algorithm;
}

function describe(rule: RateLimitRule): string {
  return `${rule.algorithm} ${rule.limit} per ${rule.windowMs} ms`;
}
