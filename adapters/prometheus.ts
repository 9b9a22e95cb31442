// `bulwark/prometheus`: the guards as Prometheus metrics through prom-client (a peer
// dependency). Counters are fed by the guards' events; gauges are read from `stats()` when
// Prometheus scrapes. No timer.

import { Counter, Gauge, register as defaultRegistry, type Metric, type Registry } from 'prom-client';
import type { Unsubscribe } from '../lib/events.js';
import { isDegrading, guardHealth } from '../lib/health.js';
import { GuardTracker, listen, policyList, type Policies } from '../lib/observe.js';
import type { Policy } from '../lib/policy.js';
import { knownKeys, optionsObject } from '../lib/validate.js';

export type { Policies } from '../lib/observe.js';

export interface MetricsOptions {
  /** The prom-client registry to register on. Default: prom-client's default registry. */
  register?: Registry;
  /** Prepended to every metric name. Default `'bulwark_'`. */
  prefix?: string;
  /** Buckets of the latency histogram, in seconds. Default prom-client's (5 ms to 10 s). */
  buckets?: readonly number[];
}

/** What `metrics()` returns. */
export interface MetricsHandle {
  /** The names of the metrics registered. */
  readonly names: readonly string[];
  /** Stops listening to the guards and removes the metrics from the registry. */
  unregister(): void;
}

// Guards that report the calls they run with `success`/`failure` events. Containers
// (pipelines, keyed guards) and fallback and chaos do not: their members do, or they
// have counters of their own.
const CALL_KINDS = new Set(['circuit-breaker', 'bulkhead', 'timeout', 'retry', 'rate-limit', 'load-shedder', 'adaptive-concurrency']);
// The reason each guard rejects with, so that the series exists (at 0) before the first rejection.
const OWN_REASON: Record<string, string> = {
  'circuit-breaker': 'circuit_open',
  bulkhead: 'bulkhead_full',
  timeout: 'timeout',
  'rate-limit': 'rate_limited',
  'load-shedder': 'overloaded',
  'adaptive-concurrency': 'overloaded',
};
const CIRCUIT_STATES = ['closed', 'open', 'half-open'] as const;
// prom-client's default buckets, in seconds.
const DEFAULT_BUCKETS: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const KEYS = ['register', 'prefix', 'buckets'] as const;

type Labels = { name: string; kind: string };

/**
 * Registers the guards inside `policies` (pipelines and keyed guards walked, policies a
 * keyed guard creates later included) as metrics on a prom-client registry. Every series
 * is labelled with the guard's `name` and `kind`:
 *
 * | metric | type | labels |
 * |---|---|---|
 * | `bulwark_calls_total` | counter | calls the guard ran (successes and failures) |
 * | `bulwark_failures_total` | counter | of those, failures |
 * | `bulwark_rejections_total` | counter | `reason` |
 * | `bulwark_call_duration_seconds` | histogram | |
 * | `bulwark_circuit_state` | gauge, 1 for the current `state` | `state` |
 * | `bulwark_bulkhead_active`, `_queued`, `_limit` | gauge | |
 * | `bulwark_rate_limit_keys` | gauge | |
 * | `bulwark_adaptive_limit`, `bulwark_adaptive_inflight` | gauge | |
 * | `bulwark_load_shedding` | gauge (1 while shedding) | |
 * | `bulwark_keyed_keys` | gauge | |
 * | `bulwark_retries_total`, `bulwark_fallbacks_total`, `bulwark_chaos_injected_total` | counter | (`reason`, `type`) |
 * | `bulwark_health_degraded` | gauge (1 while `health()` says degraded) | none |
 *
 * @example
 * import express from 'express';
 * import { register } from 'prom-client';
 * import { metrics } from 'bulwark/prometheus';
 *
 * metrics([apiPolicy, searchPolicy]);
 * app.get('/metrics', async (_req, res) => res.type(register.contentType).send(await register.metrics()));
 */
