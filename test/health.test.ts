import { expect } from 'chai';
import sinon from 'sinon';
import { adaptiveConcurrency } from '../lib/adaptive-concurrency.js';
import { bulkhead } from '../lib/bulkhead.js';
import { chaos } from '../lib/chaos.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { health, healthResponse } from '../lib/health.js';
import { keyed } from '../lib/keyed.js';
import { loadShedder } from '../lib/load-shedder.js';
import { pipeline } from '../lib/pipeline.js';
import { PressureSampler, type PressureMeasurements } from '../lib/pressure-sampler.js';
import { rateLimit } from '../lib/rate-limit.js';
import { timeout } from '../lib/timeout.js';
import { deferred } from './helpers/promises.js';

function fakeSampler(values: Partial<PressureMeasurements> = {}): { sampler: PressureSampler; values: PressureMeasurements } {
  const current: PressureMeasurements = { eventLoopDelayMs: 0, eventLoopUtilization: 0, heapUsedBytes: 0, rssBytes: 0, ...values };
  const sampler = new PressureSampler({ probe: { start() {}, read: () => ({ ...current }), stop() {} } });
  return { sampler, values: current };
}

/** A promise the test settles by hand, to hold a call in a guard. */

describe('health', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  it('is ok with closed breakers, and lists every guard with its name, kind, state and stats', () => {
    const breaker = circuitBreaker({ name: 'prices' });
    const limit = rateLimit({ name: 'per-client', limit: 10, windowMs: 1000 });
    const report = health([breaker, limit]);
    expect(report.status).to.equal('ok');
    expect(report.guards.map(({ name, kind, state }) => ({ name, kind, state }))).to.deep.equal([
      { name: 'prices', kind: 'circuit-breaker', state: 'closed' },
      { name: 'per-client', kind: 'rate-limit', state: 'ok' },
    ]);
    expect(report.guards[0]!.stats).to.deep.equal(breaker.stats());
    expect(report.guards[1]!.stats).to.deep.equal(limit.stats());
  });

  it('is degraded while a breaker is open, half-open is not degraded, closed is ok again', async () => {
    const breaker = circuitBreaker({ name: 'prices', consecutiveFailures: 2, openMs: 1000 });
    const fail = (): Promise<never> => Promise.reject(new Error('down'));
    await breaker.execute(fail).catch(() => {});
    expect(health(breaker).status).to.equal('ok');
    await breaker.execute(fail).catch(() => {});
    expect(health(breaker)).to.include({ status: 'degraded' });
    expect(health(breaker).guards[0]!.state).to.equal('open');
    await clock.tickAsync(1000);
    expect(health(breaker).guards[0]!.state).to.equal('half-open');
    expect(health(breaker).status).to.equal('ok');
    await breaker.execute(() => 'fine');
    expect(health(breaker).guards[0]!.state).to.equal('closed');
    expect(health(breaker).status).to.equal('ok');
  });

  it('counts a forced-open breaker as open', () => {
    const breaker = circuitBreaker({ name: 'manual' });
    breaker.forceOpen();
    expect(health([breaker]).status).to.equal('degraded');
    breaker.reset();
    expect(health([breaker]).status).to.equal('ok');
  });

  it('is degraded while a load shedder sheds', async () => {
    const { sampler, values } = fakeSampler({ heapUsedBytes: 10 });
    const shedder = loadShedder({ name: 'heap', maxHeapUsedBytes: 100, sampler });
    try {
      await shedder.execute(() => 'ok');
      expect(health(shedder).status).to.equal('ok');
      expect(health(shedder).guards[0]!.state).to.equal('ok');
      values.heapUsedBytes = 1000;
      await clock.tickAsync(1000);
      expect(health(shedder).status).to.equal('degraded');
      expect(health(shedder).guards[0]!.state).to.equal('shedding');
    } finally {
      sampler.stop();
    }
  });

  it('walks pipelines and keyed guards, lists a shared guard once, and leaves pipelines out', async () => {
    const shared = circuitBreaker({ name: 'shared' });
    const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}`, consecutiveFailures: 1 }), {
      name: 'per-host',
      key: (_request, context) => String(context.host),
    });
    const a = pipeline(timeout(1000, { name: 't' }), shared);
    const b = pipeline(shared, perHost);
    await b.execute(() => 'ok', undefined, { host: 'a.example' });
    await b.execute(() => Promise.reject(new Error('down')), undefined, { host: 'b.example' }).catch(() => {});
    const report = health([a, b]);
    expect(report.guards.map((g) => g.name)).to.deep.equal(['t', 'shared', 'per-host', 'upstream:a.example', 'upstream:b.example']);
    expect(report.guards.find((g) => g.name === 'upstream:b.example')!.state).to.equal('open');
    expect(report.status).to.equal('degraded');
  });

  it('shows a bulkhead busy when its places are taken and full when its queue is too', async () => {
    const guard = bulkhead({ name: 'pool', limit: 1, queue: 1 });
    const hold = deferred();
    const running = guard.execute(() => hold.promise);
    expect(health(guard).guards[0]!.state).to.equal('busy');
    const waiting = guard.execute(() => undefined);
    expect(health(guard).guards[0]!.state).to.equal('full');
    expect(health(guard).status).to.equal('ok');
    hold.resolve();
    await Promise.all([running, waiting]);
    expect(health(guard).guards[0]!.state).to.equal('ok');
  });

  it('shows adaptive concurrency full at its limit, chaos on or off', async () => {
    const limiter = adaptiveConcurrency({ name: 'adaptive', initialLimit: 1, minLimit: 1 });
    const monkey = chaos({ name: 'monkey', fault: { rate: 0 } });
    const hold = deferred();
    const running = limiter.execute(() => hold.promise);
    expect(health([limiter, monkey]).guards.map((g) => g.state)).to.deep.equal(['full', 'on']);
    monkey.enabled = false;
    hold.resolve();
    await running;
    expect(health([limiter, monkey]).guards.map((g) => g.state)).to.deep.equal(['ok', 'off']);
  });

  it('refuses what is not a policy', () => {
    expect(() => health(42 as never)).to.throw(TypeError, 'health: policies must be a policy or an iterable of policies, got number');
    expect(() => health([circuitBreaker(), {} as never])).to.throw(TypeError, 'health: policies[1] must be a policy (an object with execute()), got object');
  });

  describe('healthResponse', () => {
    it('answers 200 with the health as JSON when ok, never cached', () => {
      const breaker = circuitBreaker({ name: 'prices' });
      const answer = healthResponse([breaker]);
      expect(answer.status).to.equal(200);
      expect(answer.headers).to.deep.equal({ 'content-type': 'application/json', 'cache-control': 'no-store' });
      expect(JSON.parse(answer.body as string)).to.deep.equal(JSON.parse(JSON.stringify(health(breaker))));
    });

    it('answers 503 while degraded', () => {
      const breaker = circuitBreaker({ name: 'prices' });
      breaker.forceOpen();
      const answer = healthResponse(breaker);
      expect(answer.status).to.equal(503);
      const body = JSON.parse(answer.body as string) as { status: string; guards: Array<{ state: string }> };
      expect(body.status).to.equal('degraded');
      expect(body.guards[0]!.state).to.equal('open');
    });
  });
});
