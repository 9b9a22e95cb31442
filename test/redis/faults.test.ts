import { expect } from 'chai';
import { Redis, type RedisOptions } from 'ioredis';
import { circuitBreaker } from '../../lib/circuit-breaker.js';
import { OverloadError } from '../../lib/errors.js';
import { rateLimit } from '../../lib/rate-limit.js';
import { redisStore, type RedisStore, type RedisStoreOptions } from '../../lib/stores/redis.js';
import type { RateLimitRule } from '../../lib/stores/types.js';
import { freePort, RedisServer } from '../helpers/redis-server.js';
import { eventually, sleep, uniquePrefix } from './setup.js';

const TIMEOUT_MS = 50;
// What a decision may take beyond commandTimeoutMs: timer and event-loop delay on a busy
// two-core machine running the traffic of the test itself.
const SLACK_MS = 40;

// Each test here owns a redis-server on a port of its own, kills it with SIGKILL in the
// middle of traffic and starts it again on the same port, empty.
describe('redisStore: when Redis fails', function () {
  this.timeout(15_000);
  let server: RedisServer;
  const clients: Redis[] = [];
  const stores: RedisStore[] = [];
  let prefix: string;

  function client(port = server.port, options: RedisOptions = {}): Redis {
    // Reconnect quickly, as a production client would within a second or two.
    const made = new Redis(port, '127.0.0.1', { retryStrategy: (times) => Math.min(times * 10, 100), ...options });
    clients.push(made);
    return made;
  }

  function store(redis: Redis, options: RedisStoreOptions = {}): RedisStore {
    const made = redisStore(redis, { prefix, commandTimeoutMs: TIMEOUT_MS, ...options });
    stores.push(made);
    return made;
  }

  async function ready(...redis: Redis[]): Promise<void> {
    await eventually(() => redis.every((r) => r.status === 'ready'), 5000, 'clients ready');
  }

  beforeEach(async () => {
    prefix = uniquePrefix();
    server = await RedisServer.start();
  });

  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
    for (const c of clients.splice(0)) c.disconnect();
    await server.stop();
  });

  it('killed mid-traffic and restarted: no request fails, every decision keeps its time bound, sharing resumes', async () => {
    const redis = [client(), client()];
    await ready(...redis);
    const two = redis.map((r) => store(r));
    const limiters = two.map((s) => rateLimit({ name: 'traffic', limit: 1_000_000, windowMs: 60_000, store: s, key: () => 'all' }));
    let running = true;
    let calls = 0;
    let failures = 0;
    let slowest = 0;
    const worker = async (limiter: (typeof limiters)[number]): Promise<void> => {
      while (running) {
        const start = performance.now();
        try {
          await limiter.execute(() => 'ok');
        } catch {
          failures++;
        }
        slowest = Math.max(slowest, performance.now() - start);
        calls++;
        // Let timers run: a real server interleaves requests with everything else.
        await new Promise((resolve) => setImmediate(resolve));
      }
    };
    const workers = limiters.flatMap((limiter) => Array.from({ length: 8 }, () => worker(limiter)));
    await sleep(150);
    await server.kill();
    await sleep(300);
    const during = two.map((s) => s.stats());
    await server.restart();
    await eventually(() => two.every((s) => s.stats().connected), 5000, 'both stores connected again');
    await sleep(100);
    running = false;
    await Promise.all(workers);

    expect(failures).to.equal(0);
    expect(calls).to.be.greaterThan(100);
    expect(slowest, 'slowest decision (ms)').to.be.below(TIMEOUT_MS + SLACK_MS);
    for (const stats of during) {
      expect(stats.connected).to.equal(false);
      expect(stats.fallbacks).to.be.greaterThan(0);
      expect(stats.errors).to.be.greaterThan(0);
    }

    // Sharing resumed: one budget across both instances again (on a server that has lost
    // every script, so this also goes through the NOSCRIPT → EVAL path).
    const rule: RateLimitRule = { name: 'after', limit: 20, windowMs: 3_600_000, algorithm: 'sliding-window' };
    const fallbacksBefore = two.map((s) => s.stats().fallbacks);
    const decisions = await Promise.all(two.flatMap((s) => Array.from({ length: 30 }, () => s.consume(rule, 'k'))));
    expect(decisions.filter((d) => d.allowed)).to.have.length(20);
    expect(two.map((s) => s.stats().fallbacks)).to.deep.equal(fallbacksBefore);
  });

  it('slow (CLIENT PAUSE): one decision waits commandTimeoutMs, the next ones do not wait, and Redis is used again once it answers', async () => {
    const redis = client();
    const admin = client();
    await ready(redis, admin);
    const s = store(redis);
    const rule: RateLimitRule = { name: 'slow', limit: 1000, windowMs: 60_000, algorithm: 'token-bucket' };
    await s.consume(rule, 'k');
    // Every client's commands wait 400 ms, as behind a stalled server.
    await admin.call('CLIENT', 'PAUSE', '400');

    let start = performance.now();
    const first = await s.consume(rule, 'k');
    const firstMs = performance.now() - start;
    expect(first.allowed).to.equal(true);
    expect(firstMs).to.be.within(TIMEOUT_MS - 1, TIMEOUT_MS + SLACK_MS);
    expect(s.stats()).to.include({ timeouts: 1, connected: false });

    start = performance.now();
    for (let i = 0; i < 20; i++) expect((await s.consume(rule, 'k')).allowed).to.equal(true);
    expect(performance.now() - start, '20 local decisions').to.be.below(20);

    // Once Redis answers again, a decision retries it (after a second) and sharing resumes.
    await eventually(
      async () => {
        await s.consume(rule, 'k');
        return s.stats().connected;
      },
      3000,
      'back on Redis',
      50,
    );
    const fallbacks = s.stats().fallbacks;
    await s.consume(rule, 'k');
    expect(s.stats().fallbacks).to.equal(fallbacks);
  });

  it('a lost connection settles the decisions waiting on it at once, not at their deadline', async () => {
    const redis = client();
    const admin = client();
    await ready(redis, admin);
    const s = store(redis, { commandTimeoutMs: 2000 });
    const rule: RateLimitRule = { name: 'lost', limit: 100, windowMs: 60_000, algorithm: 'sliding-window' };
    await s.consume(rule, 'k');
    // Hold every command in the server, then kill it with them in flight.
    await admin.call('CLIENT', 'PAUSE', '5000');
    const start = performance.now();
    const pending = Array.from({ length: 20 }, () => s.consume(rule, 'k'));
    await sleep(20);
    await server.kill();
    const decisions = await Promise.all(pending);
    expect(performance.now() - start).to.be.below(500);
    expect(decisions.every((d) => d.allowed)).to.equal(true);
    expect(s.stats()).to.include({ timeouts: 0, fallbacks: 20 });
  });

  it('a client pointed at a closed port: local decisions at once, errors counted, logged at most once per 10 s', async () => {
    const port = await freePort();
    const redis = client(port);
    const lines: string[] = [];
    const s = store(redis, { logger: { warn: (line) => lines.push(line) } });
    const events: string[] = [];
    s.on('error', ({ operation }) => events.push(operation));
    const rule: RateLimitRule = { name: 'nowhere', limit: 5, windowMs: 60_000, algorithm: 'sliding-window' };
    const start = performance.now();
    const decisions = [];
    for (let i = 0; i < 10; i++) decisions.push(await s.consume(rule, 'k'));
    expect(performance.now() - start).to.be.below(20);
    // Each instance enforces the limit on its own meanwhile.
    expect(decisions.map((d) => d.allowed)).to.deep.equal([true, true, true, true, true, false, false, false, false, false]);
    await eventually(() => s.stats().errors >= 3, 2000, 'connection errors counted');
    expect(s.stats()).to.include({ connected: false, fallbacks: 10 });
    expect(events.length).to.be.at.least(3);
    expect(lines).to.have.length(1);
    expect(lines[0]).to.match(/^bulwark\/redis: connection failed: .*ECONNREFUSED/);
    expect(s.size(rule)).to.equal(1);

    // Breakers go on alone: the probe right is granted, publishing does not throw.
    const link = s.attach('users-api', { opened() {}, closed() {} });
    expect(await link.acquireProbe(1000)).to.equal(true);
    link.publish('open', 1000);
    link.releaseProbe();
    link.detach();
  });

  it('failClosed: a decision Redis cannot make is refused with a 503 OverloadError', async () => {
    const redis = client(await freePort());
    const limiter = rateLimit({ name: 'strict', limit: 5, windowMs: 1000, store: store(redis, { failClosed: true }) });
    const error = await limiter.execute(() => 'never').catch((e: unknown) => e);
    expect(error).to.be.instanceOf(OverloadError);
    expect(error).to.include({ status: 503, reason: 'overloaded', retryAfterMs: 1000 });
  });

  it('a lazyConnect client is connected by the store', async () => {
    const redis = client(server.port, { lazyConnect: true });
    const s = store(redis);
    await eventually(() => s.stats().connected, 2000, 'connected');
    const decision = await s.consume({ name: 'lazy', limit: 1, windowMs: 1000, algorithm: 'sliding-window' }, 'k');
    expect(decision.allowed).to.equal(true);
    expect(s.stats().fallbacks).to.equal(0);
  });

  it('a client without an offline queue: no decision waits while it reconnects', async () => {
    const redis = client(server.port, { enableOfflineQueue: false });
    await ready(redis);
    const s = store(redis);
    const rule: RateLimitRule = { name: 'no-queue', limit: 100, windowMs: 1000, algorithm: 'sliding-window' };
    await server.kill();
    await eventually(() => redis.status !== 'ready', 1000, 'the client noticed');
    const start = performance.now();
    for (let i = 0; i < 10; i++) expect((await s.consume(rule, 'k')).allowed).to.equal(true);
    expect(performance.now() - start).to.be.below(20);
    await server.restart();
    await eventually(() => s.stats().connected, 5000, 'connected again');
  });

  it('breakers: a trip made while Redis was down reaches the others once it is back', async () => {
    const redis = [client(), client()];
    await ready(...redis);
    const [a, b] = redis.map((r) =>
      circuitBreaker({ name: 'users-api', consecutiveFailures: 1, openMs: 10_000, store: store(r, { syncMs: 200 }) }),
    );
    await a!.execute(() => 'attach');
    await b!.execute(() => 'attach');
    await server.kill();
    await eventually(() => redis.every((r) => r.status !== 'ready'), 1000, 'clients noticed');
    await a!
      .execute(() => {
        throw new Error('down');
      })
      .catch(() => {});
    expect(a!.state).to.equal('open');
    await sleep(50);
    expect(b!.state).to.equal('closed');
    await server.restart();
    await eventually(() => b!.state === 'open', 3000, 'b opens once Redis is back');
  });
});
