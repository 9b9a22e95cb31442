import { expect } from 'chai';
import { Lru } from '../lib/lru.js';
import { memoryStore } from '../lib/stores/memory.js';
import type { RateLimitAlgorithm, RateLimitRule } from '../lib/stores/types.js';

function manualClock(start = 0): { now(): number; advance(ms: number): void } {
  let time = start;
  return {
    now: () => time,
    advance: (ms) => {
      time += ms;
    },
  };
}

const rule = (name: string, limit: number, windowMs: number, algorithm: RateLimitAlgorithm = 'sliding-window'): RateLimitRule => ({
  name,
  limit,
  windowMs,
  algorithm,
});

describe('memoryStore', () => {
  it('answers synchronously (no promise on the memory path)', () => {
    const store = memoryStore();
    const decision = store.consume(rule('sync', 1, 1000), 'k');
    expect(decision).to.not.be.instanceOf(Promise);
    expect(decision).to.include({ allowed: true, limit: 1, remaining: 0 });
  });

  for (const algorithm of ['sliding-window', 'token-bucket'] as const) {
    describe(algorithm, () => {
      it('keeps at most maxKeys keys, evicting the least recently used first', () => {
        const clock = manualClock(10_000);
        const store = memoryStore({ maxKeys: 3, clock });
        const r = rule('lru', 1, 60_000, algorithm);
        for (const key of ['a', 'b', 'c']) expect(store.consume(r, key).allowed).to.equal(true);
        // `a` is used again (refused: its budget is spent), so `b` is now the oldest.
        expect(store.consume(r, 'a').allowed).to.equal(false);
        expect(store.consume(r, 'd').allowed).to.equal(true);
        expect(store.size(r)).to.equal(3);
        // `a` and `c` kept their (spent) budgets; `b` was forgotten and starts afresh.
        expect(store.consume(r, 'a').allowed).to.equal(false);
        expect(store.consume(r, 'c').allowed).to.equal(false);
        expect(store.consume(r, 'b').allowed).to.equal(true);
      });

      it('drops idle keys lazily, without timers', () => {
        const clock = manualClock(5_000);
        const store = memoryStore({ clock });
        const r = rule('idle', 5, 1000, algorithm);
        for (let i = 0; i < 50; i++) store.consume(r, `key-${i}`);
        expect(store.size(r)).to.equal(50);
        // One call of five: the bucket is whole again after 200 ms (a token per 200 ms); the
        // sliding window forgets a count two windows after the window it fell in.
        clock.advance(150);
        expect(store.size(r)).to.equal(50);
        clock.advance(2000);
        expect(store.size(r)).to.equal(0);
      });

      it('shrinks under traffic once keys go idle, even when size() is never asked', () => {
        const clock = manualClock(5_000);
        const store = memoryStore({ clock });
        const r = rule('shrink', 5, 1000, algorithm);
        for (let i = 0; i < 100; i++) store.consume(r, `old-${i}`);
        // Reads the table without going through size(), which would prune everything at once.
        const held = (): number => (store as unknown as { tables: Map<string, { keys: Lru<string, unknown> }> }).tables.get('shrink')!.keys.size;
        expect(held()).to.equal(100);
        clock.advance(3000);
        // Each decision drops up to two idle keys from the cold end: 50 decisions, 100 keys.
        for (let i = 0; i < 49; i++) store.consume(r, 'hot');
        expect(held()).to.equal(3);
        store.consume(r, 'hot');
        expect(held()).to.equal(1);
      });

      it('does not hand out budget again when the clock steps back', () => {
        // An injected wall clock (or, in Redis, a server clock) can jump back; the budget
        // spent must stay spent, and time already refilled must not refill twice.
        const clock = manualClock(100_500);
        const store = memoryStore({ clock });
        const r = rule('skew', 2, 1000, algorithm);
        expect(store.consume(r, 'k').allowed).to.equal(true);
        expect(store.consume(r, 'k').allowed).to.equal(true);
        clock.advance(-5000);
        expect(store.consume(r, 'k').allowed).to.equal(false);
        clock.advance(5000);
        expect(store.consume(r, 'k').allowed).to.equal(false);
      });

      it('a busy key at the cold end holds up the dropping of idle keys only briefly', () => {
        const clock = manualClock(5_000);
        const store = memoryStore({ clock });
        const r = rule('hot', 1_000_000, 1000, algorithm);
        const held = (): number => (store as unknown as { tables: Map<string, { keys: Lru<string, unknown> }> }).tables.get('hot')!.keys.size;
        store.consume(r, 'hot');
        for (let i = 0; i < 40; i++) store.consume(r, `once-${i}`);
        clock.advance(3000);
        // `hot` is the oldest key and never idle; the 40 others are idle behind it.
        for (let i = 0; i < 60; i++) store.consume(r, 'hot');
        expect(held()).to.equal(1);
        expect(store.size(r)).to.equal(1);
      });

      it('keeps a key that is not idle', () => {
        const clock = manualClock(0);
        const store = memoryStore({ clock });
        const r = rule('busy', 2, 1000, algorithm);
        store.consume(r, 'k');
        store.consume(r, 'k');
        expect(store.consume(r, 'k').allowed).to.equal(false);
        clock.advance(100);
        expect(store.size(r)).to.equal(1);
        expect(store.consume(r, 'k').allowed).to.equal(false);
      });
    });
  }

  it('serves several limiters, each with its own keys', () => {
    const store = memoryStore({ clock: manualClock() });
    const a = rule('a', 1, 1000);
    const b = rule('b', 1, 1000, 'token-bucket');
    expect(store.consume(a, 'k').allowed).to.equal(true);
    expect(store.consume(b, 'k').allowed).to.equal(true);
    expect(store.consume(a, 'k').allowed).to.equal(false);
    expect(store.consume(b, 'k').allowed).to.equal(false);
    expect(store.size(a)).to.equal(1);
    expect(store.size(b)).to.equal(1);
    expect(store.size(rule('unknown', 1, 1000))).to.equal(0);
  });

  it('lets limiters of one name and the same settings share budgets', () => {
    const store = memoryStore({ clock: manualClock() });
    expect(store.consume(rule('shared', 2, 1000), 'k').allowed).to.equal(true);
    expect(store.consume(rule('shared', 2, 1000), 'k').allowed).to.equal(true);
    expect(store.consume(rule('shared', 2, 1000), 'k').allowed).to.equal(false);
  });

  it('refuses limiters of one name with different settings', () => {
    const store = memoryStore({ clock: manualClock() });
    store.consume(rule('same', 5, 1000), 'k');
    expect(() => store.consume(rule('same', 6, 1000), 'k')).to.throw(
      TypeError,
      'memoryStore: two limiters named "same" use this store with different settings (sliding-window 5 per 1000 ms and sliding-window 6 per 1000 ms); give them different names',
    );
    expect(() => store.consume(rule('same', 5, 1000, 'token-bucket'), 'k')).to.throw(TypeError, /different settings/);
  });

  it('validates its options', () => {
    expect(() => memoryStore({ maxKeys: 0 })).to.throw(TypeError, 'memoryStore: maxKeys must be a positive integer, got 0');
    expect(() => memoryStore({ maxKeys: 1.5 })).to.throw(TypeError, 'got 1.5');
    expect(() => memoryStore({ maxKeys: '10' as unknown as number })).to.throw(TypeError, 'got "10"');
    expect(() => memoryStore({ clock: {} as never })).to.throw(TypeError, 'memoryStore: clock must be an object with a now() method, got {}');
    expect(() => memoryStore({ maxkeys: 10 } as never)).to.throw(TypeError, 'memoryStore: unknown option "maxkeys"');
    expect(() => memoryStore(42 as never)).to.throw(TypeError, 'memoryStore: options must be an object, got 42');
  });
});

