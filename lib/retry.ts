import { backoffDelay, backoffOptions, retryAfterOf, type Backoff, type BackoffOptions } from './backoff.js';
import type { Scope } from './cancellation.js';
import { systemClock, type Clock } from './clock.js';
import { isGuardRejection } from './errors.js';
import { BasePolicy, defaultName, run, type Call, type InternalFunction, type PolicyEvents } from './policy.js';
import { clockOption, duration, func, knownKeys, name as nameOption, optionsObject, positiveInteger } from './validate.js';

export type { BackoffOptions, Jitter } from './backoff.js';

export interface RetryOptions {
  /** Total tries, the first one included. Default 3. */
  attempts?: number;
  /** Wait between tries. Default `{ initialMs: 100, maxMs: 10000, multiplier: 2, jitter: 'full' }`. */
  backoff?: BackoffOptions;
  /**
   * Whether a failure is worth another try; `attempt` is the try that failed (1 for the
   * first). Default `isTransientError`: network errors, statuses 408, 429, 500, 502, 503,
   * 504, and bulwark's own `TimeoutError`.
   */
  retryOn?: (error: unknown, attempt: number) => boolean;
  /**
   * Longest `Retry-After` (or `retryAfterMs`) honoured. A failure that asks for a longer
   * wait ends the retries at once (its error is thrown) instead of sleeping. Default 60000.
   */
  maxRetryAfterMs?: number;
  /** Source of jitter, a function returning a number in [0, 1). Default `Math.random`. */
  random?: () => number;
  /** Used in events, metrics, the dashboard. Default `retry-<n>`. */
  name?: string;
  /** Time source for the durations in events, for tests. Default: the monotonic system clock. */
  clock?: Clock;
}

export interface RetryStats {
  /** The configured `attempts`. */
  maxAttempts: number;
  /** Calls since creation. */
  calls: number;
  /** Extra tries made (waits slept), since creation. */
  retries: number;
  /** Calls that ended with a value. */
  successes: number;
  /** Calls that ended with an error (tries used up, not retryable, or aborted). */
  failures: number;
}

export interface RetryEvents extends PolicyEvents {
  /**
   * A try failed and another one follows after `delayMs`. `attempt` is the number of the
   * try to come (2 for the first retry), as the function will see it in `ctx.attempt`.
   */
  retry: { attempt: number; delayMs: number; error: unknown };
}

const KEYS = ['attempts', 'backoff', 'retryOn', 'maxRetryAfterMs', 'random', 'name', 'clock'] as const;

/**
 * Statuses worth another try: the server says "later", not "never".
 * @example RETRYABLE_STATUSES.has(503); // true
 */
export const RETRYABLE_STATUSES: ReadonlySet<number> = new Set([408, 429, 500, 502, 503, 504]);

/**
 * Error codes of connections that failed or broke (Node's `net`/`dns`, and undici's).
 * @example TRANSIENT_ERROR_CODES.has('ECONNRESET'); // true
 */
export const TRANSIENT_ERROR_CODES: ReadonlySet<string> = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
]);

/**
 * The default `retryOn`. True for:
 * - an error whose `status` (or `statusCode`) is 408, 429, 500, 502, 503 or 504 (never
 *   400, 401, 403, 404 or any other: asking again gets the same answer);
 * - a network error: `code` ECONNRESET, ECONNREFUSED, ETIMEDOUT, EPIPE, EAI_AGAIN,
 *   ENETUNREACH, EHOSTUNREACH or an undici socket/connect/headers/body timeout, on the error
 *   or along its `cause` chain (fetch throws `TypeError('fetch failed')` with the real
 *   error as `cause`);
 * - bulwark's `TimeoutError`. No other `GuardRejection`: an open circuit, a full bulkhead
 *   or a rate limit is not a transient failure, and retrying it feeds the overload.
 *
 * @example
 * retry({ retryOn: (error, attempt) => isTransientError(error) || error instanceof StaleReadError });
 */
export function isTransientError(error: unknown): boolean {
  if (typeof error !== 'object' || error === null) return false;
  if (isGuardRejection(error)) return error.reason === 'timeout';
  const { status, statusCode } = error as { status?: unknown; statusCode?: unknown };
  const code = typeof status === 'number' ? status : statusCode;
  if (typeof code === 'number') return RETRYABLE_STATUSES.has(code);
  return isNetworkError(error, 0);
}

function isNetworkError(error: object, depth: number): boolean {
  const code = (error as { code?: unknown }).code;
  if (typeof code === 'string' && TRANSIENT_ERROR_CODES.has(code)) return true;
  if (depth >= 4) return false;
  // Happy eyeballs reports every address tried in an AggregateError.
  const errors = (error as { errors?: unknown }).errors;
  if (Array.isArray(errors) && errors.some((inner) => typeof inner === 'object' && inner !== null && isNetworkError(inner, depth + 1))) return true;
  const cause = (error as { cause?: unknown }).cause;
  return typeof cause === 'object' && cause !== null && isNetworkError(cause, depth + 1);
}

