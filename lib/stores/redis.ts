import { randomBytes } from 'node:crypto';
import { OverloadError, withoutStack } from '../errors.js';
import { Emitter, type Unsubscribe } from '../events.js';
import { promiseFor, type Settlers } from '../settlers.js';
import * as validate from '../validate.js';
import { memoryStore } from './memory.js';
import { BreakerSync, escapeName } from './redis/breakers.js';
import type { RedisCallback, RedisClientLike } from './redis/client.js';
import { Connection, type RedisStoreEvents, type RedisStoreLogger, type RedisTimeoutError, type TimedCommand } from './redis/connection.js';
import { decodeReply, isNoScript, replyRadix, slidingWindowScript, tokenBucketScript, type Script } from './redis/scripts.js';
import type { BreakerLink, BreakerPeerHandler, BreakerStore, RateLimitDecision, RateLimitRule, RateLimitStore } from './types.js';

export type { RedisArgument, RedisCallback, RedisClientLike, RedisSubscriberClient } from './redis/client.js';
export { RedisTimeoutError, type RedisOperation, type RedisStoreEvents, type RedisStoreLogger } from './redis/connection.js';

export interface RedisStoreOptions {
  /** Prepended to every key and to the pub/sub channel (default `'bulwark:'`). */
  prefix?: string;
  /**
   * Breakers: how often each instance re-reads the shared state of its breakers, the bound
   * on how late a trip reaches an instance that missed the message (default 1000 ms).
   */
  syncMs?: number;
  /**
   * The longest a decision waits for Redis before it is made locally (default 50 ms). While
   * Redis is down, decisions do not wait at all.
   */
  commandTimeoutMs?: number;
  /**
   * When Redis cannot decide, refuse the call with an `OverloadError` (503, Retry-After 1 s)
   * instead of deciding locally (default `false`). Rate limits only: breakers always fall
   * back to local state.
   */
  failClosed?: boolean;
  /** Receives store errors, at most one line per 10 s (pino, winston, `console`…). */
  logger?: RedisStoreLogger;
  /**
   * Where rate-limit decisions are made while Redis cannot make them (default: a
   * `memoryStore()` of the store's own, up to 100000 keys per limiter).
   */
  local?: RateLimitStore;
}

export interface RedisStoreStats {
  /** Store errors so far: failed commands, timeouts, connection errors. */
  errors: number;
  /** Commands that did not answer within `commandTimeoutMs` (also counted in `errors`). */
  timeouts: number;
  /** Rate-limit decisions made locally (or refused, with `failClosed`) because Redis could not make them. */
  fallbacks: number;
  /** The client is connected and Redis answers in time. */
  connected: boolean;
}

const OPTIONS = ['prefix', 'syncMs', 'commandTimeoutMs', 'failClosed', 'logger', 'local'] as const;
const FAIL_CLOSED_RETRY_MS = 1000;

interface Limiter {
  readonly rule: RateLimitRule;
  /** Every key of the limiter starts with this. */
  readonly base: string;
  /** The limiter's own script: its limit and window are written into it. */
  readonly script: Script;
  /** See decodeReply. */
  readonly radix: number;
}

/**
 * Shares rate limits and circuit breakers between the instances of a service through Redis
 * (an `ioredis` client). Each rate-limit decision is one atomic Lua script timed by Redis's
 * clock; a breaker that trips on one instance opens on the others within `syncMs`, and in
 * half-open only one instance probes. Redis never takes the service down: a decision that
 * Redis cannot make within `commandTimeoutMs` is made from local state, and sharing resumes
 * when Redis is back.
 *
 * @example
 * import { Redis } from 'ioredis';
 * import { circuitBreaker, rateLimit } from 'bulwark';
 * import { redisStore } from 'bulwark/redis';
 *
 * const store = redisStore(new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'));
 * const perClient = rateLimit({ name: 'api', limit: 100, windowMs: 60_000, store });
 * const users = circuitBreaker({ name: 'users-api', store });
 */
export function redisStore(client: RedisClientLike, options?: RedisStoreOptions): RedisStore {
  return new RedisStore(client, options);
}

/**
 * The store `redisStore()` makes: a `RateLimitStore` and a `BreakerStore` over one ioredis
 * client, plus `stats()`, `on('error')` and `close()`.
 *
 * @example
 * const store = redisStore(redis, { prefix: 'shop:' });
 * store.on('error', ({ error, operation }) => logger.warn({ err: error, operation }, 'redis store'));
 * setInterval(() => metrics.gauge('redis_store_connected', store.stats().connected ? 1 : 0), 10_000).unref();
 * process.on('SIGTERM', async () => { await store.close(); await redis.quit(); });
 */
