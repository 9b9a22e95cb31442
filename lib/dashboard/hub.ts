// The dashboard's Server-Sent Events hub: one snapshot timer for every open tab, running
// only while at least one is connected; the guards' events are counted only then too, so
// a dashboard nobody watches costs the guards nothing.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Unsubscribe } from '../events.js';
import { guardHealth, isDegrading, type GuardState } from '../health.js';
import { GuardTracker, listen } from '../observe.js';
import type { Policy } from '../policy.js';

/** One guard in a snapshot. */
export interface GuardSnapshot {
  /** Stable for the life of the dashboard (names may repeat). */
  id: number;
  name: string;
  kind: string;
  state: GuardState;
  stats: object;
  /** Per second over the last interval. */
  rate: { calls: number; failures: number; rejected: number; reasons: Record<string, number> };
}

/** What the page receives every interval (`event: snapshot`). */
export interface Snapshot {
  /** Wall-clock time of the snapshot (ms since the epoch). */
  t: number;
  status: 'ok' | 'degraded';
  guards: GuardSnapshot[];
}

/** A point of a guard's chart: time, calls/s, failures/s, rejections/s. */
export type HistoryPoint = [t: number, calls: number, failures: number, rejected: number];

export interface HubOptions {
  intervalMs: number;
  /** Points kept per guard for the chart. */
  historyLength: number;
  title: string;
}

interface Entry {
  readonly id: number;
  readonly policy: Policy;
  calls: number;
  failures: number;
  rejected: number;
  reasons: Map<string, number>;
  rate: GuardSnapshot['rate'];
  history: HistoryPoint[];
  /** Seen by the running tracker (entries of guards gone while nobody watched are dropped). */
  live: boolean;
  /** For guards that count calls in their stats instead of events: the counters at the last tick. */
  counters: Counters | undefined;
}

interface Counters {
  calls: number;
  failures: number;
}

// Guards that say "this call ran" with success/failure events; containers do not.
const CALL_KINDS = new Set(['circuit-breaker', 'bulkhead', 'timeout', 'retry', 'rate-limit', 'load-shedder', 'adaptive-concurrency']);
// Guards without success/failure events whose stats count their calls: a fallback (its
// fallbacks answered failed calls) and chaos (its faults are failures it made).
const STATS_COUNTERS: Record<string, (stats: Record<string, unknown>) => Counters> = {
  fallback: (stats) => ({ calls: Number(stats.calls) || 0, failures: Number(stats.fallbacks) || 0 }),
  chaos: (stats) => ({ calls: Number(stats.calls) || 0, failures: Number(stats.injectedFaults) || 0 }),
};
const IDLE_RATE: GuardSnapshot['rate'] = Object.freeze({ calls: 0, failures: 0, rejected: 0, reasons: Object.freeze({}) as Record<string, number> });

/**
 * The dashboard's stream: one per `dashboard()`. Each tab is a response it writes events
 * to; the guards are watched and the timer runs only while at least one tab is connected.
 *
 * @example
 * const hub = new Hub([policy], { intervalMs: 1000, historyLength: 60, title: 'shop-api' });
 * hub.connect(req, res);   // answers with the event stream
 * hub.close();             // ends every stream
 */
export class Hub {
  private readonly clients = new Set<ServerResponse>();
  private readonly entries = new Map<Policy, Entry>();
  private readonly ids = new WeakMap<Policy, number>();
  private nextId = 1;
  private tracker: GuardTracker | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private lastTick = 0;
  private closed = false;

  constructor(
    private readonly policies: readonly Policy[],
    private readonly options: HubOptions,
  ) {}

  /** Streams open now. */
  get connections(): number {
    return this.clients.size;
  }

