import type { Emitter } from '../../events.js';
import type { RedisCallback, RedisClientLike } from './client.js';
import type { Script } from './scripts.js';

/** What the store was doing when Redis failed it. */
export type RedisOperation = 'rate-limit' | 'breaker-publish' | 'breaker-sync' | 'probe' | 'connection' | 'subscriber';

export interface RedisStoreEvents {
  /**
   * A command failed or took longer than `commandTimeoutMs`, or a connection reported an
   * error. The decision it was for was made locally (or refused, with `failClosed`).
   */
  error: { error: Error; operation: RedisOperation };
}

/** The `logger` option: pino, bunyan, winston and `console` all fit. */
export interface RedisStoreLogger {
  warn(message: string): void;
}

/** The error reported for a command that did not answer within its time bound. */
export class RedisTimeoutError extends Error {
  readonly code = 'BULWARK_REDIS_TIMEOUT';
  constructor(readonly timeoutMs: number) {
    super(`redis did not answer within ${timeoutMs} ms`);
    this.name = 'RedisTimeoutError';
  }
}

// After a failure, decisions stay local this long before one of them tries Redis again: a
// slow Redis then costs one waiting decision per second, not every decision.
const RETRY_MS = 1000;
// At most one log line per this long; the ones in between are counted into the next.
const LOG_EVERY_MS = 10_000;

/**
 * A request-path command waiting for its reply. The connection keeps them in a list of its
 * own (the links are fields of the command: nothing is allocated per command), oldest
 * first, which is also deadline order since they all wait the same time.
 */
export interface TimedCommand {
  /** 0 waiting, 1 past its deadline (a reply may still win this turn), 2 settled. */
  phase: 0 | 1 | 2;
  /** performance.now() after which it has waited too long. */
  deadline: number;
  older: TimedCommand | undefined;
  newer: TimedCommand | undefined;
  /** The command did not answer within `commandTimeoutMs`; already counted and reported. */
  timedOut(error: RedisTimeoutError): void;
  /** The connection went away before the reply came (or before the command was sent). */
  lost(): void;
}

/**
 * The store's view of its client: whether a command may be sent now, a time bound on every
 * command, and the error accounting (counters, the `error` event, a rate-limited log).
 */
export class Connection {
  errors = 0;
  timeouts = 0;
  /** Before this (performance.now()), Redis is not asked; 0 while it answers. */
  private retryAt = 0;
  /** A decision is trying Redis again after a failure; the others stay local meanwhile. */
  private trying = false;
  private lastLog = -Infinity;
  private unlogged = 0;
  // Every request-path command waits the same time, so one timer serves them all (a timer
  // per decision costs more than the rest of the bookkeeping together).
  private oldest: TimedCommand | undefined;
  private newest: TimedCommand | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private overdue: TimedCommand[] = [];
  constructor(
    readonly client: RedisClientLike,
    readonly timeoutMs: number,
    private readonly events: Emitter<RedisStoreEvents>,
    private readonly logger: RedisStoreLogger | undefined,
  ) {}

  /**
   * Runs `script` on `key` at once, timed from now as `command`; the reply goes to
   * `callback`. Each command is its own write: corking the
   * socket to send the commands of one tick together saves system calls, but measured on
   * two cores it halved throughput at 16 concurrent decisions, because Redis then gets the
   * whole tick at once and the two processes take turns instead of working side by side.
   */
  send(command: TimedCommand, script: Script, key: string, callback: RedisCallback): void {
    this.track(command);
    try {
      this.client.evalsha(script.sha, 1, key, callback);
    } catch (error) {
      // A client that throws instead of reporting: decided locally.
      callback(error instanceof Error ? error : new Error(String(error)));
    }
  }

  /** Starts timing `command` (sent just now). */
  track(command: TimedCommand): void {
    command.phase = 0;
    command.deadline = performance.now() + this.timeoutMs;
    command.older = this.newest;
    command.newer = undefined;
    if (this.newest !== undefined) this.newest.newer = command;
    else this.oldest = command;
    this.newest = command;
    if (this.timer === undefined) this.arm(this.timeoutMs);
  }

  /**
   * The reply (or error) of a tracked command came: true when it still counts, false when
   * the command was already decided without it (timed out, connection lost).
   */
  settle(command: TimedCommand): boolean {
    if (command.phase === 2) return false;
    if (command.phase === 0) this.unlink(command);
    command.phase = 2;
    return true;
  }

  /**
   * The connection closed: what was waiting for a reply will not get one soon (ioredis
   * sends it again after reconnecting, at best), so it is decided now, not at its deadline.
   */
  closed(): void {
    for (let command = this.oldest; command !== undefined; command = this.oldest) {
      this.unlink(command);
      command.phase = 2;
      command.lost();
    }
    for (const command of this.overdue) {
      if (command.phase !== 1) continue;
      command.phase = 2;
      command.lost();
    }
  }

