import { systemClock, type Clock } from './clock.js';

export interface LruOptions<K, V> {
  /** Entries kept before the least recently used go (positive integer). */
  maxSize: number;
  /**
   * Says whether an entry may be evicted for room. Entries it refuses are pinned: skipped
   * (and moved to the recent end, so the next eviction does not look at them again first),
   * even when that leaves the cache above `maxSize` for a while.
   */
  canEvict?: (value: V, key: K) => boolean;
  /** Entries older than this (since they were `set`) are dropped on access. */
  ttlMs?: number;
  /** Time source for `ttlMs`. */
  clock?: Clock;
  /** Called for every entry dropped for room, expiry or by `prune` (not by `delete`). */
  onEvict?: (key: K, value: V) => void;
}

/** What the map holds per key when entries have a time to live. */
interface Timed<V> {
  value: V;
  expiresAt: number;
}

// How many pinned entries one eviction looks past before giving up until the next `set`:
// bounds the cost of a `set` when most entries are pinned.
const SCAN_LIMIT = 64;

/**
 * A bounded map that forgets its least recently used entries first. It is one `Map`, whose
 * insertion order is the recency order (an entry is re-inserted when used), so an entry
 * costs nothing beyond the map's own slot: that matters for `keyed`, which may hold a
 * hundred thousand policies. Used by the rate-limit memory store, by `keyed`, and for
 * cached responses.
 *
 * Finding the oldest entry by iterating from the start would be O(n) under churn: V8
 * leaves a deleted slot as a hole until the table is rebuilt, and every fresh iterator
 * skips all of them. One long-lived iterator (a cursor) instead walks the map once, and
 * the entry it stopped at is the oldest until it is used or removed.
 *
 * @example
 * const cache = new Lru<string, Response>({ maxSize: 1000, ttlMs: 60_000 });
 * cache.set(url, response);
 * cache.get(url); // the response, now the most recently used entry
 */
export class Lru<K, V> implements Iterable<[K, V]> {
  readonly maxSize: number;
  // Values as they are, or `Timed` wrappers when `ttlMs` is set.
  private readonly map = new Map<K, unknown>();
  /** The most recently used key, which `get` need not move. */
  private newest: K | undefined = undefined;
  /** Walks the entries in recency order; the entries before it were used again or removed. */
  private cursor: Iterator<[K, unknown]> | undefined = undefined;
  /** The oldest entry, read from the cursor, while `hasOldest`. */
  private oldestKey: K | undefined = undefined;
  private oldestStored: unknown = undefined;
  private hasOldest = false;
  private readonly canEvict: ((value: V, key: K) => boolean) | undefined;
  private readonly ttlMs: number | undefined;
  private readonly clock: Clock;
  private readonly onEvict: ((key: K, value: V) => void) | undefined;

  constructor(options: LruOptions<K, V>) {
    if (!Number.isSafeInteger(options.maxSize) || options.maxSize < 1) {
      throw new TypeError(`Lru: maxSize must be a positive integer, got ${String(options.maxSize)}`);
    }
    if (options.ttlMs !== undefined && !(options.ttlMs > 0 && Number.isFinite(options.ttlMs))) {
      throw new TypeError(`Lru: ttlMs must be a finite number of milliseconds > 0, got ${String(options.ttlMs)}`);
    }
    this.maxSize = options.maxSize;
    this.canEvict = options.canEvict;
    this.ttlMs = options.ttlMs;
    this.clock = options.clock ?? systemClock;
    this.onEvict = options.onEvict;
  }

  get size(): number {
    return this.map.size;
  }

  /** The value for `key`, which becomes the most recently used entry. */
  get(key: K): V | undefined {
    const stored = this.map.get(key);
    if (stored === undefined) return undefined;
    if (this.ttlMs !== undefined && this.expire(key, stored as Timed<V>)) return undefined;
    if (key !== this.newest) this.touch(key, stored);
    return this.ttlMs === undefined ? (stored as V) : (stored as Timed<V>).value;
  }

  /** The value for `key`, leaving its recency alone. */
  peek(key: K): V | undefined {
    const stored = this.map.get(key);
    if (stored === undefined || this.stale(key, stored)) return undefined;
    return this.ttlMs === undefined ? (stored as V) : (stored as Timed<V>).value;
  }

  has(key: K): boolean {
    const stored = this.map.get(key);
    return stored !== undefined && !this.stale(key, stored);
  }

  /**
   * Stores `value` as the most recently used entry (replacing any value for `key`), then
   * evicts the least recently used evictable entries while above `maxSize`. The entry just
   * set is never the one evicted. `undefined` values are not allowed (they read as absent).
   */
  set(key: K, value: V): this {
    const stored = this.ttlMs === undefined ? value : { value, expiresAt: this.clock.now() + this.ttlMs };
    const added = !this.map.has(key);
    if (added || key === this.newest) {
      this.map.set(key, stored);
      this.newest = key;
      // Updated in place: if it is the oldest too (the only entry), it stays the oldest.
      if (!added && this.hasOldest && key === this.oldestKey) this.oldestStored = stored;
    } else {
      this.touch(key, stored);
    }
    if (added && this.map.size > this.maxSize) this.evict(key);
    return this;
  }