  /** True while the snapshot timer runs. */
  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Takes an SSE request: answers with the stream, sends the history and a snapshot at once. */
  connect(req: IncomingMessage, res: ServerResponse): void {
    if (this.closed) {
      // 204 tells EventSource to stop reconnecting.
      res.writeHead(204, { 'cache-control': 'no-store' }).end();
      return;
    }
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      // no-transform: compression middleware leaves the stream alone instead of buffering it.
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      // nginx buffers proxied answers unless told not to.
      'x-accel-buffering': 'no',
    });
    res.socket?.setNoDelay(true);
    this.clients.add(res);
    const leave = (): void => this.leave(res);
    req.once('close', leave);
    res.once('close', leave);
    res.on('error', leave);
    if (this.tracker === undefined) this.start();
    const snapshot = this.snapshot(Date.now());
    const history: Record<number, HistoryPoint[]> = {};
    for (const entry of this.entries.values()) if (entry.history.length > 0) history[entry.id] = entry.history;
    res.write(`retry: 2000\n\n`);
    res.write(event('init', { title: this.options.title, intervalMs: this.options.intervalMs, historyLength: this.options.historyLength, history, snapshot }));
  }

  /** Ends every stream and stops the timer; later requests for the stream get 204 (stop reconnecting). */
  close(): void {
    this.closed = true;
    for (const res of [...this.clients]) {
      this.clients.delete(res);
      res.end();
    }
    this.stop();
  }

  private leave(res: ServerResponse): void {
    if (!this.clients.delete(res)) return;
    if (this.clients.size === 0) this.stop();
  }

  private start(): void {
    for (const entry of this.entries.values()) entry.live = false;
    this.tracker = new GuardTracker(this.policies, (policy) => this.attach(policy));
    // Guards that went away while nobody watched (evicted keyed policies).
    for (const [policy, entry] of this.entries) if (!entry.live) this.entries.delete(policy);
    this.lastTick = performance.now();
    this.schedule();
  }

  private stop(): void {
    const tracker = this.tracker;
    this.tracker = undefined;
    tracker?.stop();
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private schedule(): void {
    // setTimeout by its global name at call time, so that fake timers drive it in tests.
    this.timer = setTimeout(() => this.tick(), this.options.intervalMs);
    this.timer.unref?.();
  }

  private tick(): void {
    this.timer = undefined;
    if (this.tracker === undefined) return;
    const now = performance.now();
    const elapsedS = Math.max(1e-3, (now - this.lastTick) / 1000);
    this.lastTick = now;
    const t = Date.now();
    for (const entry of this.entries.values()) {
      const read = STATS_COUNTERS[entry.policy.kind];
      if (read !== undefined && entry.counters !== undefined) {
        const counters = read(entry.policy.stats() as Record<string, unknown>);
        entry.calls += Math.max(0, counters.calls - entry.counters.calls);
        entry.failures += Math.max(0, counters.failures - entry.counters.failures);
        entry.counters = counters;
      }
      const reasons: Record<string, number> = {};
      for (const [reason, count] of entry.reasons) if (count > 0) reasons[reason] = round(count / elapsedS);
      entry.rate = { calls: round(entry.calls / elapsedS), failures: round(entry.failures / elapsedS), rejected: round(entry.rejected / elapsedS), reasons };
      entry.calls = entry.failures = entry.rejected = 0;
      entry.reasons.clear();
      entry.history.push([t, entry.rate.calls, entry.rate.failures, entry.rate.rejected]);
      if (entry.history.length > this.options.historyLength) entry.history.splice(0, entry.history.length - this.options.historyLength);
    }
    const message = event('snapshot', this.snapshot(t));
    for (const res of this.clients) {
      // A tab that does not keep up skips snapshots rather than piling them up in memory.
      if (res.writableNeedDrain) continue;
      res.write(message);
    }
    this.schedule();
  }

  private attach(policy: Policy): Unsubscribe | void {
    if (policy.kind === 'pipeline') return;
    let entry = this.entries.get(policy);
    if (entry === undefined) {
      let id = this.ids.get(policy);
      if (id === undefined) this.ids.set(policy, (id = this.nextId++));
      entry = { id, policy, calls: 0, failures: 0, rejected: 0, reasons: new Map(), rate: IDLE_RATE, history: [], live: true, counters: undefined };
      this.entries.set(policy, entry);
    }
    entry.live = true;
    const read = STATS_COUNTERS[policy.kind];
    // Counting starts now: what happened while nobody watched is not this interval's.
    entry.counters = read === undefined ? undefined : read(policy.stats() as Record<string, unknown>);
    const counted = entry;
    const offs: Unsubscribe[] = [];
    if (CALL_KINDS.has(policy.kind)) {
      offs.push(
        listen(policy, 'success', () => {
          counted.calls++;
        }),
        listen(policy, 'failure', () => {
          counted.calls++;
          counted.failures++;
        }),
      );
    }
    offs.push(
      listen<{ reason: string }>(policy, 'rejected', ({ reason }) => {
        counted.rejected++;
        counted.reasons.set(reason, (counted.reasons.get(reason) ?? 0) + 1);
      }),
    );
    return () => {
      for (const off of offs) off();
      // Evicted while watched: gone for good. (When the hub stops, entries keep their history.)
      if (this.tracker !== undefined) this.entries.delete(policy);
    };
  }

  private snapshot(t: number): Snapshot {
    const guards: GuardSnapshot[] = [];
    let degraded = false;
    for (const entry of this.entries.values()) {
      const { name, kind, state, stats } = guardHealth(entry.policy);
      if (isDegrading(state)) degraded = true;
      guards.push({ id: entry.id, name, kind, state, stats, rate: entry.rate });
    }
    return { t, status: degraded ? 'degraded' : 'ok', guards };
  }
}

function event(name: string, data: unknown): string {
  return `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}