describe('Lru (lib/lru.ts)', () => {
  it('evicts the least recently used entry; get() and set() refresh recency, peek() does not', () => {
    const evicted: string[] = [];
    const lru = new Lru<string, number>({ maxSize: 2, onEvict: (key) => evicted.push(key) });
    lru.set('a', 1).set('b', 2);
    expect(lru.get('a')).to.equal(1);
    lru.set('c', 3);
    expect(evicted).to.deep.equal(['b']);
    expect(lru.peek('a')).to.equal(1);
    lru.set('d', 4);
    expect(evicted).to.deep.equal(['b', 'a']);
    lru.set('c', 30);
    lru.set('e', 5);
    expect(evicted).to.deep.equal(['b', 'a', 'd']);
    expect([...lru.entries()]).to.deep.equal([
      ['c', 30],
      ['e', 5],
    ]);
    expect([...lru.keys()]).to.deep.equal(['c', 'e']);
    expect([...lru.values()]).to.deep.equal([30, 5]);
    expect(lru.size).to.equal(2);
  });

  it('delete() and clear() do not call onEvict', () => {
    const evicted: string[] = [];
    const lru = new Lru<string, number>({ maxSize: 3, onEvict: (key) => evicted.push(key) });
    lru.set('a', 1).set('b', 2).set('c', 3);
    expect(lru.delete('b')).to.equal(true);
    expect(lru.delete('b')).to.equal(false);
    expect([...lru.keys()]).to.deep.equal(['a', 'c']);
    lru.clear();
    expect(lru.size).to.equal(0);
    expect([...lru]).to.deep.equal([]);
    lru.set('x', 1);
    expect([...lru.keys()]).to.deep.equal(['x']);
    expect(evicted).to.deep.equal([]);
  });

  it('skips pinned entries (canEvict) and may exceed maxSize while everything is pinned', () => {
    const pinned = new Set(['a', 'b']);
    const lru = new Lru<string, string>({ maxSize: 2, canEvict: (value) => !pinned.has(value) });
    lru.set('a', 'a').set('b', 'b').set('c', 'c');
    // Both older entries are pinned and the newest is never the one evicted.
    expect(lru.size).to.equal(3);
    lru.set('d', 'd');
    // `c` was evictable.
    expect(lru.has('c')).to.equal(false);
    expect(lru.size).to.equal(3);
    pinned.delete('a');
    expect(lru.trim()).to.equal(1);
    expect([...lru.keys()].sort()).to.deep.equal(['b', 'd']);
  });

  it('expires entries ttlMs after they were set, unless pinned', () => {
    const clock = manualClock();
    const keep = new Set<string>();
    const lru = new Lru<string, number>({ maxSize: 10, ttlMs: 100, clock, canEvict: (_value, key) => !keep.has(key) });
    lru.set('a', 1).set('b', 2);
    keep.add('b');
    clock.advance(99);
    expect(lru.get('a')).to.equal(1);
    clock.advance(1);
    expect(lru.has('a')).to.equal(false);
    expect(lru.peek('a')).to.equal(undefined);
    expect(lru.get('a')).to.equal(undefined);
    expect(lru.get('b')).to.equal(2);
    lru.set('a', 3);
    clock.advance(50);
    expect(lru.get('a')).to.equal(3);
  });

  it('prune() drops from the cold end while the predicate holds, at most max', () => {
    const lru = new Lru<string, number>({ maxSize: 10 });
    for (const [key, value] of [['a', 1], ['b', 2], ['c', 30], ['d', 4]] as const) lru.set(key, value);
    expect(lru.prune((value) => value < 10, 1)).to.equal(1);
    expect([...lru.keys()]).to.deep.equal(['b', 'c', 'd']);
    expect(lru.prune((value) => value < 10)).to.equal(1);
    expect([...lru.keys()]).to.deep.equal(['c', 'd']);
  });

  it('validates its options', () => {
    expect(() => new Lru({ maxSize: 0 })).to.throw(TypeError, 'Lru: maxSize must be a positive integer, got 0');
    expect(() => new Lru({ maxSize: 1, ttlMs: -1 })).to.throw(TypeError, 'Lru: ttlMs must be a finite number of milliseconds > 0, got -1');
  });
});
