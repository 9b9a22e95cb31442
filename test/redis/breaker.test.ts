import { expect } from 'chai';
import sinon from 'sinon';
import { circuitBreaker, type CircuitBreaker, type CircuitBreakerOptions } from '../../lib/circuit-breaker.js';
import { CircuitOpenError } from '../../lib/errors.js';
import type { RedisStoreOptions } from '../../lib/stores/redis.js';
import { breakerOpenScript } from '../../lib/stores/redis/scripts.js';
import type { BreakerPeerHandler } from '../../lib/stores/types.js';
import { eventually, keysUnder, sharedRedisInstances, sleep } from './setup.js';

// Real Redis and real time: what is tested is how fast state crosses the network, so the
// waits below are bounded polls, never fixed sleeps standing in for a state change.
describe('redisStore: circuit breakers across instances', function () {
  this.timeout(10_000);
  const redis = sharedRedisInstances();
  const instance = redis.instance;

  /** One breaker per instance, all with the same name, each attached (a first call attaches). */
  async function breakers(count: number, options: Partial<CircuitBreakerOptions> = {}, storeOptions: RedisStoreOptions = {}): Promise<CircuitBreaker[]> {
    const made: CircuitBreaker[] = [];
    for (let i = 0; i < count; i++) {
      const { store } = await instance(storeOptions);
      const breaker = circuitBreaker({ name: 'users-api', consecutiveFailures: 1, openMs: 10_000, store, ...options });
      await breaker.execute(() => 'attach');
      made.push(breaker);
    }
    return made;
  }

  const fail = (): never => {
    throw new Error('upstream down');
  };

  afterEach(() => {
    sinon.restore();
  });

  it('a trip on one instance opens the others within syncMs', async () => {
    const [a, b, c] = await breakers(3);
    await a!.execute(fail).catch(() => {});
    expect(a!.state).to.equal('open');
    const took = await eventually(() => b!.state === 'open' && c!.state === 'open', 1000, 'b and c open');
    expect(took).to.be.below(1000);
    const rejection = await b!.execute(() => 'never').catch((error: unknown) => error);
    expect(rejection).to.be.instanceOf(CircuitOpenError);
    // They stay open as long as the one that tripped (Redis time, not each instance's clock).
    expect((rejection as CircuitOpenError).retryAfterMs).to.be.within(9000, 10_000);
  });

  it('the shared record has an expiry, and a breaker that starts later learns it is open', async () => {
    const [a] = await breakers(1);
    await a!.execute(fail).catch(() => {});
    await eventually(async () => (await keysUnder(redis.admin, redis.prefix)).length > 0, 1000, 'the record is written');
    for (const key of await keysUnder(redis.admin, redis.prefix)) {
      const ttl = await redis.admin.pttl(key);
      expect(ttl, key).to.be.greaterThan(10_000);
      expect(ttl, key).to.be.at.most(10_000 + 60_000);
    }
    const [late] = await breakers(1);
    await eventually(() => late!.state === 'open', 1000, 'the late breaker opens');
  });

  it('the periodic sync opens a breaker that missed the message', async () => {
    const [b] = await breakers(1, {}, { syncMs: 150 });
    // An open written without a message on the store's channel (as if it got lost).
    await redis.admin.eval(breakerOpenScript.body, 1, `${redis.prefix}cb:users-api`, `${redis.prefix}elsewhere`, 'someone', 'users-api', 5000, 60_000);
    const took = await eventually(() => b!.state === 'open', 1000, 'b opens from the record');
    expect(took).to.be.below(150 + 100);
  });

  it('in half-open, one instance probes for all; its success closes every instance', async () => {
    const all = await breakers(3, { openMs: 200 });
    await all[0]!.execute(fail).catch(() => {});
    await eventually(() => all.every((breaker) => breaker.state === 'open'), 1000, 'all open');
    await eventually(() => all.every((breaker) => breaker.state === 'half-open'), 1000, 'all half-open');
    let probes = 0;
    const calls = all.flatMap((breaker) =>
      Array.from({ length: 4 }, () =>
        breaker.execute(async () => {
          probes++;
          await sleep(100);
          return 'fine';
        }),
      ),
    );
    const outcomes = await Promise.allSettled(calls);
    expect(probes).to.equal(1);
    expect(outcomes.filter((o) => o.status === 'fulfilled')).to.have.length(1);
    for (const o of outcomes) if (o.status === 'rejected') expect(o.reason).to.be.instanceOf(CircuitOpenError);
    const took = await eventually(() => all.every((breaker) => breaker.state === 'closed'), 1000, 'every breaker closed');
    expect(took).to.be.below(1000);
  });

  it("a failed probe reopens every instance, for the prober's open period", async () => {
    const all = await breakers(2, { openMs: 200 });
    await all[0]!.execute(fail).catch(() => {});
    await eventually(() => all.every((breaker) => breaker.state === 'half-open'), 2000, 'all half-open');
    const outcomes = await Promise.allSettled(all.map((breaker) => breaker.execute(fail)));
    // One probed (and failed); the other was refused the probe right.
    expect(outcomes.filter((o) => o.status === 'rejected' && o.reason instanceof CircuitOpenError)).to.have.length(1);
    await eventually(() => all.every((breaker) => breaker.state === 'open'), 1000, 'both open again');
  });

  it('a close on one instance (reset) closes the others', async () => {
    const [a, b] = await breakers(2);
    await a!.execute(fail).catch(() => {});
    await eventually(() => b!.state === 'open', 1000, 'b open');
    a!.reset();
    const took = await eventually(() => b!.state === 'closed', 1000, 'b closed');
    expect(took).to.be.below(1000);
    expect(await keysUnder(redis.admin, redis.prefix)).to.deep.equal([]);
  });

  it('a close does not undo a newer open the closer had not heard of', async () => {
    const { store } = await instance({ syncMs: 60_000 });
    const heard: string[] = [];
    const peer: BreakerPeerHandler = { opened: (ms) => heard.push(`opened ${ms > 4000 ? '~5000' : ms}`), closed: () => heard.push('closed') };
    const link = store.attach('users-api', peer);
    await sleep(20);
    // Another instance opens it, but this one's subscriber does not hear of it.
    await redis.admin.eval(breakerOpenScript.body, 1, `${redis.prefix}cb:users-api`, `${redis.prefix}elsewhere`, 'someone', 'users-api', 5000, 60_000);
    link.publish('closed', 0);
    await eventually(() => heard.length > 0, 1000, 'the refused close reports the open');
    expect(heard).to.deep.equal(['opened ~5000']);
    expect(await redis.admin.hget(`${redis.prefix}cb:users-api`, 'state')).to.equal('open');
  });

  it('the probe lock is released early, and only by its holder', async () => {
    const one = (await instance()).store.attach('users-api', { opened() {}, closed() {} });
    const two = (await instance()).store.attach('users-api', { opened() {}, closed() {} });
    expect(await one.acquireProbe(5000)).to.equal(true);
    expect(await two.acquireProbe(5000)).to.equal(false);
    two.releaseProbe(); // not its lock: nothing happens
    expect(await redis.admin.get(`${redis.prefix}cb:users-api:probe`)).to.be.a('string');
    const ttl = await redis.admin.pttl(`${redis.prefix}cb:users-api:probe`);
    expect(ttl).to.be.within(1, 5000);
    one.releaseProbe();
    await eventually(async () => (await redis.admin.exists(`${redis.prefix}cb:users-api:probe`)) === 0, 1000, 'the lock is gone');
    expect(await two.acquireProbe(5000)).to.equal(true);
  });

  it('adds no Redis round trip to calls through a closed breaker', async () => {
    const { store, client } = await instance({ syncMs: 60_000 });
    const breaker = circuitBreaker({ name: 'users-api', store });
    await breaker.execute(() => 'attach');
    await sleep(50); // the attach-time read
    const evalsha = sinon.spy(client, 'evalsha');
    const evaluate = sinon.spy(client, 'eval');
    for (let i = 0; i < 1000; i++) await breaker.execute(() => i);
    expect(evalsha.callCount + evaluate.callCount).to.equal(0);
  });

  it('close() detaches: a closed store hears nothing more and stops its timer', async () => {
    const [a] = await breakers(1);
    const { store } = await instance({ syncMs: 50 });
    const heard: string[] = [];
    store.attach('users-api', { opened: () => heard.push('opened'), closed: () => heard.push('closed') });
    await store.close();
    await a!.execute(fail).catch(() => {});
    await sleep(150);
    expect(heard).to.deep.equal([]);
    expect(() => store.attach('other', { opened() {}, closed() {} })).to.throw(/closed/);
  });
});
