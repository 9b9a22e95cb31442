// The adapters' options, checked once at mount and compiled into an `HttpGuard` that every
// request of the route shares.

import type { GuardRejection } from '../errors.js';
import type { FusedSegment } from '../fused.js';
import { fusedSegmentOf, walk } from '../pipeline.js';
import { BasePolicy, type Policy, type PolicyKind } from '../policy.js';
import { duration, fail, func, knownKeys, positiveInteger } from '../validate.js';
import { customRejectionAnswer, rejectionAnswer, type AnswerReason, type HttpAnswer, type RejectResponse } from './answers.js';
import { ResponseCache, type CacheOptions, type HttpRequest } from './cache.js';

/** What `fallback` and `onReject` functions receive. */
export interface FallbackContext {
  /** Why the route did not answer itself: a rejection's reason, or `error` for a failed handler. */
  reason: AnswerReason;
  /** The rejection, or what the handler threw (a `FailedResponseError` for a failing status). */
  error: unknown;
  request: HttpRequest;
}

/** A value served as the degraded answer's `data`, or a function (maybe async) that makes one. */
export type Fallback = ((ctx: FallbackContext) => unknown) | string | number | boolean | object | null;

/** Options of `guard()` (Express, Koa) and of a Fastify route's `config.bulwark`. */
export interface GuardOptions {
  /**
   * Answer `200 {"data":…,"source":"fallback","status":"degraded","reason":…}` when the policy
   * rejects (except a 429) or the handler fails. A value, or `(ctx) => value` (may be async).
   */
  fallback?: Fallback;
  /** Remember the last good (2xx) answer per key and serve it (`"source":"cache"`) when the route fails. */
  cache?: CacheOptions;
  /** What counts as a failure. Default: status >= 500, or an error thrown without a 4xx status. */
  isFailure?: (status: number, error: unknown) => boolean;
  /** Renders a rejection that no fallback or cache answered (problem+json, HTML…). */
  onReject?: (ctx: FallbackContext, rejection: GuardRejection) => RejectResponse | PromiseLike<RejectResponse>;
  /** Status of a timeout: 503 (default) or 504. */
  timeoutStatus?: 503 | 504;
}

const OPTIONS = ['fallback', 'cache', 'isFailure', 'onReject', 'timeoutStatus'] as const;

/** Built-in guards that never look at `context.request` (nor hand the context to user code). */
const REQUEST_BLIND: ReadonlySet<PolicyKind> = new Set<PolicyKind>(['bulkhead', 'timeout', 'circuit-breaker', 'fallback', 'load-shedder', 'adaptive-concurrency', 'pipeline']);
const CACHE_OPTIONS = ['ttlMs', 'maxEntries', 'key'] as const;

/**
 * The status a thrown error is answered with by the frameworks: its 4xx/5xx `status` (or
 * `statusCode`, as http-errors and Fastify set it), else 500.
 *
 * @example errorStatus(createError(404)); // 404; errorStatus(new Error('x')) is 500
 */
export function errorStatus(error: unknown): number {
  if (typeof error === 'object' && error !== null) {
    const { status, statusCode } = error as { status?: unknown; statusCode?: unknown };
    const value = typeof status === 'number' ? status : statusCode;
    if (typeof value === 'number' && Number.isInteger(value) && value >= 400 && value <= 599) return value;
  }
  return 500;
}

/**
 * The default `isFailure`: a 5xx answer, or an error the framework would answer with a 5xx.
 *
 * @example defaultIsFailure(503); // true; defaultIsFailure(404) is false
 */
export function defaultIsFailure(status: number): boolean {
  return status >= 500;
}

/**
 * One route's guard, compiled from its options: the policy, the mapping choices and the
 * response cache. Built by the adapters at mount.
 *
 * @example
 * const compiled = new HttpGuard('koa guard', policy, { fallback: [] });
 * compiled.failed(502, undefined); // true
 */
export class HttpGuard {
  readonly policy: Policy;
  readonly timeoutStatus: number;
  readonly cache: ResponseCache | undefined;
  readonly hasFallback: boolean;
  /** A fallback or a cache may replace a failed answer, so failing answers are held back until it is known. */
  readonly degradable: boolean;
  /**
   * Whether a guard of the policy may read `context.request` (a rate limit's or a keyed
   * guard's key, chaos, a policy bulwark did not make). When none can, the request is
   * described only if `fallback`, `onReject` or the cache ask for it.
   */
  readonly exposesRequest: boolean;
  /**
   * The policy as one fused segment, which the exchange drives without promises; null for
   * an empty pipeline, undefined when the policy is not one segment.
   */
  readonly segment: FusedSegment | null | undefined;
  private readonly fallback: Fallback | undefined;
  private readonly isFailureFn: ((status: number, error: unknown) => boolean) | undefined;
  private readonly onReject: GuardOptions['onReject'];

