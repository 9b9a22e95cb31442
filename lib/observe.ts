// Seeing the guards from the outside: which guards a set of policies holds (pipelines and
// keyed guards walked, keyed policies followed as they come and go), and `observe()`, which
// turns their notable events into log lines.

import { systemClock, type Clock } from './clock.js';
import type { Unsubscribe } from './events.js';
import type { Policy } from './policy.js';
import { clockOption, duration, knownKeys, optionsObject } from './validate.js';

/** One policy, or several (an array, a Set, `Object.values(guards)`…). */
export type Policies = Policy | Iterable<Policy>;

/** A policy that publishes events: every built-in guard (`BasePolicy`). */
export interface Observable {
  on(event: string, listener: (event: never) => void): Unsubscribe;
}

/**
 * The policies given, checked: a single policy or an iterable of them, as an array.
 * @example const list = policyList('health', policies); // throws a TypeError naming `health` otherwise
 */
export function policyList(caller: string, policies: Policies): Policy[] {
  const list = isPolicy(policies) ? [policies] : isIterable(policies) ? [...policies] : undefined;
  if (list === undefined) throw new TypeError(`${caller}: policies must be a policy or an iterable of policies, got ${describe(policies)}`);
  list.forEach((policy, index) => {
    if (!isPolicy(policy)) throw new TypeError(`${caller}: policies[${index}] must be a policy (an object with execute()), got ${describe(policy)}`);
  });
  return list;
}

/**
 * Every policy inside `policies`, each once (a breaker shared by two pipelines is one
 * guard), depth first, containers (pipelines, keyed guards) included.
 *
 * @example for (const guard of guardsOf([apiPolicy, searchPolicy])) console.log(guard.name, guard.stats());
 */
export function* guardsOf(policies: readonly Policy[]): Generator<Policy> {
  const seen = new Set<Policy>();
  function* visit(policy: Policy): Generator<Policy> {
    if (seen.has(policy)) return;
    seen.add(policy);
    yield policy;
    const children = policy.children?.();
    if (children !== undefined) for (const child of children) yield* visit(child);
  }
  for (const policy of policies) yield* visit(policy);
}

/**
 * Subscribes `listener` when `policy` publishes events (every built-in guard does); a
 * no-op unsubscribe otherwise.
 * @example const off = listen<{ reason: string }>(guard, 'rejected', ({ reason }) => count(reason));
 */
export function listen<E>(policy: Policy, event: string, listener: (event: E) => void): Unsubscribe {
  const on = (policy as Partial<Observable>).on;
  if (typeof on !== 'function') return noop;
  return on.call(policy, event, listener as (event: never) => void);
}

/** What a tracker calls for each guard it finds; the function returned is called when the guard goes. */
export type Attach = (guard: Policy) => Unsubscribe | void;

interface Tracked {
  /** How many places hold this guard (a breaker in two pipelines, a policy a keyed factory hands out twice). */
  refs: number;
  detach: Unsubscribe | void;
  /** What was added as this policy's children (a pipeline's members), released with it. */
  children: Policy[];
  /** A keyed guard's: stops following it and releases its policies. */
  unfollow: Unsubscribe | undefined;
}

/**
 * Follows every guard inside a set of policies: `attach` runs once per guard now, and for
 * each policy a keyed guard creates later; what it returns runs when that policy is
 * evicted, or on `stop()`. The guards are listed in the order they were found, which
 * stays stable (a keyed guard's own order changes with every call).
 *
 * @example
 * const tracker = new GuardTracker([policy], (guard) => listen(guard, 'rejected', count));
 * for (const guard of tracker.guards) …
 * tracker.stop();
 */
export class GuardTracker {
  private readonly tracked = new Map<Policy, Tracked>();
  private stopped = false;

  constructor(
    policies: readonly Policy[],
    private readonly attach: Attach = noop,
  ) {
    for (const policy of policies) this.add(policy);
  }

  /** The guards followed now, containers included, in the order they were found. */
  get guards(): IterableIterator<Policy> {
    return this.tracked.keys();
  }

  get size(): number {
    return this.tracked.size;
  }

