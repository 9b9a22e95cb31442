// The parts of an ioredis client the Redis store uses, described structurally so that the
// core's declarations never mention ioredis: an `ioredis` `Redis` instance satisfies these
// interfaces as it is (a test holds us to that), and so would a wrapper or a fake.

/** A Redis argument as the store sends it. */
export type RedisArgument = string | number;

/** How ioredis reports a reply to a callback. */
export type RedisCallback = (error?: Error | null, result?: unknown) => void;

/** What the store subscribes with: a `duplicate()` of the client, owned by the store. */
export interface RedisSubscriberClient {
  readonly status: string;
  connect(): Promise<void>;
  subscribe(channel: string): Promise<unknown>;
  disconnect(): void;
  on(event: 'message', listener: (channel: string, message: string) => void): unknown;
  on(event: 'error', listener: (error: Error) => void): unknown;
  on(event: 'ready', listener: () => void): unknown;
}

/**
 * The client `redisStore` is given: an ioredis `Redis` (or anything shaped like it). The
 * store runs Lua scripts with `evalsha` (and `eval` when the server has not cached the
 * script yet), follows `status` and the `ready`/`close`/`error` events, and makes a
 * subscriber with `duplicate()` the first time a breaker attaches.
 */
export interface RedisClientLike {
  /** ioredis's connection status; the store sends commands only while it is `'ready'`. */
  readonly status: string;
  connect(): Promise<void>;
  evalsha(sha1: string, numkeys: number, ...args: RedisArgument[]): Promise<unknown>;
  evalsha(sha1: string, numkeys: number, key: string, callback: RedisCallback): unknown;
  eval(script: string, numkeys: number, ...args: RedisArgument[]): Promise<unknown>;
  eval(script: string, numkeys: number, key: string, callback: RedisCallback): unknown;
  duplicate(): RedisSubscriberClient;
  on(event: 'error', listener: (error: Error) => void): unknown;
  on(event: 'ready' | 'close', listener: () => void): unknown;
  off(event: 'error', listener: (error: Error) => void): unknown;
  off(event: 'ready' | 'close', listener: () => void): unknown;
}
