// The HTTP mapping, written once for every adapter: which status, headers and body a
// rejection or a degraded answer gets. Adapters only copy an `HttpAnswer` onto their
// framework's response.

import { isRejectionReason, type GuardRejection, type RejectionReason } from '../errors.js';
import type { RateLimitInfo } from '../policy.js';

/** Why the guard answered instead of the handler: a rejection's reason, or `error` for a failed handler. */
export type AnswerReason = RejectionReason | 'error';

/** Where a degraded answer's `data` came from. */
export type DegradedSource = 'fallback' | 'cache';

/** A complete answer, ready to write: adapters send it as is. Header names are lower case. */
export interface HttpAnswer {
  status: number;
  headers: Record<string, string>;
  body: string | Uint8Array;
}

/** What `onReject` returns: rendered in place of the default rejection. */
export interface RejectResponse {
  status: number;
  headers?: Readonly<Record<string, string | number | readonly string[]>>;
  /** A string or bytes are sent as they are; anything else is sent as JSON. */
  body?: unknown;
}

/** The content type of the guard's JSON answers. */
// Exactly what the SPEC names: JSON is UTF-8 by definition (RFC 8259), a charset adds nothing.
export const JSON_TYPE = 'application/json';
const TEXT_TYPE = 'text/plain; charset=utf-8';
const BYTES_TYPE = 'application/octet-stream';

const STATUS_TEXT: Record<number, string> = {
  429: 'Too Many Requests',
  500: 'Internal Server Error',
  502: 'Bad Gateway',
  503: 'Service Unavailable',
  504: 'Gateway Timeout',
};

/**
 * Headers of the guard's own answers that would contradict a body the handler had started
 * to describe. The guard removes them before it answers; other headers (CORS, request ids,
 * cookies set by middleware) stay.
 */
export const REPRESENTATION_HEADERS: readonly string[] = [
  'content-type',
  'content-length',
  'content-encoding',
  'content-language',
  'content-range',
  'content-disposition',
  'content-location',
  'transfer-encoding',
  'etag',
  'last-modified',
  'cache-control',
  'expires',
  'location',
  'retry-after',
];

/**
 * The status a rejection is answered with: its own (503, 429), or `timeoutStatus` for a timeout.
 *
 * @example rejectionStatus(new TimeoutError(100), 504); // 504
 */
export function rejectionStatus(rejection: GuardRejection, timeoutStatus: number): number {
  return rejection.reason === 'timeout' ? timeoutStatus : rejection.status;
}

/**
 * `Retry-After` in whole seconds, at least 1: the wait the guard knows (an open breaker's
 * remaining time, a rate-limit window), rounded up, else 1.
 *
 * @example retryAfterSeconds(29_100); // 30
 */
export function retryAfterSeconds(retryAfterMs: number | undefined): number {
  if (retryAfterMs === undefined || !(retryAfterMs > 0)) return 1;
  return Number.isFinite(retryAfterMs) ? Math.max(1, Math.ceil(retryAfterMs / 1000)) : 1;
}

/**
 * The `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers (reset in whole
 * seconds, rounded up) for what `rateLimit` recorded in the call's context.
 *
 * @example rateLimitHeaders({ limit: 100, remaining: 0, resetMs: 1500 }); // { 'ratelimit-limit': '100', 'ratelimit-remaining': '0', 'ratelimit-reset': '2' }
 */
export function rateLimitHeaders(info: RateLimitInfo): Record<string, string> {
  return {
    'ratelimit-limit': String(info.limit),
    'ratelimit-remaining': String(Math.max(0, info.remaining)),
    'ratelimit-reset': String(Math.max(0, Math.ceil(info.resetMs / 1000))),
  };
}

/**
 * The default answer to a rejection: `503` (`429` when rate limited, `timeoutStatus` for a
 * timeout), `Retry-After`, and `{"error":"Service Unavailable","reason":"circuit_open","retryAfter":30}`.
 *
 * @example rejectionAnswer(new CircuitOpenError(30_000), 503).body; // '{"error":"Service Unavailable","reason":"circuit_open","retryAfter":30}'
 */