export class RedisStore implements RateLimitStore, BreakerStore {
  readonly prefix: string;
  readonly syncMs: number;
  readonly commandTimeoutMs: number;
  readonly failClosed: boolean;
  private readonly client: RedisClientLike;
  private readonly connection: Connection;
  private readonly local: RateLimitStore;
  private readonly events = new Emitter<RedisStoreEvents>();
  private readonly limiters = new Map<string, Limiter>();
  private readonly id = randomBytes(6).toString('hex');
  private breakers: BreakerSync | undefined;
  private fallbacks = 0;
  private closed = false;
  private readonly onReady = (): void => {
    this.connection.reset();
    this.breakers?.resync();
  };
  private readonly onError = (error: Error): void => {
    this.connection.report(error, 'connection');
  };
  private readonly onClose = (): void => {
    this.connection.closed();
  };

  constructor(client: RedisClientLike, options?: RedisStoreOptions) {
    const G = 'redisStore';
    const c = client as Partial<RedisClientLike> | null;
    const methods = ['evalsha', 'eval', 'duplicate', 'connect', 'on', 'off'] as const;
    if (typeof c !== 'object' || c === null || methods.some((method) => typeof c[method] !== 'function')) {
      validate.fail(G, 'client', `an ioredis client (an object with ${methods.join(', ')})`, client);
    }
    const o = validate.optionsObject(G, options);
    validate.knownKeys(G, o, OPTIONS);
    if (o.prefix !== undefined && typeof o.prefix !== 'string') validate.fail(G, 'prefix', 'a string', o.prefix);
    this.prefix = o.prefix ?? 'bulwark:';
    this.syncMs = validate.duration(G, 'syncMs', o.syncMs ?? 1000);
    this.commandTimeoutMs = validate.duration(G, 'commandTimeoutMs', o.commandTimeoutMs ?? 50);
    if (o.failClosed !== undefined && typeof o.failClosed !== 'boolean') validate.fail(G, 'failClosed', 'a boolean', o.failClosed);
    this.failClosed = o.failClosed ?? false;
    const logger = o.logger as Partial<RedisStoreLogger> | undefined | null;
    if (logger !== undefined && (typeof logger !== 'object' || logger === null || typeof logger.warn !== 'function')) {
      validate.fail(G, 'logger', 'an object with a warn(message) method', o.logger);
    }
    const local = o.local as Partial<RateLimitStore> | undefined | null;
    if (local !== undefined && (typeof local !== 'object' || local === null || typeof local.consume !== 'function' || typeof local.size !== 'function')) {
      validate.fail(G, 'local', 'a rate-limit store (an object with consume() and size())', o.local);
    }
    this.local = o.local ?? memoryStore();
    this.client = client;
    this.connection = new Connection(client, this.commandTimeoutMs, this.events, o.logger);
    client.on('ready', this.onReady);
    client.on('error', this.onError);
    client.on('close', this.onClose);
    // A client made with `lazyConnect` would otherwise never connect: the store sends
    // nothing until the client is ready.
    if (client.status === 'wait') client.connect().catch(() => {});
  }

  /**
   * One atomic decision in Redis; a local one when Redis is down (at once) or does not
   * answer within `commandTimeoutMs`. Never rejects, except with `failClosed`.
   */
  consume(rule: RateLimitRule, key: string): RateLimitDecision | Promise<RateLimitDecision> {
    const limiter = this.limiter(rule);
    if (this.closed || !this.connection.begin()) return this.fallback(rule, key);
    const decision = new Decision(this.connection, limiter, key, this.fallback);
    const promise = promiseFor<RateLimitDecision>(decision);
    this.connection.send(decision, limiter.script, decision.key, decision.callback);
    return promise;
  }

  /**
   * Keys held locally for this limiter (decisions made while Redis was away). The keys in
   * Redis are not counted: that would take a scan of the keyspace.
   */
  size(rule: RateLimitRule): number {
    return this.local.size(rule);
  }

  /** Links a breaker to the others of the same name (called by `circuitBreaker`). */
  attach(name: string, peer: BreakerPeerHandler): BreakerLink {
    if (this.closed) throw new Error('redisStore: the store is closed');
    this.breakers ??= new BreakerSync({ connection: this.connection, prefix: this.prefix, syncMs: this.syncMs, id: this.id });
    return this.breakers.attach(name, peer);
  }

  stats(): RedisStoreStats {
    const connection = this.connection;
    return { errors: connection.errors, timeouts: connection.timeouts, fallbacks: this.fallbacks, connected: connection.connected };
  }

