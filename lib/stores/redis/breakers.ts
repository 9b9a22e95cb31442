import type { BreakerLink, BreakerPeerHandler, SharedBreakerState } from '../types.js';
import type { RedisArgument, RedisSubscriberClient } from './client.js';
import type { Connection } from './connection.js';
import {
  breakerCloseScript,
  breakerOpenScript,
  breakerReadScript,
  evalScript,
  probeAcquireScript,
  probeReleaseScript,
  type Script,
} from './scripts.js';

// How breakers share state through Redis:
// - A local transition is published by one script that writes the shared record (a hash
//   `{ state, until, by }` with an expiry, `until` in Redis time) and PUBLISHes it, so the
//   other instances hear of a trip within a round trip, and one started later reads it.
// - Every `syncMs` (and whenever a connection comes back) each instance reads the records
//   of its breakers: pub/sub delivers at most once, and that read bounds how long a lost
//   message can stay lost. Reads only ever open; closes travel by message, and a lost close
//   heals itself: the instance half-opens on time and its own probe closes it.
// - Half-open probes take a lock (`SET NX PX`, released by compare-and-delete).
// Nothing here is on the path of a call through a closed breaker.

/** The shared record outlives its open period this long, for instances that start meanwhile. */
const LINGER_MS = 60_000;
const MAX_OPEN_MS = 2_147_483_647;

interface PeerMessage {
  s: 'open' | 'closed';
  n: string;
  o: string;
  u?: number;
  r?: number;
}

/** A local transition that has not reached Redis yet. */
type Pending = { state: 'open'; deadline: number } | { state: 'closed'; known: number };

export interface BreakerSyncOptions {
  connection: Connection;
  prefix: string;
  syncMs: number;
  /** Unique per store instance; link origins and lock tokens derive from it. */
  id: string;
}

export class BreakerSync {
  private readonly links = new Map<string, Set<Link>>();
  readonly connection: Connection;
  readonly channel: string;
  private readonly prefix: string;
  private readonly syncMs: number;
  private readonly id: string;
  private subscriber: RedisSubscriberClient | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private sequence = 0;
  private closed = false;

  constructor(options: BreakerSyncOptions) {
    this.connection = options.connection;
    this.prefix = options.prefix;
    this.syncMs = options.syncMs;
    this.id = options.id;
    this.channel = `${options.prefix}breakers`;
  }

  attach(name: string, peer: BreakerPeerHandler): BreakerLink {
    if (this.closed) throw new Error('redisStore: the store is closed');
    const link = new Link(this, name, escapeName(name), peer, `${this.id}.${++this.sequence}`);
    let set = this.links.get(name);
    if (set === undefined) this.links.set(name, (set = new Set()));
    set.add(link);
    this.subscribe();
    this.schedule();
    // A breaker that joins late learns at once that the others have it open.
    this.read(name);
    return link;
  }