export function metrics(policies: Policies, options?: MetricsOptions): MetricsHandle {
  const o = optionsObject('metrics', options);
  knownKeys('metrics', o, KEYS);
  const registry = o.register ?? defaultRegistry;
  if (typeof registry !== 'object' || registry === null || typeof (registry as Partial<Registry>).registerMetric !== 'function') {
    throw new TypeError(`metrics: register must be a prom-client Registry, got ${registry === null ? 'null' : typeof registry}`);
  }
  const prefix = o.prefix ?? 'bulwark_';
  if (typeof prefix !== 'string' || !/^[a-zA-Z_:][a-zA-Z0-9_:]*$|^$/.test(prefix)) {
    throw new TypeError(`metrics: prefix must be a valid start of a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*), got ${JSON.stringify(prefix)}`);
  }
  if (o.buckets !== undefined && (!Array.isArray(o.buckets) || o.buckets.length === 0 || o.buckets.some((b) => typeof b !== 'number' || !(b > 0)))) {
    throw new TypeError(`metrics: buckets must be a non-empty array of positive numbers (seconds), got ${JSON.stringify(o.buckets)}`);
  }
  const list = policyList('metrics', policies);
  const names: string[] = [];
  const name = (suffix: string): string => {
    const full = prefix + suffix;
    if (registry.getSingleMetric(full) !== undefined) {
      for (const done of names) registry.removeSingleMetric(done);
      throw new Error(`metrics: a metric named ${full} is already registered on this registry (unregister() the previous metrics() or give another prefix)`);
    }
    names.push(full);
    return full;
  };
  const registers = [registry];
  // Set once the tracker exists; the gauges read it when scraped.
  let tracker: GuardTracker | undefined;
  const guards = function* (kind?: string): Generator<Policy> {
    if (tracker === undefined) return;
    for (const guard of tracker.guards) if (kind === undefined || guard.kind === kind) yield guard;
  };
  const labels = (guard: Policy): Labels => ({ name: guard.name, kind: guard.kind });

  // Per-guard tallies, fed by the guards' events: plain additions on the call path. prom-client
  // hashes the labels of every inc() and observe() (about 1 µs a call per guard), so the
  // counters and the histogram are published from these when Prometheus scrapes.
  const tallies = new Map<Policy, Tally>();
  const bounds = o.buckets === undefined ? DEFAULT_BUCKETS : [...o.buckets].sort((a, b) => a - b);

  /** A counter published from the tallies: `read` gives each guard's series (labels beyond name and kind, and value). */
  const counter = (suffix: string, help: string, extra: readonly string[], read: (tally: Tally) => Iterable<[Record<string, string>, number]>): void => {
    new Counter({
      name: name(suffix),
      help,
      labelNames: ['name', 'kind', ...extra],
      registers,
      collect(this: Counter<string>) {
        this.reset();
        for (const tally of tallies.values()) for (const [more, value] of read(tally)) this.inc({ ...tally.labels, ...more }, value);
      },
    });
  };
  const none: Record<string, string> = {};
  counter('calls_total', 'Calls the guard ran (successes and failures; rejections not included)', [], (t) => (t.timed ? [[none, t.calls]] : []));
  counter('failures_total', 'Calls the guard ran that failed', [], (t) => (t.timed ? [[none, t.failures]] : []));
  counter('rejections_total', 'Calls the guard refused or cut short, by reason', ['reason'], (t) => [...t.rejections].map(([reason, n]) => [{ reason }, n]));
  counter('retries_total', 'Tries made again after a failure', [], (t) => (t.labels.kind === 'retry' ? [[none, t.retries]] : []));
  counter('fallbacks_total', 'Calls answered by a fallback, by reason', ['reason'], (t) => [...t.fallbacks].map(([reason, n]) => [{ reason }, n]));
  counter('chaos_injected_total', 'Faults and delays injected, by type', ['type'], (t) => (t.labels.kind === 'chaos' ? [[{ type: 'fault' }, t.faults], [{ type: 'latency' }, t.delays]] : []));
  const histogram = new DurationHistogram(name('call_duration_seconds'), 'Duration of the calls the guard ran, in seconds', bounds, tallies);
  registry.registerMetric(histogram as unknown as Metric);

  /** A gauge read from `stats()` at scrape time, one series per guard of `kind`. */
  const gauge = (suffix: string, help: string, kind: string, read: (stats: Record<string, unknown>) => unknown): void => {
    new Gauge({
      name: name(suffix),
      help,
      labelNames: ['name', 'kind'],
      registers,
      collect(this: Gauge<'name' | 'kind'>) {
        this.reset();
        for (const guard of guards(kind)) {
          const value = read(guard.stats() as Record<string, unknown>);
          if (typeof value === 'number' && !Number.isNaN(value)) this.set(labels(guard), value);
        }
      },
    });
  };
  new Gauge({
    name: name('circuit_state'),
    help: 'Circuit breaker state: 1 for the current state, 0 for the others',
    labelNames: ['name', 'kind', 'state'],
    registers,
    collect(this: Gauge<'name' | 'kind' | 'state'>) {
      this.reset();
      for (const guard of guards('circuit-breaker')) {
        const current = (guard.stats() as { state?: string }).state;
        for (const state of CIRCUIT_STATES) this.set({ ...labels(guard), state }, state === current ? 1 : 0);
      }
    },
  });
  gauge('bulkhead_active', 'Calls running in the bulkhead', 'bulkhead', (s) => s.active);
  gauge('bulkhead_queued', 'Calls waiting in the bulkhead queue', 'bulkhead', (s) => s.queued);
  gauge('bulkhead_limit', 'Calls the bulkhead lets run at once', 'bulkhead', (s) => s.limit);
  gauge('rate_limit_keys', 'Keys the rate limit holds', 'rate-limit', (s) => s.keys);
  gauge('adaptive_limit', 'Current limit of the adaptive concurrency guard', 'adaptive-concurrency', (s) => s.limit);
  gauge('adaptive_inflight', 'Calls in flight in the adaptive concurrency guard', 'adaptive-concurrency', (s) => s.inflight);
  gauge('load_shedding', '1 while the load shedder sheds', 'load-shedder', (s) => (s.shedding === true ? 1 : 0));
  gauge('keyed_keys', 'Policies the keyed guard holds', 'keyed', (s) => s.keys);
  new Gauge({
    name: name('health_degraded'),
    help: '1 while a circuit breaker is open or a load shedder sheds (what health() reports as degraded)',
    registers,
    collect(this: Gauge) {
      let degraded = false;
      for (const guard of guards()) {
        if (guard.kind !== 'circuit-breaker' && guard.kind !== 'load-shedder') continue;
        if (isDegrading(guardHealth(guard).state)) degraded = true;
      }
      this.set(degraded ? 1 : 0);
    },
  });

  tracker = new GuardTracker(list, (guard) => {
    if (guard.kind === 'pipeline') return;
    const tally = new Tally(labels(guard), CALL_KINDS.has(guard.kind), bounds.length);
    const own = OWN_REASON[guard.kind];
    if (own !== undefined) tally.rejections.set(own, 0);
    tallies.set(guard, tally);
    const offs: Unsubscribe[] = [
      listen<{ reason: string }>(guard, 'rejected', ({ reason }) => tally.rejections.set(reason, (tally.rejections.get(reason) ?? 0) + 1)),
    ];
    if (tally.timed) {
      offs.push(
        listen<{ durationMs: number | undefined }>(guard, 'success', ({ durationMs }) => tally.ran(durationMs, bounds)),
        listen<{ durationMs: number | undefined }>(guard, 'failure', ({ durationMs }) => {
          tally.failures++;
          tally.ran(durationMs, bounds);
        }),
      );
    }
    if (guard.kind === 'retry') offs.push(listen(guard, 'retry', () => tally.retries++));
    if (guard.kind === 'fallback') offs.push(listen<{ reason: string }>(guard, 'fallback', ({ reason }) => tally.fallbacks.set(reason, (tally.fallbacks.get(reason) ?? 0) + 1)));
    if (guard.kind === 'chaos') offs.push(listen(guard, 'fault', () => tally.faults++), listen(guard, 'latency', () => tally.delays++));
    return () => {
      for (const off of offs) off();
      // A guard that is gone (an evicted keyed policy) leaves no series behind.
      tallies.delete(guard);
    };
  });

  let registered = true;
  return {
    names: Object.freeze([...names]),
    unregister() {
      if (!registered) return;
      registered = false;
      tracker?.stop();
      for (const metric of names) registry.removeSingleMetric(metric);
    },
  };
}

