// The response cache behind the `cache` option: the last good (2xx) answer per key, served
// as a degraded answer when the route fails. A shared cache must never hand one user's
// data to another, so with the default key it stays away from anything personal.

import { Lru } from '../lru.js';
import type { NormalizedRequest } from '../policy.js';

/** The request adapters describe, plus the URL as received (path and query). */
export interface HttpRequest extends NormalizedRequest {
  /** Path and query string as the client sent them (before any mount point was stripped). */
  url: string;
}

export interface CacheOptions {
  /** How long a remembered answer may be served, in milliseconds. Required. */
  ttlMs: number;
  /** Answers remembered at most; the least recently used go first. Required. */
  maxEntries: number;
  /**
   * The cache key of a request, or undefined to neither store nor serve. Default: method and
   * URL, for `GET` requests without `Authorization` or `Cookie`. With your own key, answers
   * to any request may be stored: include the caller's identity where the answer depends on it.
   */
  key?: (request: HttpRequest) => string | undefined;
}

/** Bodies above this size are not remembered: the cache is for small API answers. */
export const MAX_CACHED_BODY = 1024 * 1024;

interface Entry {
  text: string;
  json: boolean;
}

/** How an adapter shows the cache the answer it just sent. */
export type HeaderReader = (name: string) => number | string | readonly string[] | undefined;

/**
 * Remembers answers per key with a time to live and a bound on entries.
 *
 * @example
 * const cache = new ResponseCache({ ttlMs: 60_000, maxEntries: 1000 });
 * const key = cache.keyFor(request); // undefined for requests with Authorization or Cookie
 * if (key !== undefined) cache.offer(key, 200, '{"id":1}', (name) => res.getHeader(name));
 * cache.lookup(key); // { found: true, data: { id: 1 } }
 */
export class ResponseCache {
  private readonly entries: Lru<string, Entry>;
  private readonly userKey: ((request: HttpRequest) => string | undefined) | undefined;

  constructor(options: CacheOptions) {
    this.entries = new Lru<string, Entry>({ maxSize: options.maxEntries, ttlMs: options.ttlMs });
    this.userKey = options.key;
  }

  get size(): number {
    return this.entries.size;
  }

  /** The key for `request`, or undefined when its answers must not be cached. */
  keyFor(request: HttpRequest): string | undefined {
    if (this.userKey !== undefined) {
      let key: unknown;
      try {
        key = this.userKey(request);
      } catch {
        return undefined;
      }
      return typeof key === 'string' && key.length > 0 ? key : undefined;
    }
    if (request.method !== 'GET') return undefined;
    const headers = request.headers;
    if (headers.authorization !== undefined || headers.cookie !== undefined) return undefined;
    return `GET ${request.url}`;
  }

  /**
   * Remembers a 2xx answer unless it says it must not be (`no-store`; with the default key
   * also `private` or a `Set-Cookie`), is encoded, is neither JSON nor text, or is too large.
   */
  offer(key: string, status: number, body: string | Uint8Array, header: HeaderReader): void {
    if (status < 200 || status > 299) return;
    if (header('content-encoding') !== undefined) return;
    const control = headerText(header('cache-control')).toLowerCase();
    if (/(?:^|[\s,])no-store(?:$|[\s,;=])/.test(control)) return;
    if (this.userKey === undefined) {
      if (/(?:^|[\s,])private(?:$|[\s,;=])/.test(control)) return;
      if (header('set-cookie') !== undefined) return;
    }
    const type = headerText(header('content-type')).toLowerCase();
    const json = /^application\/(?:[\w.+-]+\+)?json\b/.test(type);
    if (!json && !type.startsWith('text/')) return;
    const size = typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength;
    if (size > MAX_CACHED_BODY) return;
    const text = typeof body === 'string' ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString('utf8');
    this.entries.set(key, { text, json });
  }

  /**
   * The remembered answer's data for `key`: parsed JSON, or the text itself. `found` tells a
   * remembered `null` from nothing remembered.
   */
  lookup(key: string): { found: boolean; data: unknown } {
    const entry = this.entries.get(key);
    if (entry === undefined) return { found: false, data: undefined };
    if (!entry.json) return { found: true, data: entry.text };
    try {
      return { found: true, data: JSON.parse(entry.text) as unknown };
    } catch {
      return { found: true, data: entry.text };
    }
  }

  clear(): void {
    this.entries.clear();
  }
}

function headerText(value: number | string | readonly string[] | undefined): string {
  if (value === undefined) return '';
  return Array.isArray(value) ? value.join(', ') : String(value);
}