  detach(link: Link): void {
    const set = this.links.get(link.name);
    if (set === undefined || !set.delete(link)) return;
    if (set.size === 0) this.links.delete(link.name);
    if (this.links.size === 0 && this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
  }

  /** A connection came back: send what could not be sent, and catch up on what was missed. */
  resync(): void {
    for (const set of this.links.values()) for (const link of set) link.flush();
    for (const name of this.links.keys()) this.read(name);
  }

  close(): void {
    this.closed = true;
    for (const set of [...this.links.values()]) for (const link of [...set]) link.detach();
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    const subscriber = this.subscriber;
    this.subscriber = undefined;
    subscriber?.disconnect();
  }

  stateKey(escaped: string): string {
    return `${this.prefix}cb:${escaped}`;
  }

  lockKey(escaped: string): string {
    return `${this.prefix}cb:${escaped}:probe`;
  }

  run(script: Script, key: string, args: RedisArgument[], operation: 'breaker-publish' | 'breaker-sync' | 'probe', timeoutMs?: number): Promise<unknown> {
    const connection = this.connection;
    return connection.timed(evalScript(connection.client, script, key, args), operation, timeoutMs);
  }

  /** Background commands (publish, sync) may wait longer than a request could. */
  get backgroundTimeoutMs(): number {
    return Math.max(this.connection.timeoutMs, this.syncMs);
  }

  private schedule(): void {
    if (this.timer !== undefined || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.links.size === 0) return;
      this.resync();
      this.schedule();
    }, this.syncMs);
    this.timer.unref();
  }

  private read(name: string): void {
    const set = this.links.get(name);
    if (set === undefined || !this.connection.available()) return;
    const escaped = escapeName(name);
    this.run(breakerReadScript, this.stateKey(escaped), [], 'breaker-sync', this.backgroundTimeoutMs).then(
      (reply) => {
        if (!Array.isArray(reply) || reply.length < 3) return;
        const until = Number(reply[0]);
        const remaining = Number(reply[1]);
        const by = String(reply[2]);
        for (const link of [...(this.links.get(name) ?? [])]) link.learnOpen(until, remaining, by);
      },
      noop, // counted and reported by the connection; the next sync tries again
    );
  }

  private subscribe(): void {
    if (this.subscriber !== undefined) return;
    const subscriber = this.connection.client.duplicate();
    this.subscriber = subscriber;
    const join = (): void => {
      subscriber.subscribe(this.channel).catch((error: unknown) => {
        this.connection.report(error instanceof Error ? error : new Error(String(error)), 'subscriber');
      });
    };
    subscriber.on('error', (error) => this.connection.report(error, 'subscriber'));
    subscriber.on('message', (channel, message) => {
      if (channel === this.channel) this.receive(message);
    });
    subscriber.on('ready', () => {
      if (this.subscriber !== subscriber) return;
      join();
      // Messages sent while it was away are lost: read the records instead.
      this.resync();
    });
    if (subscriber.status === 'wait') subscriber.connect().catch(noop);
    else if (subscriber.status === 'ready') join();
  }

  private receive(raw: string): void {
    let message: PeerMessage;
    try {
      message = JSON.parse(raw) as PeerMessage;
    } catch {
      return;
    }
    const set = this.links.get(message.n);
    if (set === undefined) return;
    for (const link of [...set]) {
      if (link.origin === message.o) continue;
      if (message.s === 'open') link.learnOpen(Number(message.u), Number(message.r), message.o);
      else if (message.s === 'closed') link.learnClosed();
    }
  }
}

class Link implements BreakerLink {
  /** The `until` (Redis time) of the latest open period this link has seen or announced. */
  private known = 0;
  private pending: Pending | undefined;
  /** The pending transition already on its way (a second connection coming back must not send it twice). */
  private sending: Pending | undefined;
  /** An `open` is on its way to Redis: a close heard meanwhile predates it. */
  private opening = 0;
  /** The peer handler is running: what it causes is not news to the others. */
  private delivering = false;
  /** Calls of this instance probing under the lock. */
  private holders = 0;
  private acquiring: Promise<boolean> | undefined;
  /** The lock may be ours in Redis (a request for it was sent). */
  private mayHoldLock = false;
  private detached = false;
  private readonly stateKey: string;
  private readonly lockKey: string;

  constructor(
    private readonly sync: BreakerSync,
    readonly name: string,
    escaped: string,
    private readonly peer: BreakerPeerHandler,
    readonly origin: string,
  ) {
    this.stateKey = sync.stateKey(escaped);
    this.lockKey = sync.lockKey(escaped);
  }

  publish(state: SharedBreakerState, openMs: number): void {
    if (this.detached || this.delivering) return;
    if (state === 'open') {
      const ms = Number.isFinite(openMs) ? Math.min(MAX_OPEN_MS, Math.max(0, Math.ceil(openMs))) : MAX_OPEN_MS;
      this.pending = { state: 'open', deadline: performance.now() + ms };
    } else if (state === 'closed') {
      this.pending = { state: 'closed', known: this.known };
    } else {
      // Half-open is each instance's own affair (they reach it on the same schedule); the
      // shared record keeps saying "open" so that a newcomer joins the half-open round.
      return;
    }
    this.flush();
  }

