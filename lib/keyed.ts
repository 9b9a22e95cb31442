import { Lru } from './lru.js';
import { resolveKey, type KeyFunction } from './keys.js';
import { walk } from './pipeline.js';
import { BasePolicy, defaultName, run, runPolicy, type Call, type CallContext, type InternalFunction, type Policy, type PolicyEvents } from './policy.js';
import * as validate from './validate.js';

// The key used for a key function that throws or returns nothing.

export interface KeyedOptions {
  /**
   * Picks the policy for a call (required). Receives the normalised request (`undefined`
   * outside a request, e.g. for outbound calls) and the call's context, where you can put
   * anything (`context.upstream = host`). A key function that throws, or returns
   * `undefined`, `null` or `''`, sends the call to the shared key `'*'` (and emits
   * `keyError` when it threw).
   */
  key: KeyFunction;
  /** Policies kept; the least recently used go first (default 10000). */
  maxKeys?: number;
  name?: string;
}

export interface KeyedStats {
  /** Policies alive now (may exceed `maxKeys` while they are all pinned). */
  keys: number;
  /** Policies made by the factory so far. */
  created: number;
  /** Policies dropped to make room. */
  evicted: number;
}

export interface KeyedEvents extends PolicyEvents {
  created: { key: string };
  evicted: { key: string };
  /** The key function threw; the call used the shared key. */
  keyError: { error: unknown };
}

const OPTIONS = ['key', 'maxKeys', 'name'] as const;

/**
 * One policy per key, made by `factory(key)` on first use: a breaker per upstream host, a
 * bulkhead per tenant, a rate limit per route parameter. At most `maxKeys` policies are
 * kept, the least recently used going first, except that a policy with calls in flight, or
 * containing an open circuit breaker, is never evicted (forgetting an open breaker would
 * send traffic straight back to a dependency known to be down).
 *
 * @example
 * const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}` }), {
 *   key: (_request, context) => String(context.host),
 * });
 * const get = (url: URL) => perHost.execute(({ signal }) => fetch(url, { signal }), undefined, { host: url.host });
 */
export function keyed<P extends Policy>(factory: (key: string) => P, options: KeyedOptions): Keyed<P> {
  return new Keyed(factory, options);
}

export class Keyed<P extends Policy = Policy> extends BasePolicy<KeyedStats, KeyedEvents> {
  readonly kind = 'keyed';
  readonly maxKeys: number;
  private readonly factory: (key: string) => P;
  private readonly keyFn: KeyedOptions['key'];
  private readonly policies: Lru<string, P>;
  // Calls running per key, only for keys that have some: most keys are idle most of the
  // time, and a count in every entry would cost memory for each of them.
  private readonly inflight = new Map<string, number>();
  private created = 0;
  private evicted = 0;

  constructor(factory: (key: string) => P, options: KeyedOptions) {
    const o = validate.optionsObject('keyed', options);
    validate.knownKeys('keyed', o, OPTIONS);
    super(validate.name('keyed', o.name) ?? defaultName('keyed'));
    this.factory = validate.func('keyed', 'factory', factory);
    this.keyFn = validate.func('keyed', 'key', o.key);
    this.maxKeys = validate.positiveInteger('keyed', 'maxKeys', o.maxKeys ?? 10_000);
    this.policies = new Lru<string, P>({
      maxSize: this.maxKeys,
      canEvict: (policy, key) => !this.inflight.has(key) && !hasOpenBreaker(policy),
      onEvict: (key) => {
        this.evicted++;
        if (this.events?.has('evicted')) this.events.emit('evicted', { key });
      },
    });
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    const key = this.keyOf(call.context);
    // Counted in flight before it is looked up or stored, so that making room never evicts it.
    this.inflight.set(key, (this.inflight.get(key) ?? 0) + 1);
    let policy = this.policies.get(key);
    if (policy === undefined) {
      try {
        policy = this.factory(key);
        if (typeof policy !== 'object' || policy === null || typeof policy.execute !== 'function') {
          throw new TypeError(`keyed: factory must return a policy (an object with execute()), got ${policy === null ? 'null' : typeof policy} for key "${key}"`);
        }
      } catch (error) {
        this.done(key);
        return Promise.reject(error);
      }
      this.policies.set(key, policy);
      this.created++;
      if (this.events?.has('created')) this.events.emit('created', { key });
    }
    return this.runOn(key, policy, fn, call);
  }

  /** The live policy for `key`, if there is one (does not create it or refresh its recency). */
  get(key: string): P | undefined {
    return this.policies.peek(key);
  }

  /** The keys of the live policies, least recently used first (for `health()`, metrics, the dashboard). */
  keys(): IterableIterator<string> {
    return this.policies.keys();
  }

  /** The live policies, least recently used first. */
  children(): IterableIterator<P> {
    return this.policies.values();
  }

  stats(): KeyedStats {
    return { keys: this.policies.size, created: this.created, evicted: this.evicted };
  }

  private runOn<T>(key: string, policy: P, fn: InternalFunction<T>, call: Call): Promise<T> {
    let running: Promise<T>;
    try {
      running = runPolicy(policy, fn, call);
    } catch (error) {
      this.done(key);
      return Promise.reject(error);
    }
    return running.then(
      (value) => {
        this.done(key);
        return value;
      },
      (error: unknown) => {
        this.done(key);
        throw error;
      },
    );
  }

  private done(key: string): void {
    const count = this.inflight.get(key)! - 1;
    if (count > 0) {
      this.inflight.set(key, count);
      return;
    }
    this.inflight.delete(key);
    // Entries pinned while the map was full could not make room then; make it now.
    if (this.policies.size > this.maxKeys) this.policies.trim();
  }

  private keyOf(context: CallContext): string {
    return resolveKey(this.keyFn, context, this.reportKeyError);
  }

  private readonly reportKeyError = (error: unknown): void => {
    if (this.events?.has('keyError')) this.events.emit('keyError', { error });
  };
}

/** True when `policy` is, or contains, an open circuit breaker. */
function hasOpenBreaker(policy: Policy): boolean {
  if (policy.kind === 'circuit-breaker') return (policy as Policy & { state?: unknown }).state === 'open';
  if (policy.children === undefined) return false;
  for (const inner of walk(policy)) {
    if (inner.kind === 'circuit-breaker' && (inner as Policy & { state?: unknown }).state === 'open') return true;
  }
  return false;
}
