import { expect } from 'chai';
import { Cluster, Redis } from 'ioredis';
import { memoryStore } from '../../lib/stores/memory.js';
import { redisStore, type RedisClientLike, type RedisStore } from '../../lib/stores/redis.js';
import type { RateLimitRule } from '../../lib/stores/types.js';
import * as entry from '../../adapters/redis.js';
import { freePort } from '../helpers/redis-server.js';

// The store's own surface, with a client that never connects (nothing listens on its port):
// none of this needs a Redis server.
describe('redisStore: options and surface', () => {
  const clients: Redis[] = [];
  const stores: RedisStore[] = [];
  let port: number;

  function offline(): Redis {
    const client = new Redis(port, '127.0.0.1', { lazyConnect: true, retryStrategy: () => null });
    clients.push(client);
    return client;
  }

  function store(client: RedisClientLike, options?: Parameters<typeof redisStore>[1]): RedisStore {
    const made = redisStore(client, options);
    stores.push(made);
    return made;
  }

  before(async () => {
    port = await freePort();
  });

  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
    for (const client of clients.splice(0)) client.disconnect();
  });

  it('accepts an ioredis Redis and Cluster as they are (checked by the type checker)', () => {
    const redis = new Redis({ lazyConnect: true });
    const cluster = new Cluster([], { lazyConnect: true });
    const typed: RedisClientLike[] = [redis, cluster];
    expect(typed).to.have.length(2);
    redis.disconnect();
    cluster.disconnect();
  });

  it('bulwark/redis exports redisStore', () => {
    expect(entry.redisStore).to.equal(redisStore);
    expect(entry.RedisTimeoutError).to.be.a('function');
  });

  it('validates its options with messages that name the option and the value', () => {
    const client = offline();
    expect(() => redisStore(undefined as unknown as RedisClientLike)).to.throw(TypeError, /^redisStore: client must be an ioredis client .*got undefined$/);
    expect(() => redisStore({ evalsha() {} } as unknown as RedisClientLike)).to.throw(TypeError, /client must be an ioredis client/);
    expect(() => redisStore(client, { syncMs: 0 })).to.throw(TypeError, 'redisStore: syncMs must be a finite number of milliseconds > 0, got 0');
    expect(() => redisStore(client, { commandTimeoutMs: -5 })).to.throw(TypeError, 'redisStore: commandTimeoutMs must be a finite number of milliseconds > 0, got -5');
    expect(() => redisStore(client, { prefix: 3 as unknown as string })).to.throw(TypeError, 'redisStore: prefix must be a string, got 3');
    expect(() => redisStore(client, { failClosed: 'yes' as unknown as boolean })).to.throw(TypeError, 'redisStore: failClosed must be a boolean, got "yes"');
    expect(() => redisStore(client, { logger: {} as never })).to.throw(TypeError, /logger must be an object with a warn\(message\) method/);
    expect(() => redisStore(client, { local: {} as never })).to.throw(TypeError, /local must be a rate-limit store/);
    expect(() => redisStore(client, { syncMS: 10 } as never)).to.throw(TypeError, /unknown option "syncMS"/);
  });

  it('defaults: prefix bulwark:, syncMs 1000, commandTimeoutMs 50, failClosed false', () => {
    const s = store(offline());
    expect(s).to.include({ prefix: 'bulwark:', syncMs: 1000, commandTimeoutMs: 50, failClosed: false });
  });

  it('connects a lazyConnect client, listens to it, and lets go of it on close()', async () => {
    const client = offline();
    expect(client.listenerCount('error')).to.equal(0);
    const s = store(client);
    expect(client.status).to.not.equal('wait');
    expect(client.listenerCount('error')).to.equal(1);
    expect(client.listenerCount('ready')).to.equal(1);
    await s.close();
    expect(client.listenerCount('error')).to.equal(0);
    expect(client.listenerCount('ready')).to.equal(0);
    client.on('error', () => {}); // its connection attempt fails; the test does not care
  });

  it('decides with the local store it is given while Redis is away, and reports its size', async () => {
    const local = memoryStore({ maxKeys: 10 });
    const s = store(offline(), { local });
    const rule: RateLimitRule = { name: 'l', limit: 2, windowMs: 1000, algorithm: 'token-bucket' };
    const decisions = [await s.consume(rule, 'a'), await s.consume(rule, 'a'), await s.consume(rule, 'a'), await s.consume(rule, 'b')];
    expect(decisions.map((d) => d.allowed)).to.deep.equal([true, true, false, true]);
    expect(local.size(rule)).to.equal(2);
    expect(s.size(rule)).to.equal(2);
    expect(s.stats().fallbacks).to.equal(4);
  });

  it("on('error') reports client errors; its return value unsubscribes", () => {
    const client = offline();
    const s = store(client);
    const seen: string[] = [];
    const off = s.on('error', ({ error, operation }) => seen.push(`${operation}: ${error.message}`));
    client.emit('error', new Error('first'));
    off();
    client.emit('error', new Error('second'));
    expect(seen).to.deep.equal(['connection: first']);
    expect(s.stats().errors).to.equal(2);
  });
});
