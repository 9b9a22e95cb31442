import { parseRetryAfter } from './backoff.js';
import type { Policy } from './policy.js';

/**
 * A response whose status says the upstream failed (`408`, `429` or `5xx`), turned into an
 * error by `guardedFetch` so that `retry` retries it and breakers count it.
 *
 * Its `response` keeps the status, headers and URL, but not the body: `guardedFetch`
 * cancels the body so that no connection stays held by a body nobody reads (one per failed
 * try, under retries).
 *
 * @example
 * try { await api(url); }
 * catch (error) { if (error instanceof HttpStatusError && error.status === 429) backOff(error.retryAfterMs); }
 */
export class HttpStatusError extends Error {
  readonly status: number;
  readonly response: Response;
  /** From the response's `Retry-After` (delay-seconds or HTTP-date), when it has one. */
  readonly retryAfterMs: number | undefined;
  readonly url: string;
  readonly code = 'BULWARK_HTTP_STATUS';

  constructor(response: Response, url: string = response.url) {
    super(`upstream answered ${response.status}${response.statusText ? ` ${response.statusText}` : ''}${url ? ` (${url})` : ''}`);
    this.name = 'HttpStatusError';
    this.status = response.status;
    this.response = response;
    this.retryAfterMs = parseRetryAfter(response.headers.get('retry-after'));
    this.url = url;
  }
}

/**
 * Statuses `guardedFetch` turns into an `HttpStatusError`: 408, 429 and every 5xx.
 * @example isFailureStatus(503); // true, and isFailureStatus(404) is false
 */
export function isFailureStatus(status: number): boolean {
  return status === 408 || status === 429 || (status >= 500 && status <= 599);
}

/**
 * A `fetch` that runs each request through `policy`. The request's signal is the policy's
 * (it aborts on the caller's `init.signal`, or the `Request`'s own, and on a timeout of
 * the policy), and a `408`, `429` or `5xx` answer becomes an `HttpStatusError` (with
 * `status`, `response`, `retryAfterMs`), so that `retry` retries it and a breaker counts it.
 * Other answers, 4xx included, come back as they are.
 *
 * The body of an answer turned into an error is cancelled, so failed tries do not hold
 * connections. A `Request` with a body is cloned for every try, so retries can send it
 * again; a `ReadableStream` given as `init.body` can be sent only once.
 *
 * @example
 * const api = guardedFetch(pipeline(circuitBreaker({ name: 'prices' }), retry(), timeout(2000)));
 * const res = await api('https://prices.internal/v1/eur', { headers: { accept: 'application/json' } });
 */
export function guardedFetch(policy: Policy, fetchImpl: typeof fetch = globalThis.fetch): typeof fetch {
  if (typeof policy !== 'object' || policy === null || typeof policy.execute !== 'function') {
    throw new TypeError(`guardedFetch: policy must be a policy (an object with execute()), got ${policy === null ? 'null' : typeof policy}`);
  }
  if (typeof fetchImpl !== 'function') throw new TypeError(`guardedFetch: fetchImpl must be a function, got ${typeof fetchImpl}`);

  return function guardedFetch(input: string | URL | Request, init?: RequestInit): Promise<Response> {
    const isRequest = typeof Request === 'function' && input instanceof Request;
    const callerSignal = init?.signal ?? (isRequest ? input.signal : undefined) ?? undefined;
    const replay = isRequest && input.body !== null;
    return policy.execute(async (ctx) => {
      // The only read of ctx.signal: a signal (an AbortController) is made for fetch alone.
      const response = await fetchImpl(replay ? input.clone() : input, { ...init, signal: ctx.signal });
      if (!isFailureStatus(response.status)) return response;
      discardBody(response);
      throw new HttpStatusError(response, response.url || urlOf(input));
    }, callerSignal);
  } as typeof fetch;
}

function discardBody(response: Response): void {
  if (response.body === null || response.bodyUsed) return;
  response.body.cancel().catch(() => {
    // A body that fails while being cancelled has nothing left to give back.
  });
}

function urlOf(input: string | URL | Request): string {
  if (typeof input === 'string') return input;
  if (input instanceof URL) return input.href;
  return input.url;
}