export function rejectionAnswer(rejection: GuardRejection, timeoutStatus: number, rateLimit?: RateLimitInfo): HttpAnswer {
  const status = rejectionStatus(rejection, timeoutStatus);
  const retryAfter = retryAfterSeconds(rejection.retryAfterMs);
  const headers: Record<string, string> = { 'content-type': JSON_TYPE, 'retry-after': String(retryAfter) };
  if (rateLimit !== undefined) Object.assign(headers, rateLimitHeaders(rateLimit));
  // Written out rather than JSON.stringify'd (a third of a refusal's own cost): every part
  // is a known constant or an integer; only a reason from outside bulwark is escaped.
  const reason = rejection.reason;
  const quotedReason = isRejectionReason(reason) ? `"${reason}"` : JSON.stringify(reason);
  const body = `{"error":"${STATUS_TEXT[status] ?? 'Service Unavailable'}","reason":${quotedReason},"retryAfter":${retryAfter}}`;
  return { status, headers, body };
}

/**
 * The degraded answer: status 200 and `{"data":…,"source":"fallback"|"cache","status":"degraded","reason":…}`.
 * Throws when `data` cannot be serialised (a cycle, a BigInt): callers treat that like a
 * fallback that threw.
 *
 * @example degradedAnswer({ items: [] }, 'fallback', 'circuit_open').body; // '{"data":{"items":[]},"source":"fallback","status":"degraded","reason":"circuit_open"}'
 */
export function degradedAnswer(data: unknown, source: DegradedSource, reason: AnswerReason, rateLimit?: RateLimitInfo): HttpAnswer {
  const body = JSON.stringify({ data: data === undefined ? null : data, source, status: 'degraded', reason });
  // A 200 is cacheable by default: a proxy must not keep serving a stand-in once the route heals.
  const headers: Record<string, string> = { 'content-type': JSON_TYPE, 'cache-control': 'no-store' };
  if (rateLimit !== undefined) Object.assign(headers, rateLimitHeaders(rateLimit));
  return { status: 200, headers, body };
}

/**
 * Turns what `onReject` returned into an answer; `Retry-After` and `RateLimit-*` are added
 * unless it set them. Returns undefined for a malformed result (the default answer stands).
 *
 * @example
 * const standard = rejectionAnswer(rejection, 503);
 * customRejectionAnswer({ status: 503, headers: { 'content-type': 'application/problem+json' }, body: { title: 'Unavailable' } }, standard);
 */
export function customRejectionAnswer(custom: RejectResponse, fallback: HttpAnswer): HttpAnswer | undefined {
  if (typeof custom !== 'object' || custom === null) return undefined;
  const status = custom.status;
  if (!Number.isInteger(status) || status < 200 || status > 599) return undefined;
  const headers: Record<string, string> = {};
  if (custom.headers !== undefined && custom.headers !== null) {
    for (const [name, value] of Object.entries(custom.headers)) {
      if (value === undefined || value === null) continue;
      headers[name.toLowerCase()] = Array.isArray(value) ? value.join(', ') : String(value);
    }
  }
  for (const name of ['retry-after', 'ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset']) {
    const value = fallback.headers[name];
    if (value !== undefined && headers[name] === undefined) headers[name] = value;
  }
  const raw = custom.body;
  let body: string | Uint8Array;
  let type: string;
  if (typeof raw === 'string') {
    body = raw;
    type = TEXT_TYPE;
  } else if (raw instanceof Uint8Array) {
    body = raw;
    type = BYTES_TYPE;
  } else if (raw === undefined || raw === null) {
    body = '';
    type = TEXT_TYPE;
  } else {
    body = JSON.stringify(raw);
    type = JSON_TYPE;
  }
  headers['content-type'] ??= type;
  return { status, headers, body };
}
