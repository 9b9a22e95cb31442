import { expect } from 'chai';
import { Registry } from 'prom-client';
import { metrics } from '../adapters/prometheus.js';
import { adaptiveConcurrency } from '../lib/adaptive-concurrency.js';
import { bulkhead } from '../lib/bulkhead.js';
import { chaos } from '../lib/chaos.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { fallback } from '../lib/fallback.js';
import { keyed } from '../lib/keyed.js';
import { pipeline } from '../lib/pipeline.js';
import { rateLimit } from '../lib/rate-limit.js';
import { retry } from '../lib/retry.js';
import { timeout } from '../lib/timeout.js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The samples of a Prometheus text exposition (no HELP/TYPE lines). */
function parse(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null) throw new Error(`not an exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const [, key, value] of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[key!] = value!.replace(/\\(.)/g, '$1');
    samples.push({ name: match[1]!, labels, value: Number(match[3]) });
  }
  return samples;
}

async function scrape(registry: Registry): Promise<Sample[]> {
  return parse(await registry.metrics());
}

/** The value of the one sample named `name` whose labels include `labels` (undefined when absent). */
function value(samples: Sample[], name: string, labels: Record<string, string>): number | undefined {
  const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (found.length > 1) throw new Error(`${found.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return found[0]?.value;
}

const fail = (): Promise<never> => Promise.reject(new Error('down'));

describe('bulwark/prometheus', () => {
  let registry: Registry;
  beforeEach(() => {
    registry = new Registry();
  });

  it('counts calls, failures and rejections by reason from the guards events, labelled by name and kind', async () => {
    const breaker = circuitBreaker({ name: 'prices', consecutiveFailures: 2, openMs: 60_000 });
    metrics(pipeline(breaker), { register: registry });
    let samples = await scrape(registry);
    // Series exist before the first call, at 0.
    expect(value(samples, 'bulwark_calls_total', { name: 'prices', kind: 'circuit-breaker' })).to.equal(0);
    expect(value(samples, 'bulwark_rejections_total', { name: 'prices', reason: 'circuit_open' })).to.equal(0);

    await breaker.execute(() => 'ok');
    await breaker.execute(fail).catch(() => {});
    await breaker.execute(fail).catch(() => {});
    for (let i = 0; i < 3; i++) await breaker.execute(() => 'ok').catch(() => {});
    samples = await scrape(registry);
    expect(value(samples, 'bulwark_calls_total', { name: 'prices', kind: 'circuit-breaker' })).to.equal(3);
    expect(value(samples, 'bulwark_failures_total', { name: 'prices', kind: 'circuit-breaker' })).to.equal(2);
    expect(value(samples, 'bulwark_rejections_total', { name: 'prices', kind: 'circuit-breaker', reason: 'circuit_open' })).to.equal(3);
    expect(value(samples, 'bulwark_call_duration_seconds_count', { name: 'prices' })).to.equal(3);
    expect(value(samples, 'bulwark_call_duration_seconds_bucket', { name: 'prices', le: '+Inf' })).to.equal(3);
  });

  it('sorts durations into the histogram buckets (default and custom)', async () => {
    let now = 0;
    const clock = { now: () => now };
    const timed = (ms: number) => async () => {
      now += ms;
      return 'ok';
    };
    const breaker = circuitBreaker({ name: 'timed', clock });
    metrics(breaker, { register: registry });
    for (const ms of [3, 30, 3000]) await breaker.execute(timed(ms));
    let samples = await scrape(registry);
    const bucket = (le: string): number | undefined => value(samples, 'bulwark_call_duration_seconds_bucket', { name: 'timed', le });
    expect([bucket('0.005'), bucket('0.01'), bucket('0.05'), bucket('2.5'), bucket('5'), bucket('10'), bucket('+Inf')]).to.deep.equal([1, 1, 2, 2, 3, 3, 3]);
    expect(value(samples, 'bulwark_call_duration_seconds_sum', { name: 'timed' })).to.be.closeTo(3.033, 1e-9);

    const other = new Registry();
    const pool = bulkhead({ name: 'pool', limit: 1, clock });
    metrics(pool, { register: other, buckets: [1, 0.1] });
    await pool.execute(timed(500));
    samples = await scrape(other);
    expect(samples.filter((s) => s.name === 'bulwark_call_duration_seconds_bucket').map((s) => [s.labels.le, s.value])).to.deep.equal([
      ['0.1', 0],
      ['1', 1],
      ['+Inf', 1],
    ]);
  });

  it('reads breaker state, bulkhead occupancy, rate-limit keys and adaptive limits from stats() on scrape', async () => {
    const breaker = circuitBreaker({ name: 'prices' });
    const pool = bulkhead({ name: 'pool', limit: 2, queue: 5 });
    const limiter = rateLimit({ name: 'per-client', limit: 1, windowMs: 60_000, key: (_r, c) => String(c.client) });
    const adaptive = adaptiveConcurrency({ name: 'adaptive', initialLimit: 7 });
    metrics([breaker, pool, limiter, adaptive], { register: registry });

    let release!: () => void;
    const hold = new Promise<void>((resolve) => (release = resolve));
    const running = [pool.execute(() => hold), pool.execute(() => hold), pool.execute(() => hold), adaptive.execute(() => hold)];
    await limiter.execute(() => 1, undefined, { client: 'a' });
    await limiter.execute(() => 1, undefined, { client: 'b' });
    await limiter.execute(() => 1, undefined, { client: 'b' }).catch(() => {});
    breaker.forceOpen();

    let samples = await scrape(registry);
    expect(value(samples, 'bulwark_circuit_state', { name: 'prices', state: 'open' })).to.equal(1);
    expect(value(samples, 'bulwark_circuit_state', { name: 'prices', state: 'closed' })).to.equal(0);
    expect(value(samples, 'bulwark_circuit_state', { name: 'prices', state: 'half-open' })).to.equal(0);
    expect(value(samples, 'bulwark_bulkhead_active', { name: 'pool', kind: 'bulkhead' })).to.equal(2);
    expect(value(samples, 'bulwark_bulkhead_queued', { name: 'pool' })).to.equal(1);
    expect(value(samples, 'bulwark_bulkhead_limit', { name: 'pool' })).to.equal(2);
    expect(value(samples, 'bulwark_rate_limit_keys', { name: 'per-client', kind: 'rate-limit' })).to.equal(2);
    expect(value(samples, 'bulwark_rejections_total', { name: 'per-client', reason: 'rate_limited' })).to.equal(1);
    expect(value(samples, 'bulwark_adaptive_limit', { name: 'adaptive' })).to.equal(7);
    expect(value(samples, 'bulwark_adaptive_inflight', { name: 'adaptive' })).to.equal(1);
    expect(value(samples, 'bulwark_health_degraded', {})).to.equal(1);

    release();
    await Promise.all(running);
    breaker.reset();
    samples = await scrape(registry);
    expect(value(samples, 'bulwark_bulkhead_active', { name: 'pool' })).to.equal(0);
    expect(value(samples, 'bulwark_bulkhead_queued', { name: 'pool' })).to.equal(0);
    expect(value(samples, 'bulwark_circuit_state', { name: 'prices', state: 'closed' })).to.equal(1);
    expect(value(samples, 'bulwark_health_degraded', {})).to.equal(0);
    expect(value(samples, 'bulwark_calls_total', { name: 'pool' })).to.equal(3);
  });

  it('counts timeouts, retries, fallbacks and chaos', async () => {
    const cut = timeout(5, { name: 'cut' });
    const tries = retry({ name: 'tries', attempts: 3, backoff: { initialMs: 1, jitter: 'none' } });
    const rescue = fallback('stale', { name: 'rescue' });
    const monkey = chaos({ name: 'monkey', fault: { rate: 1, status: 503 } });
    metrics(pipeline(rescue, tries, cut, monkey), { register: registry });
    expect(await pipeline(rescue, tries, cut, monkey).execute(() => 'fresh')).to.equal('stale');
    await cut.execute(() => new Promise((resolve) => setTimeout(resolve, 50))).catch(() => {});
    const samples = await scrape(registry);
    expect(value(samples, 'bulwark_retries_total', { name: 'tries', kind: 'retry' })).to.equal(2);
    expect(value(samples, 'bulwark_calls_total', { name: 'tries' })).to.equal(1);
    expect(value(samples, 'bulwark_failures_total', { name: 'tries' })).to.equal(1);
    expect(value(samples, 'bulwark_fallbacks_total', { name: 'rescue', reason: 'error' })).to.equal(1);
    expect(value(samples, 'bulwark_chaos_injected_total', { name: 'monkey', type: 'fault' })).to.equal(3);
    expect(value(samples, 'bulwark_rejections_total', { name: 'cut', reason: 'timeout' })).to.equal(1);
    expect(value(samples, 'bulwark_calls_total', { name: 'cut' })).to.equal(3);
  });

  it('follows keyed guards: new policies get series, evicted ones lose them', async () => {
    const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}` }), { name: 'per-host', key: (_r, c) => String(c.host), maxKeys: 1 });
    metrics(perHost, { register: registry });
    await perHost.execute(() => 1, undefined, { host: 'a' });
    let samples = await scrape(registry);
    expect(value(samples, 'bulwark_calls_total', { name: 'upstream:a' })).to.equal(1);
    expect(value(samples, 'bulwark_keyed_keys', { name: 'per-host', kind: 'keyed' })).to.equal(1);
    await perHost.execute(() => 1, undefined, { host: 'b' });
    samples = await scrape(registry);
    expect(value(samples, 'bulwark_calls_total', { name: 'upstream:b' })).to.equal(1);
    expect(value(samples, 'bulwark_calls_total', { name: 'upstream:a' })).to.equal(undefined);
    expect(value(samples, 'bulwark_circuit_state', { name: 'upstream:a', state: 'closed' })).to.equal(undefined);
  });

  it('takes a prefix, registers on the default registry when none is given, and unregisters', async () => {
    const { register: defaultRegistry } = await import('prom-client');
    const breaker = circuitBreaker({ name: 'p' });
    const handle = metrics(breaker, { prefix: 'svc_guard_' });
    try {
      expect(handle.names).to.include('svc_guard_calls_total');
      await breaker.execute(() => 1);
      const samples = parse(await defaultRegistry.metrics());
      expect(value(samples, 'svc_guard_calls_total', { name: 'p' })).to.equal(1);
      expect(() => metrics(breaker, { prefix: 'svc_guard_' })).to.throw(Error, 'metrics: a metric named svc_guard_calls_total is already registered on this registry');
    } finally {
      handle.unregister();
    }
    expect(defaultRegistry.getSingleMetric('svc_guard_calls_total')).to.equal(undefined);
    expect(defaultRegistry.getSingleMetric('svc_guard_circuit_state')).to.equal(undefined);
    // Unregistered: no listener is left on the guard.
    expect((breaker as unknown as { events: { active: boolean } }).events.active).to.equal(false);
    // And it can be registered again.
    metrics(breaker, { prefix: 'svc_guard_' }).unregister();
  });

  it('checks its options', () => {
    const breaker = circuitBreaker();
    expect(() => metrics(breaker, { register: {} as Registry })).to.throw(TypeError, 'metrics: register must be a prom-client Registry, got object');
    expect(() => metrics(breaker, { register: registry, prefix: '1x' })).to.throw(TypeError, 'metrics: prefix must be a valid start of a Prometheus metric name');
    expect(() => metrics(breaker, { register: registry, buckets: [] })).to.throw(TypeError, 'metrics: buckets must be a non-empty array of positive numbers (seconds), got []');
    expect(() => metrics(breaker, { register: registry, registry } as never)).to.throw(TypeError, 'metrics: unknown option "registry"');
    expect(registry.getMetricsAsArray()).to.have.length(0);
  });
});