/**
 * Runs the function again when it fails with a transient error, waiting an exponential,
 * jittered backoff between tries, and at least what the error's `retryAfterMs` (or its
 * response's `Retry-After`) asks.
 *
 * Cancellation: no try starts once the call's signal has aborted, and a wait between tries
 * ends at once when it aborts. The call then rejects with the signal's reason (a
 * `TimeoutError` from an outer timeout, a `ClientDisconnectedError`, the caller's own
 * reason): the caller gave up, and the reason says why, the same way `fetch` does. A try
 * that fails after the abort rejects with its own error (usually that same reason).
 *
 * Retry is for outbound calls (a route handler cannot answer twice): put it inside the
 * breaker, around a timeout per try: `pipeline(breaker, retry(), timeout(1000))`.
 *
 * @example
 * const upstream = retry({ attempts: 4, backoff: { initialMs: 200, maxMs: 5000 } });
 * const res = await upstream.execute(({ signal, attempt }) => fetchPrices(signal, attempt));
 */
export function retry(options?: RetryOptions): Retry {
  return new Retry(options);
}

/**
 * The policy `retry()` returns; its options, filled in, are readable as properties.
 *
 * @example
 * const guard = new Retry({ attempts: 5 });
 * guard.backoff; // { initialMs: 100, maxMs: 10000, multiplier: 2, jitter: 'full' }
 */
export class Retry extends BasePolicy<RetryStats, RetryEvents> {
  readonly kind = 'retry';
  readonly attempts: number;
  readonly backoff: Readonly<Backoff>;
  readonly maxRetryAfterMs: number;
  private readonly retryOn: (error: unknown, attempt: number) => boolean;
  private readonly random: () => number;
  private readonly clock: Clock;
  private calls = 0;
  private retries = 0;
  private successes = 0;
  private failures = 0;

  constructor(options?: RetryOptions) {
    const o = optionsObject('retry', options);
    knownKeys('retry', o, KEYS);
    super(nameOption('retry', o.name) ?? defaultName('retry'));
    this.attempts = positiveInteger('retry', 'attempts', o.attempts ?? 3);
    this.backoff = Object.freeze(backoffOptions('retry', o.backoff));
    this.maxRetryAfterMs = duration('retry', 'maxRetryAfterMs', o.maxRetryAfterMs ?? 60_000, true);
    this.retryOn = o.retryOn === undefined ? isTransientError : func('retry', 'retryOn', o.retryOn);
    this.random = o.random === undefined ? Math.random : func('retry', 'random', o.random);
    this.clock = clockOption('retry', o.clock) ?? systemClock;
  }

  async [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    this.calls++;
    const scope = call.scope;
    const started = this.hearsOutcomes() ? this.clock.now() : undefined;
    for (let attempt = 1; ; attempt++) {
      if (scope !== undefined && scope.aborted) return this.fail(scope.reason, started);
      let error: unknown;
      try {
        const value = await fn(call.attempt === attempt ? call : call.withAttempt(attempt));
        this.successes++;
        if (started !== undefined && this.events?.has('success')) this.events.emit('success', { durationMs: this.clock.now() - started });
        return value;
      } catch (caught) {
        error = caught;
      }
      const delayMs = this.delayAfter(error, attempt, scope);
      if (delayMs === undefined) return this.fail(error, started);
      this.retries++;
      if (this.events?.has('retry')) this.events.emit('retry', { attempt: attempt + 1, delayMs, error });
      if (delayMs > 0) {
        try {
          await sleep(delayMs, scope);
        } catch (reason) {
          return this.fail(reason, started);
        }
      }
    }
  }

  stats(): RetryStats {
    return { maxAttempts: this.attempts, calls: this.calls, retries: this.retries, successes: this.successes, failures: this.failures };
  }

  /** How long to wait before the next try, or undefined to give up with `error`. */
  private delayAfter(error: unknown, attempt: number, scope: Scope | undefined): number | undefined {
    if (attempt >= this.attempts) return undefined;
    // The failure is most likely the abort itself; either way the caller is gone.
    if (scope !== undefined && scope.aborted) return undefined;
    let retryable: boolean;
    try {
      retryable = Boolean(this.retryOn(error, attempt));
    } catch {
      // A broken predicate must not hide the failure it was asked about.
      return undefined;
    }
    if (!retryable) return undefined;
    const delayMs = backoffDelay(this.backoff, attempt, this.random);
    const retryAfterMs = retryAfterOf(error);
    if (retryAfterMs === undefined) return delayMs;
    if (retryAfterMs > this.maxRetryAfterMs) return undefined;
    return Math.max(delayMs, retryAfterMs);
  }

  private fail(error: unknown, started: number | undefined): never {
    this.failures++;
    if (started !== undefined && this.events?.has('failure')) this.events.emit('failure', { error, durationMs: this.clock.now() - started });
    throw error;
  }
}

/**
 * Waits `ms`, or rejects with the abort reason as soon as `scope` aborts. The timer is
 * deliberately not `unref()`ed: the wait is part of a call someone awaits, and a script
 * must not exit in the middle of it.
 */
function sleep(ms: number, scope: Scope | undefined): Promise<void> {
  // Timers count whole milliseconds and Node truncates: round up, never wait less.
  const wait = Math.ceil(ms);
  return new Promise<void>((resolve, reject) => {
    if (scope === undefined) {
      setTimeout(resolve, wait);
      return;
    }
    const timer = setTimeout(() => {
      stopListening();
      resolve();
    }, wait);
    const stopListening = scope.onAbort((reason) => {
      clearTimeout(timer);
      reject(reason);
    });
  });
}