  /** Sends the pending transition if Redis can take it; else it waits for the next sync. */
  flush(): void {
    const pending = this.pending;
    if (pending === undefined || pending === this.sending || this.detached || !this.sync.connection.available()) return;
    const sync = this.sync;
    if (pending.state === 'open') {
      const openMs = Math.ceil(pending.deadline - performance.now());
      if (openMs <= 0) {
        // It would be over before anyone heard of it.
        this.pending = undefined;
        return;
      }
      this.opening++;
      this.sending = pending;
      sync.run(breakerOpenScript, this.stateKey, [sync.channel, this.origin, this.name, openMs, LINGER_MS], 'breaker-publish', sync.backgroundTimeoutMs).then(
        (until) => {
          this.sent(pending);
          this.opening--;
          const value = Number(until);
          if (value > this.known) this.known = value;
        },
        () => {
          this.sending = undefined;
          this.opening--;
        },
      );
      return;
    }
    this.sending = pending;
    sync.run(breakerCloseScript, this.stateKey, [sync.channel, this.origin, this.name, pending.known], 'breaker-publish', sync.backgroundTimeoutMs).then(
      (reply) => {
        this.sent(pending);
        // Refused: some instance opened it after the last open this one had heard of.
        if (Array.isArray(reply) && Number(reply[0]) === 0) this.learnOpen(Number(reply[1]), Number(reply[2]), '');
      },
      () => {
        this.sending = undefined;
      },
    );
  }

  private sent(pending: Pending): void {
    if (this.sending === pending) this.sending = undefined;
    if (this.pending === pending) this.pending = undefined;
  }

  learnOpen(until: number, remainingMs: number, by: string): void {
    if (this.detached || !(until > this.known)) return;
    this.known = until;
    if (by === this.origin) return;
    this.deliver(() => this.peer.opened(Math.max(0, remainingMs)));
  }

  learnClosed(): void {
    if (this.detached || this.opening > 0) return;
    this.deliver(() => this.peer.closed());
  }

  acquireProbe(ttlMs: number): Promise<boolean> {
    if (this.detached) return Promise.resolve(true);
    // Already ours (a breaker probing with several calls): no need to ask again.
    if (this.holders > 0) {
      this.holders++;
      return Promise.resolve(true);
    }
    this.acquiring ??= this.askForLock(ttlMs).then((allowed) => {
      this.acquiring = undefined;
      return allowed;
    });
    return this.acquiring.then((allowed) => {
      if (allowed) this.holders++;
      return allowed;
    });
  }

  private askForLock(ttlMs: number): Promise<boolean> {
    // Fail open: with Redis away, each instance probes on its own.
    if (!this.sync.connection.begin()) return Promise.resolve(true);
    const ttl = Number.isFinite(ttlMs) ? Math.min(MAX_OPEN_MS, Math.max(1, Math.ceil(ttlMs))) : MAX_OPEN_MS;
    this.mayHoldLock = true;
    return this.sync.run(probeAcquireScript, this.lockKey, [this.origin, ttl], 'probe').then(
      (reply) => Array.isArray(reply) && Number(reply[0]) === 1,
      () => true,
    );
  }

  releaseProbe(): void {
    if (this.holders === 0) return;
    if (--this.holders > 0) return;
    if (!this.mayHoldLock) return;
    this.mayHoldLock = false;
    if (!this.sync.connection.available()) return; // the lock expires by itself
    this.sync.run(probeReleaseScript, this.lockKey, [this.origin], 'probe', this.sync.backgroundTimeoutMs).then(noop, noop);
  }

  detach(): void {
    if (this.detached) return;
    if (this.holders > 0) {
      this.holders = 1;
      this.releaseProbe();
    }
    this.detached = true;
    this.pending = undefined;
    this.sync.detach(this);
  }

  private deliver(handler: () => void): void {
    this.delivering = true;
    try {
      handler();
    } catch {
      // The breaker's handler failing must not stop the others from hearing.
    } finally {
      this.delivering = false;
    }
  }
}

/** `:` separates the parts of a key; escaping it keeps names like `a:b` from colliding. */
export function escapeName(name: string): string {
  return name.replace(/[%:]/g, (c) => (c === '%' ? '%25' : '%3A'));
}

function noop(): void {}
