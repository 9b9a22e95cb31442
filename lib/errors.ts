/** Why a guard refused or cut short a call. */
export type RejectionReason = 'circuit_open' | 'bulkhead_full' | 'timeout' | 'rate_limited' | 'overloaded';

// A brand on the prototype, not `instanceof`, lets two copies of bulwark in one
// node_modules tree (a library and an app, say) recognise each other's rejections.
const BRAND = Symbol.for('bulwark.GuardRejection');
const DISCONNECT_BRAND = Symbol.for('bulwark.ClientDisconnectedError');

const CODES: Readonly<Record<RejectionReason, string>> = {
  circuit_open: 'BULWARK_CIRCUIT_OPEN',
  bulkhead_full: 'BULWARK_BULKHEAD_FULL',
  timeout: 'BULWARK_TIMEOUT',
  rate_limited: 'BULWARK_RATE_LIMITED',
  overloaded: 'BULWARK_OVERLOADED',
};

/** @internal Whether `reason` is one of bulwark's own rejection reasons (the HTTP answers write those without escaping). */
export function isRejectionReason(reason: string): reason is RejectionReason {
  return Object.hasOwn(CODES, reason);
}

/**
 * Base class of every error a guard raises instead of running (or finishing) a call.
 *
 * @example
 * try { await policy.execute(callUpstream); }
 * catch (err) { if (isGuardRejection(err)) res.status(err.status).end(); else throw err; }
 */
export class GuardRejection extends Error {
  readonly reason: RejectionReason;
  /** HTTP status an adapter answers with (503, or 429 for rate limits). */
  readonly status: number;
  /** How long the caller should wait before trying again, when the guard knows it. */
  readonly retryAfterMs: number | undefined;
  /** Stable machine-readable code, e.g. `BULWARK_CIRCUIT_OPEN`. */
  readonly code: string;
  /** Name of the policy that rejected, when it has one. */
  readonly policy: string | undefined;

  constructor(reason: RejectionReason, status: number, message: string, retryAfterMs?: number, policy?: string) {
    super(message);
    this.name = new.target.name;
    this.reason = reason;
    this.status = status;
    this.retryAfterMs = retryAfterMs;
    this.code = CODES[reason];
    this.policy = policy;
  }

  static override [Symbol.hasInstance](value: unknown): boolean {
    if (this !== GuardRejection) return Function.prototype[Symbol.hasInstance].call(this, value);
    return isGuardRejection(value);
  }
}
Object.defineProperty(GuardRejection.prototype, BRAND, { value: true });

/** True for any bulwark rejection, even one made by another copy of the package. */
export function isGuardRejection(value: unknown): value is GuardRejection {
  return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[BRAND] === true;
}

/** The breaker is open (or half-open with every probe taken): the call was not made. */
export class CircuitOpenError extends GuardRejection {
  constructor(retryAfterMs?: number, policy?: string) {
    super('circuit_open', 503, `circuit${policy ? ` "${policy}"` : ''} is open`, retryAfterMs, policy);
  }
}

/** Every slot and every queue place of a bulkhead is taken, or the wait in its queue ran out. */
export class BulkheadFullError extends GuardRejection {
  constructor(policy?: string, retryAfterMs?: number) {
    super('bulkhead_full', 503, `bulkhead${policy ? ` "${policy}"` : ''} is full`, retryAfterMs, policy);
  }
}

/** The call took longer than its timeout; its signal was aborted with this error as the reason. */
export class TimeoutError extends GuardRejection {
  readonly timeoutMs: number;
  constructor(timeoutMs: number, policy?: string) {
    super('timeout', 503, `timed out after ${timeoutMs} ms`, undefined, policy);
    this.timeoutMs = timeoutMs;
  }
}

/** The caller's key used up its budget; `retryAfterMs` is the time until it has room again. */
export class RateLimitError extends GuardRejection {
  constructor(retryAfterMs: number, policy?: string) {
    super('rate_limited', 429, 'rate limit exceeded', retryAfterMs, policy);
  }
}

/** The process (load shedder) or the adaptive concurrency limit refused the call. */
export class OverloadError extends GuardRejection {
  constructor(policy?: string, retryAfterMs?: number) {
    super('overloaded', 503, 'service is overloaded', retryAfterMs, policy);
  }
}

/**
 * Abort reason used when the client went away (or the caller's request ended): unlike a
 * timeout, it says nothing about the dependency, so breakers count it neither way.
 */
export class ClientDisconnectedError extends Error {
  readonly code = 'BULWARK_CLIENT_DISCONNECTED';
  constructor(message = 'the client closed the connection') {
    super(message);
    this.name = 'ClientDisconnectedError';
  }
}
Object.defineProperty(ClientDisconnectedError.prototype, DISCONNECT_BRAND, { value: true });

export function isClientDisconnected(value: unknown): value is ClientDisconnectedError {
  return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[DISCONNECT_BRAND] === true;
}

/**
 * Builds an error without capturing a stack trace. Rejections are control flow on the
 * overload path, where a stack (~5 µs each) would make shedding itself expensive.
 */
export function withoutStack<E extends Error>(make: () => E): E {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return make();
  } finally {
    Error.stackTraceLimit = limit;
  }
}