  /** Detaches from every guard and stops following keyed guards. Calling it twice is harmless. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    const entries = [...this.tracked.values()];
    this.tracked.clear();
    for (const entry of entries) {
      entry.detach?.();
      entry.unfollow?.();
    }
  }

  private add(policy: Policy): void {
    const known = this.tracked.get(policy);
    if (known !== undefined) {
      known.refs++;
      return;
    }
    const entry: Tracked = { refs: 1, detach: undefined, children: [], unfollow: undefined };
    this.tracked.set(policy, entry);
    entry.detach = this.attach(policy);
    if (policy.kind === 'keyed') entry.unfollow = this.follow(policy);
    if (entry.unfollow !== undefined) return;
    const children = policy.children?.();
    if (children === undefined) return;
    for (const child of children) {
      entry.children.push(child);
      this.add(child);
    }
  }

  private release(policy: Policy): void {
    const entry = this.tracked.get(policy);
    if (entry === undefined || --entry.refs > 0) return;
    this.tracked.delete(policy);
    entry.detach?.();
    entry.unfollow?.();
    for (const child of entry.children) this.release(child);
  }

  /**
   * A keyed guard's policies are followed key by key (its `created` and `evicted` events),
   * so an evicted key lets go of exactly what it brought. Undefined when the keyed guard
   * publishes no events (another copy of bulwark): its children are then taken once.
   */
  private follow(keyed: Policy): Unsubscribe | undefined {
    const k = keyed as Policy & { get?: (key: string) => Policy | undefined; keys?: () => Iterable<string> };
    if (typeof k.get !== 'function' || typeof (keyed as Partial<Observable>).on !== 'function') return undefined;
    const byKey = new Map<string, Policy>();
    // Policies that were there before we listened, when their keys cannot be read.
    let unkeyed: Set<Policy> | undefined;
    const adopt = (key: string): void => {
      if (byKey.has(key)) return;
      const policy = k.get!(key);
      if (policy === undefined) return;
      byKey.set(key, policy);
      this.add(policy);
    };
    const offCreated = listen<{ key: string }>(keyed, 'created', ({ key }) => adopt(key));
    const offEvicted = listen<{ key: string }>(keyed, 'evicted', ({ key }) => {
      const policy = byKey.get(key);
      if (policy !== undefined) {
        byKey.delete(key);
        this.release(policy);
      } else if (unkeyed !== undefined) {
        // One of the policies of before: find which by what is still alive. This happens
        // at most once per such policy.
        const alive = new Set(keyed.children?.() ?? []);
        for (const old of unkeyed) {
          if (alive.has(old)) continue;
          unkeyed.delete(old);
          this.release(old);
        }
      }
    });
    if (typeof k.keys === 'function') {
      for (const key of [...k.keys()]) adopt(key);
    } else {
      unkeyed = new Set(keyed.children?.() ?? []);
      for (const policy of unkeyed) this.add(policy);
    }
    return () => {
      offCreated();
      offEvicted();
      if (this.stopped) return;
      for (const policy of byKey.values()) this.release(policy);
      for (const policy of unkeyed ?? []) this.release(policy);
      byKey.clear();
    };
  }
}

/** The logger `observe()` writes to: pino, bunyan and `console` all fit (`(object, message)`). */
export interface ObserveLogger {
  warn(object: object, message: string): void;
  info(object: object, message: string): void;
  debug?(object: object, message: string): void;
  /** pino's: when it says `debug` is off, per-call events are not even subscribed. */
  isLevelEnabled?(level: string): boolean;
}

/** A store whose errors `observe()` logs (the Redis store). */
export interface ObservableStore {
  on(event: 'error', listener: (event: { error: Error; operation?: string }) => void): Unsubscribe;
}

export interface ObserveOptions {
  logger: ObserveLogger;
  /**
   * Stores whose errors to log. The stores of rate limits are found by themselves; a
   * breaker keeps its store private, so list a store here when only breakers use it.
   */
  stores?: Iterable<ObservableStore>;
  /** Events that can come once per call (queue timeouts, store errors) are logged at most once per this long per guard, with a count. Default 10000. */
  throttleMs?: number;
  /** Time source of the throttle, for tests. */
  clock?: Clock;
}

const OBSERVE_KEYS = ['logger', 'stores', 'throttleMs', 'clock'] as const;

/**
 * Logs what the guards do to a pino-style logger: a breaker opening (`warn`), half-opening
 * and closing (`info`); bulkhead queue timeouts, failing key functions and store errors
 * (`warn`, at most one line per `throttleMs` per guard, with a count); and, when the
 * logger has `debug` enabled, every rejection, retry, fallback, limit change and keyed
 * policy created or evicted. Follows pipelines and keyed guards (policies created later
 * included). Returns a function that unsubscribes everything.
 *
 * @example
 * import pino from 'pino';
 * const stop = observe([apiPolicy, searchPolicy], { logger: pino() });
 * // {"level":40,"guard":"prices","kind":"circuit-breaker","from":"closed","to":"open","reason":"failure-rate","msg":"circuit breaker \"prices\" opened"}
 */
