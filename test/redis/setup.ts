import { randomBytes } from 'node:crypto';
import { Redis, type RedisOptions } from 'ioredis';
import { redisStore, type RedisStore, type RedisStoreOptions } from '../../lib/stores/redis.js';

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no';

/** A key prefix no other test (or earlier run) uses. */
export function uniquePrefix(): string {
  return `bulwark-test:${randomBytes(5).toString('hex')}:`;
}

/**
 * A client of the shared Redis at `REDIS_URL`, connected. Fails loudly when Redis is not
 * there: in CI that is a broken environment, and locally the message says how to start it.
 */
export async function sharedClient(options: RedisOptions = {}): Promise<Redis> {
  const client = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 2000, retryStrategy: () => null, ...options });
  let cause: Error | undefined;
  const remember = (error: Error): void => {
    cause ??= error;
  };
  client.on('error', remember);
  try {
    await client.connect();
  } catch (error) {
    client.disconnect();
    const reason = (cause ?? (error as Error)).message;
    const hint =
      process.env.CI === 'true'
        ? `CI=true: the CI script should have started it (${START}).`
        : `Start one with:\n  ${START}\n(or point REDIS_URL at another)`;
    throw new Error(`The Redis tests need Redis at ${REDIS_URL}, which did not answer (${reason}).\n${hint}`);
  }
  client.off('error', remember);
  // Once connected, the shared client of a test reconnects like a production one would.
  client.options.retryStrategy = (times: number) => Math.min(times * 20, 200);
  return client;
}

/** Every key under `prefix`. */
export async function keysUnder(client: Redis, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await client.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    cursor = next;
    keys.push(...batch);
  } while (cursor !== '0');
  return keys;
}

export async function deleteUnder(client: Redis, prefix: string): Promise<void> {
  const keys = await keysUnder(client, prefix);
  if (keys.length > 0) await client.del(...keys);
}

/** Resolves once `check` holds (polled every `everyMs`), or rejects after `withinMs`. */
export async function eventually(check: () => boolean | Promise<boolean>, withinMs: number, what: string, everyMs = 5): Promise<number> {
  const start = performance.now();
  for (;;) {
    if (await check()) return performance.now() - start;
    if (performance.now() - start > withinMs) throw new Error(`not within ${withinMs} ms: ${what}`);
    await sleep(everyMs);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** What `sharedRedisInstances()` gives a suite; `admin` and `prefix` are set by its hooks. */
export interface SharedRedisInstances {
  /** A client of its own for inspecting Redis, open for the whole suite. */
  admin: Redis;
  /** This test's key prefix: no other test (or earlier run) uses it. */
  prefix: string;
  /** One more instance: a connection and a store of its own, under this test's prefix. */
  instance(options?: RedisStoreOptions): Promise<{ store: RedisStore; client: Redis }>;
}

/**
 * Instances on the shared Redis for the tests of one `describe` (call it there): each test
 * gets a fresh prefix; the stores and clients it made are closed after it, and its keys
 * deleted.
 */
export function sharedRedisInstances(): SharedRedisInstances {
  const clients: Redis[] = [];
  const stores: RedisStore[] = [];
  const env: SharedRedisInstances = {
    admin: undefined as unknown as Redis,
    prefix: '',
    async instance(options = {}) {
      const client = await sharedClient();
      clients.push(client);
      const store = redisStore(client, { prefix: env.prefix, ...options });
      stores.push(store);
      return { store, client };
    },
  };
  before(async () => {
    env.admin = await sharedClient();
  });
  beforeEach(() => {
    env.prefix = uniquePrefix();
  });
  afterEach(async () => {
    await Promise.all(stores.splice(0).map((store) => store.close()));
    await Promise.all(clients.splice(0).map((client) => client.quit()));
    if (env.admin !== undefined) await deleteUnder(env.admin, env.prefix);
  });
  after(async () => {
    await env.admin?.quit();
  });
  return env;
}