  private unlink(command: TimedCommand): void {
    const { older, newer } = command;
    if (older !== undefined) older.newer = newer;
    else this.oldest = newer;
    if (newer !== undefined) newer.older = older;
    else this.newest = older;
    command.older = undefined;
    command.newer = undefined;
  }

  private arm(delayMs: number): void {
    // Node timers take whole milliseconds; rounding down would fire before the deadline.
    this.timer = setTimeout(this.expire, Math.max(1, Math.ceil(delayMs)));
    this.timer.unref();
  }

  private readonly expire = (): void => {
    this.timer = undefined;
    const now = performance.now();
    let command = this.oldest;
    for (; command !== undefined && command.deadline <= now; command = this.oldest) {
      this.unlink(command);
      command.phase = 1;
      // A reply already waiting in the socket is read in the poll phase, which runs
      // between timers and setImmediate: an event loop that was blocked past the deadline
      // does not make Redis look slow.
      if (this.overdue.push(command) === 1) setImmediate(this.timeOutOverdue);
    }
    if (command !== undefined) this.arm(command.deadline - now);
  };

  private readonly timeOutOverdue = (): void => {
    const overdue = this.overdue;
    this.overdue = [];
    for (const command of overdue) {
      if (command.phase !== 1) continue;
      command.phase = 2;
      this.timeouts++;
      const error = new RedisTimeoutError(this.timeoutMs);
      this.failed(error, 'rate-limit');
      command.timedOut(error);
    }
  };

  get connected(): boolean {
    return this.client.status === 'ready' && this.retryAt === 0;
  }

  /**
   * Whether a request-path command may go to Redis now. Never waits: a client that is not
   * connected would park the command in ioredis's offline queue (fastify-rate-limit#84).
   * While recovering from a failure, one caller at a time is let through as the trial.
   */
  begin(): boolean {
    if (this.client.status !== 'ready') return false;
    if (this.retryAt === 0) return true;
    if (this.trying || performance.now() < this.retryAt) return false;
    this.trying = true;
    return true;
  }

  /** Whether a background command (breaker sync) may go to Redis now. */
  available(): boolean {
    return this.client.status === 'ready' && (this.retryAt === 0 || performance.now() >= this.retryAt);
  }

  /** The client (re)connected: whatever failed before, try Redis again at once. */
  reset(): void {
    this.retryAt = 0;
    this.trying = false;
  }

  /**
   * Settles with `command`'s outcome, or rejects with a `RedisTimeoutError` after
   * `timeoutMs`. A late reply is dropped. For the occasional command (breakers); rate-limit
   * decisions use `track`/`settle`.
   */
  timed<T>(command: Promise<T>, operation: RedisOperation, timeoutMs = this.timeoutMs): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const timer = setTimeout(() => {
        // A reply already waiting in the socket is read in the poll phase, which runs
        // between timers and setImmediate: an event loop that was blocked past the deadline
        // does not make Redis look slow.
        setImmediate(() => {
          if (done) return;
          done = true;
          this.timeouts++;
          const error = new RedisTimeoutError(timeoutMs);
          this.failed(error, operation);
          reject(error);
        });
      }, timeoutMs);
      timer.unref();
      command.then(
        (value) => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          this.succeeded();
          resolve(value);
        },
        (error: unknown) => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          const failure = error instanceof Error ? error : new Error(String(error));
          this.failed(failure, operation);
          reject(failure);
        },
      );
    });
  }

  succeeded(): void {
    if (this.retryAt !== 0) this.reset();
  }

  failed(error: Error, operation: RedisOperation): void {
    // A reply error (a script error, WRONGTYPE on a key someone else wrote) concerns that
    // command only; anything else (timeout, lost connection) says Redis cannot be relied on.
    if (error.name === 'ReplyError') {
      // It answered, so it is up.
      this.reset();
    } else {
      this.retryAt = performance.now() + RETRY_MS;
      this.trying = false;
    }
    this.report(error, operation);
  }

  /** Counts, emits and (rate-limited) logs an error. */
  report(error: Error, operation: RedisOperation): void {
    this.errors++;
    if (this.events.has('error')) this.events.emit('error', { error, operation });
    if (this.logger === undefined) return;
    const now = performance.now();
    if (now - this.lastLog < LOG_EVERY_MS) {
      this.unlogged++;
      return;
    }
    const more = this.unlogged > 0 ? ` (${this.unlogged} more store errors since the last report)` : '';
    this.lastLog = now;
    this.unlogged = 0;
    try {
      this.logger.warn(`bulwark/redis: ${operation} failed: ${error.message}${more}`);
    } catch {
      // A broken logger must not break the request that happened to report.
    }
  }
}