  /**
   * Subscribes to store events (`'error'`); returns a function that unsubscribes.
   * @example store.on('error', ({ error, operation }) => log.warn({ err: error, operation }, 'redis store'));
   */
  on<K extends keyof RedisStoreEvents>(event: K, listener: (event: RedisStoreEvents[K]) => void): Unsubscribe {
    return this.events.on(event, listener);
  }

  /**
   * Detaches every breaker, closes the store's subscriber connection and stops its timer;
   * rate-limit decisions are local from then on. The client passed in stays open: it is
   * yours to `quit()`.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.client.off('ready', this.onReady);
    this.client.off('error', this.onError);
    this.client.off('close', this.onClose);
    this.breakers?.close();
  }

  private limiter(rule: RateLimitRule): Limiter {
    const limiter = this.limiters.get(rule.name);
    if (limiter === undefined) {
      const bucket = rule.algorithm === 'token-bucket';
      const created: Limiter = {
        rule,
        base: `${this.prefix}${bucket ? 'tb' : 'sw'}:${escapeName(rule.name)}:`,
        script: (bucket ? tokenBucketScript : slidingWindowScript)(rule.limit, rule.windowMs),
        radix: replyRadix(rule.windowMs),
      };
      this.limiters.set(rule.name, created);
      return created;
    }
    if (limiter.rule !== rule && !sameSettings(limiter.rule, rule)) {
      throw new TypeError(
        `redisStore: two limiters named "${rule.name}" use this store with different settings ` +
          `(${describe(limiter.rule)} and ${describe(rule)}); give them different names`,
      );
    }
    return limiter;
  }

  /** The decision Redis could not make. */
  private readonly fallback = (rule: RateLimitRule, key: string): RateLimitDecision | Promise<RateLimitDecision> => {
    this.fallbacks++;
    if (this.failClosed) return Promise.reject(withoutStack(() => new OverloadError(rule.name, FAIL_CLOSED_RETRY_MS)));
    return this.local.consume(rule, key);
  };
}

/** One rate-limit decision on its way through Redis; it holds its promise's settlers. */
class Decision implements TimedCommand, Settlers {
  phase: 0 | 1 | 2 = 0;
  deadline = 0;
  older: TimedCommand | undefined = undefined;
  newer: TimedCommand | undefined = undefined;
  readonly key: string;
  /** What the client calls with the reply. */
  readonly callback: RedisCallback;
  resolve: ((value: unknown) => void) | undefined = undefined;
  reject: ((error: unknown) => void) | undefined = undefined;
  private reloaded = false;

  constructor(
    private readonly connection: Connection,
    private readonly limiter: Limiter,
    private readonly localKey: string,
    private readonly fallback: (rule: RateLimitRule, key: string) => RateLimitDecision | Promise<RateLimitDecision>,
  ) {
    this.key = limiter.base + localKey;
    // Made here rather than as a class field: one small closure, and no per-instance
    // function naming by transpilers that keep names.
    this.callback = (error, reply) => this.reply(error, reply);
  }

  private reply(error: Error | null | undefined, reply: unknown): void {
    const connection = this.connection;
    if (error) {
      // The server does not have the script (first use, restart, SCRIPT FLUSH): send it
      // whole, once, within the same time bound.
      if (!this.reloaded && isNoScript(error) && this.phase !== 2) {
        this.reloaded = true;
        connection.client.eval(this.limiter.script.body, 1, this.key, this.callback);
        return;
      }
      if (!connection.settle(this)) return;
      connection.failed(error, 'rate-limit');
      this.decideLocally();
      return;
    }
    if (!connection.settle(this)) return;
    connection.succeeded();
    const limiter = this.limiter;
    const decision = decodeReply(reply, limiter.rule.limit, limiter.radix);
    if (decision !== undefined) {
      this.resolve!(decision);
      return;
    }
    connection.report(new Error(`unexpected reply to the rate-limit script: ${JSON.stringify(reply)}`), 'rate-limit');
    this.decideLocally();
  }

  timedOut(_error: RedisTimeoutError): void {
    this.decideLocally();
  }

  lost(): void {
    this.decideLocally();
  }

  private decideLocally(): void {
    try {
      this.resolve!(this.fallback(this.limiter.rule, this.localKey));
    } catch (error) {
      this.reject!(error);
    }
  }
}

function sameSettings(a: RateLimitRule, b: RateLimitRule): boolean {
  return a.limit === b.limit && a.windowMs === b.windowMs && a.algorithm === b.algorithm;
}

function describe(rule: RateLimitRule): string {
  return `${rule.algorithm} ${rule.limit} per ${rule.windowMs} ms`;
}