  /** Removes `key` (without calling `onEvict`). */
  delete(key: K): boolean {
    if (key === this.newest) this.newest = undefined;
    if (this.hasOldest && key === this.oldestKey) this.forgetOldest();
    return this.map.delete(key);
  }

  clear(): void {
    this.map.clear();
    this.newest = undefined;
    this.cursor = undefined;
    this.forgetOldest();
  }

  /**
   * Drops entries from the least recently used end while `predicate` holds, at most `max`
   * of them; stops at the first entry it refuses. Returns how many were dropped. This is
   * how callers expire idle entries lazily, without timers.
   */
  prune(predicate: (value: V, key: K) => boolean, max = Infinity): number {
    let dropped = 0;
    while (dropped < max && this.findOldest()) {
      const key = this.oldestKey as K;
      const value = this.unwrap(this.oldestStored);
      if (!predicate(value, key)) break;
      this.delete(key);
      dropped++;
      this.onEvict?.(key, value);
    }
    return dropped;
  }

  /**
   * Evicts least recently used evictable entries while above `maxSize` (after pinned
   * entries became evictable again, say). Returns how many were evicted.
   */
  trim(): number {
    return this.map.size > this.maxSize ? this.evict(undefined) : 0;
  }

  /** Entries from the least to the most recently used. */
  *entries(): IterableIterator<[K, V]> {
    for (const [key, stored] of this.map) yield [key, this.unwrap(stored)];
  }

  keys(): IterableIterator<K> {
    return this.map.keys();
  }

  *values(): IterableIterator<V> {
    for (const stored of this.map.values()) yield this.unwrap(stored);
  }

  [Symbol.iterator](): IterableIterator<[K, V]> {
    return this.entries();
  }

  private unwrap(stored: unknown): V {
    return this.ttlMs === undefined ? (stored as V) : (stored as Timed<V>).value;
  }

  private evictable(value: V, key: K): boolean {
    return this.canEvict === undefined || this.canEvict(value, key);
  }

  /** Past its time to live and not pinned. */
  private stale(key: K, stored: unknown): boolean {
    if (this.ttlMs === undefined) return false;
    const timed = stored as Timed<V>;
    return this.clock.now() >= timed.expiresAt && this.evictable(timed.value, key);
  }

  private expire(key: K, stored: Timed<V>): boolean {
    if (!this.stale(key, stored)) return false;
    this.delete(key);
    this.onEvict?.(key, stored.value);
    return true;
  }

  private evict(keep: K | undefined): number {
    let evicted = 0;
    let scanned = 0;
    let firstRotated: K | undefined;
    let rotatedAny = false;
    while (this.map.size > this.maxSize && scanned < SCAN_LIMIT && this.findOldest()) {
      const key = this.oldestKey as K;
      if (key === keep || (rotatedAny && key === firstRotated)) break;
      const stored = this.oldestStored;
      const value = this.unwrap(stored);
      if (this.evictable(value, key)) {
        this.delete(key);
        evicted++;
        this.onEvict?.(key, value);
        continue;
      }
      // A pinned entry moves behind the others, so that the next eviction does not scan it
      // first; it stays pinned, and is looked at again once the others have had their turn.
      scanned++;
      if (!rotatedAny) {
        rotatedAny = true;
        firstRotated = key;
      }
      this.touch(key, stored);
    }
    // The entry just set stays the newest.
    if (rotatedAny && keep !== undefined && this.newest !== keep) this.touch(keep, this.map.get(keep));
    return evicted;
  }

  /** Moves `key` to the most recently used end. */
  private touch(key: K, stored: unknown): void {
    if (this.hasOldest && key === this.oldestKey) this.forgetOldest();
    this.map.delete(key);
    this.map.set(key, stored);
    this.newest = key;
  }

  /** Makes `oldestKey` the least recently used key; false when the map is empty. */
  private findOldest(): boolean {
    if (this.hasOldest) return true;
    if (this.map.size === 0) return false;
    for (;;) {
      // A finished iterator never sees later entries: start a new one (it skips the holes
      // at the front once, and entries before the old position were all moved or removed).
      const step = (this.cursor ??= this.map.entries()).next();
      if (step.done === true) {
        this.cursor = undefined;
        continue;
      }
      this.oldestKey = step.value[0];
      this.oldestStored = step.value[1];
      this.hasOldest = true;
      return true;
    }
  }

  private forgetOldest(): void {
    this.hasOldest = false;
    this.oldestKey = undefined;
    this.oldestStored = undefined;
  }
}
