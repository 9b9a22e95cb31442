// The HTTP side of bulwark, shared by the Express, Koa and Fastify adapters: options, the
// mapping of rejections and failures to answers, the response cache, and the per-request
// exchange that decides the one answer a client gets. No framework is imported here.

import type { IncomingHttpHeaders } from 'node:http';
import type { HttpRequest } from './http/cache.js';

export {
  customRejectionAnswer,
  degradedAnswer,
  JSON_TYPE,
  rateLimitHeaders,
  REPRESENTATION_HEADERS,
  rejectionAnswer,
  rejectionStatus,
  retryAfterSeconds,
  type AnswerReason,
  type DegradedSource,
  type HttpAnswer,
  type RejectResponse,
} from './http/answers.js';
export { MAX_CACHED_BODY, ResponseCache, type CacheOptions, type HeaderReader, type HttpRequest } from './http/cache.js';
export { Exchange, EXCHANGE_KEY, exchangeOf, exposeSignal, FailedResponseError, findDescriptor, provideSignal, type RawResponse, type ResponseTarget } from './http/exchange.js';
export { ResponseGate, writeAnswer } from './http/node-response.js';
export { defaultIsFailure, errorStatus, httpGuard, HttpGuard, type Fallback, type FallbackContext, type GuardOptions } from './http/options.js';

/**
 * The request as guards and key functions see it, from what the framework resolved:
 * `ip` honours the framework's trust-proxy setting; `url` is the URL as received.
 *
 * @example httpRequest(req.ip, req.method, req.originalUrl, req.headers);
 */
export function httpRequest(ip: string | undefined, method: string, url: string, headers: IncomingHttpHeaders): HttpRequest {
  const query = url.indexOf('?');
  return { ip: ip ?? '', method, path: query === -1 ? url : url.slice(0, query), headers, url };
}