/** One guard's counts since `metrics()` started watching it. */
class Tally {
  calls = 0;
  failures = 0;
  retries = 0;
  faults = 0;
  delays = 0;
  readonly rejections = new Map<string, number>();
  readonly fallbacks = new Map<string, number>();
  /** Durations per bucket (not cumulative); the last one holds those above every bound. */
  readonly buckets: Float64Array;
  sum = 0;
  count = 0;

  constructor(
    readonly labels: Labels,
    /** Reports its calls with success/failure events (and so has calls and durations). */
    readonly timed: boolean,
    bounds: number,
  ) {
    this.buckets = new Float64Array(bounds + 1);
  }

  ran(durationMs: number | undefined, bounds: readonly number[]): void {
    this.calls++;
    if (durationMs === undefined) return;
    const seconds = durationMs / 1000;
    let index = 0;
    while (index < bounds.length && seconds > bounds[index]!) index++;
    this.buckets[index]!++;
    this.sum += seconds;
    this.count++;
  }
}

interface Sample {
  metricName: string;
  labels: Record<string, string | number>;
  value: number;
}

/**
 * The latency histogram, read from the tallies at scrape time. It has the shape every
 * prom-client metric shows its registry (`name`, `help`, `type`, `aggregator`, `get()`,
 * `reset()`), and is registered with `registerMetric`.
 */
class DurationHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly bounds: readonly number[],
    private readonly tallies: ReadonlyMap<Policy, Tally>,
  ) {}

  async get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: Sample[] }> {
    const values: Sample[] = [];
    for (const tally of this.tallies.values()) {
      if (!tally.timed) continue;
      let cumulative = 0;
      this.bounds.forEach((bound, index) => {
        cumulative += tally.buckets[index]!;
        values.push({ metricName: `${this.name}_bucket`, labels: { ...tally.labels, le: bound }, value: cumulative });
      });
      values.push({ metricName: `${this.name}_bucket`, labels: { ...tally.labels, le: '+Inf' }, value: tally.count });
      values.push({ metricName: `${this.name}_sum`, labels: { ...tally.labels }, value: tally.sum });
      values.push({ metricName: `${this.name}_count`, labels: { ...tally.labels }, value: tally.count });
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  /** `registry.resetMetrics()`: durations start again from nothing. */
  reset(): void {
    for (const tally of this.tallies.values()) {
      tally.buckets.fill(0);
      tally.sum = 0;
      tally.count = 0;
    }
  }
}