  constructor(label: string, policy: Policy, options: GuardOptions | undefined) {
    if (typeof policy !== 'object' || policy === null || typeof (policy as Partial<Policy>).execute !== 'function') {
      fail(label, 'policy', 'a policy (an object with execute())', policy);
    }
    let innerFallback = false;
    let exposesRequest = false;
    for (const inner of walk(policy)) {
      if (inner.kind === 'fallback') innerFallback = true;
      if (!(inner instanceof BasePolicy) || !REQUEST_BLIND.has(inner.kind)) exposesRequest = true;
      if (inner.kind === 'retry') {
        throw new TypeError(
          `${label}: the policy contains a retry ("${inner.name}"), but a route handler cannot run twice; use retry for outbound calls (guardedFetch, policy.execute) inside the handler`,
        );
      }
    }
    if (options !== undefined && (typeof options !== 'object' || options === null || Array.isArray(options))) fail(label, 'options', 'an object', options);
    const o: GuardOptions = options ?? {};
    knownKeys(label, o, OPTIONS);
    this.policy = policy;
    const timeoutStatus = o.timeoutStatus ?? 503;
    if (timeoutStatus !== 503 && timeoutStatus !== 504) fail(label, 'timeoutStatus', '503 or 504', timeoutStatus);
    this.timeoutStatus = timeoutStatus;
    this.isFailureFn = o.isFailure === undefined ? undefined : func(label, 'isFailure', o.isFailure);
    this.onReject = o.onReject === undefined ? undefined : func(label, 'onReject', o.onReject);
    this.hasFallback = o.fallback !== undefined;
    this.fallback = o.fallback;
    this.cache = o.cache === undefined ? undefined : new ResponseCache(cacheOptions(label, o.cache));
    // A `fallback()` inside the policy may answer for a failed handler too: hold failures for it.
    this.degradable = this.hasFallback || this.cache !== undefined || innerFallback;
    this.exposesRequest = exposesRequest;
    this.segment = fusedSegmentOf(policy);
  }

  /** Whether an answer with `status` (and the error thrown, if any) counts as a failure. */
  failed(status: number, error: unknown): boolean {
    const custom = this.isFailureFn;
    if (custom === undefined) return defaultIsFailure(status);
    try {
      return custom(status, error) === true;
    } catch {
      // A broken predicate must not break the request: the default rule decides.
      return defaultIsFailure(status);
    }
  }

  /** The fallback's data; throws (or rejects) when the fallback function does. */
  async fallbackData(ctx: FallbackContext): Promise<unknown> {
    const fallback = this.fallback;
    return typeof fallback === 'function' ? await (fallback as (ctx: FallbackContext) => unknown)(ctx) : fallback;
  }

  /** Whether every rejection gets the default answer: no fallback, cache or `onReject` to ask. */
  get plainRejections(): boolean {
    return !this.degradable && this.onReject === undefined;
  }

  /** The answer to a rejection nothing degraded: `onReject`'s, else the default. */
  async rejectionAnswer(ctx: FallbackContext, rejection: GuardRejection, rateLimit: Parameters<typeof rejectionAnswer>[2]): Promise<HttpAnswer> {
    const standard = rejectionAnswer(rejection, this.timeoutStatus, rateLimit);
    const onReject = this.onReject;
    if (onReject === undefined) return standard;
    try {
      return customRejectionAnswer(await onReject(ctx, rejection), standard) ?? standard;
    } catch {
      return standard;
    }
  }
}

function cacheOptions(label: string, value: unknown): CacheOptions {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(label, 'cache', 'an object ({ ttlMs, maxEntries, key? })', value);
  const o = value as Partial<CacheOptions>;
  knownKeys(`${label} cache`, o, CACHE_OPTIONS);
  return {
    ttlMs: duration(label, 'cache.ttlMs', o.ttlMs),
    maxEntries: positiveInteger(label, 'cache.maxEntries', o.maxEntries),
    ...(o.key === undefined ? {} : { key: func<CacheOptions['key']>(label, 'cache.key', o.key) }),
  };
}

/**
 * Checks a route's policy and options (a `TypeError` naming the option on any mistake, and
 * for a policy that contains `retry`) and compiles them. Adapters call it at mount.
 *
 * @example const compiled = httpGuard('express guard', pipeline(bulkhead({ limit: 10 }), timeout(2000)), { timeoutStatus: 504 });
 */
export function httpGuard(label: string, policy: Policy, options?: GuardOptions): HttpGuard {
  return new HttpGuard(label, policy, options);
}