export function observe(policies: Policies, options: ObserveOptions): Unsubscribe {
  const o = optionsObject('observe', options);
  knownKeys('observe', o, OBSERVE_KEYS);
  const logger = o.logger as Partial<ObserveLogger> | undefined;
  if (typeof logger !== 'object' || logger === null || typeof logger.warn !== 'function' || typeof logger.info !== 'function') {
    throw new TypeError(`observe: logger must be an object with warn() and info() methods (pino, console…), got ${describe(logger)}`);
  }
  const throttleMs = o.throttleMs === undefined ? 10_000 : duration('observe', 'throttleMs', o.throttleMs, true);
  const clock = clockOption('observe', o.clock) ?? systemClock;
  const log = logger as ObserveLogger;
  const debugging = typeof log.debug === 'function' && (typeof log.isLevelEnabled !== 'function' || log.isLevelEnabled('debug'));
  const debug = debugging ? (object: object, message: string): void => log.debug!(object, message) : undefined;
  const list = policyList('observe', policies);

  const throttle = (): Throttle => new Throttle(clock, throttleMs);
  const storesSeen = new Set<ObservableStore>();
  const storeStops: Unsubscribe[] = [];
  const watchStore = (store: unknown, owner: string | undefined): void => {
    if (typeof store !== 'object' || store === null || typeof (store as Partial<ObservableStore>).on !== 'function') return;
    const observable = store as ObservableStore;
    if (storesSeen.has(observable)) return;
    storesSeen.add(observable);
    const gate = throttle();
    storeStops.push(
      observable.on('error', ({ error, operation }) => {
        const count = gate.pass();
        if (count === 0) return;
        log.warn({ err: error, operation, guard: owner, count }, `bulwark store error${operation ? ` (${operation})` : ''}${count > 1 ? `, ${count} since the last report` : ''}: ${error?.message ?? String(error)}`);
      }),
    );
  };
  if (o.stores !== undefined) for (const store of o.stores) watchStore(store, undefined);

  const tracker = new GuardTracker(list, (guard) => {
    const name = guard.name;
    const kind = guard.kind;
    const base = { guard: name, kind };
    const offs: Unsubscribe[] = [];
    const on = <E>(event: string, listener: (event: E) => void): void => {
      offs.push(listen(guard, event, listener));
    };

    if (kind === 'circuit-breaker') {
      on<{ from: string; to: string; reason?: string }>('stateChange', ({ from, to, reason }) => {
        const fields = { ...base, from, to, reason };
        if (to === 'open') log.warn(fields, `circuit breaker "${name}" opened${reason ? ` (${reason})` : ''}`);
        else if (to === 'half-open') log.info(fields, `circuit breaker "${name}" half-open: letting probes through`);
        else log.info(fields, `circuit breaker "${name}" closed${reason ? ` (${reason})` : ''}`);
      });
    }
    if (kind === 'bulkhead') {
      const gate = throttle();
      on<{ waitedMs: number }>('queueTimeout', ({ waitedMs }) => {
        const count = gate.pass();
        if (count > 0) log.warn({ ...base, waitedMs, count }, `bulkhead "${name}": ${count === 1 ? 'a call' : `${count} calls`} timed out after waiting ${waitedMs} ms in the queue`);
      });
    }
    if (kind === 'rate-limit' || kind === 'keyed') {
      const gate = throttle();
      on<{ error: unknown }>('keyError', ({ error }) => {
        const count = gate.pass();
        if (count > 0) log.warn({ ...base, err: error, count }, `${kind} "${name}": the key function threw (${count} time${count === 1 ? '' : 's'}), calls use the shared key`);
      });
    }
    if (kind === 'rate-limit') watchStore((guard as Policy & { store?: unknown }).store, name);

    if (debug !== undefined) {
      on<{ reason: string; error: Error; key?: string }>('rejected', ({ reason, key }) => debug({ ...base, reason, key }, `${name}: rejected (${reason})`));
      on<{ attempt: number; delayMs: number; error: unknown }>('retry', ({ attempt, delayMs, error }) => debug({ ...base, attempt, delayMs, err: error }, `${name}: try ${attempt} in ${Math.round(delayMs)} ms`));
      on<{ reason: string }>('fallback', ({ reason }) => debug({ ...base, reason }, `${name}: answered by the fallback (${reason})`));
      on<{ from: number; to: number }>('limitChange', ({ from, to }) => debug({ ...base, from, to }, `${name}: concurrency limit ${from} → ${to}`));
      on<{ key: string }>('created', ({ key }) => debug({ ...base, key }, `${name}: created the policy for "${key}"`));
      on<{ key: string }>('evicted', ({ key }) => debug({ ...base, key }, `${name}: evicted the policy for "${key}"`));
      on<{ error: Error }>('fault', ({ error }) => debug({ ...base, err: error }, `${name}: injected a fault`));
    }
    return () => {
      for (const off of offs) off();
    };
  });

  return () => {
    tracker.stop();
    for (const stop of storeStops.splice(0)) stop();
  };
}

/**
 * At most one report per `everyMs`, counting what it held back: `pass()` answers how
 * many events the report that may go out now stands for, or 0 to stay quiet. No timer:
 * what is held back goes out with the next event after the interval.
 */
class Throttle {
  private last = -Infinity;
  private held = 0;

  constructor(
    private readonly clock: Clock,
    private readonly everyMs: number,
  ) {}

  pass(): number {
    const now = this.clock.now();
    this.held++;
    if (now - this.last < this.everyMs) return 0;
    this.last = now;
    const count = this.held;
    this.held = 0;
    return count;
  }
}

function isPolicy(value: unknown): value is Policy {
  return typeof value === 'object' && value !== null && typeof (value as Partial<Policy>).execute === 'function';
}

function isIterable(value: unknown): value is Iterable<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as Partial<Iterable<unknown>>)[Symbol.iterator] === 'function';
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value;
}

function noop(): void {}
