// `bulwark/dashboard`: a live status page for the guards, as a plain Node `(req, res)`
// listener that any framework can mount. The page lives in lib/dashboard/page.ts, the
// Server-Sent Events hub in lib/dashboard/hub.ts; this file routes between them.

import type { IncomingMessage, ServerResponse } from 'node:http';
import { Hub } from '../lib/dashboard/hub.js';
import { PAGE_CSP, renderPage } from '../lib/dashboard/page.js';
import { policyList, type Policies } from '../lib/observe.js';
import { duration, knownKeys, optionsObject } from '../lib/validate.js';

export type { GuardSnapshot, HistoryPoint, Snapshot } from '../lib/dashboard/hub.js';
export type { Policies } from '../lib/observe.js';

export interface DashboardOptions {
  /** Shown in the page heading and the tab. Default `'bulwark'`. */
  title?: string;
  /** How often the page is updated, in ms (at least 100). Default 1000. */
  intervalMs?: number;
}

/** The listener `dashboard()` returns: mount it, and `close()` it before closing the server. */
export interface DashboardHandler {
  (req: IncomingMessage, res: ServerResponse, next?: (error?: unknown) => void): void;
  /** Ends every open stream and stops the timer (open tabs stop reconnecting). */
  close(): void;
  /** Event streams open now. */
  readonly connections: number;
}

const KEYS = ['title', 'intervalMs'] as const;
const HISTORY_MS = 60_000;

/**
 * A live dashboard of every guard inside `policies` (pipelines walked, keyed guards'
 * policies included as they come): state in colour, calls, failures and rejections per
 * second (by reason), bulkhead occupancy, adaptive limits, and a chart of the last minute
 * for each. One self-contained page (no CDN, nothing to build) served at the mount root,
 * kept live over Server-Sent Events at `<mount>/events`. All its URLs are relative, so it
 * works under any mount path.
 *
 * Costs nothing while nobody watches: the guards' events are counted, and the one
 * snapshot timer runs, only while a tab is open. Closed tabs are let go at once. The
 * page shows the names and figures of your guards: mount it behind your authentication.
 *
 * @example
 * // Express: app.use strips the mount path
 * app.use('/dashboard', dashboard([apiPolicy, searchPolicy]));
 * // Koa (with @koa/router)
 * const board = dashboard(policies);
 * router.all(['/dashboard', '/dashboard/{*rest}'], (ctx) => { ctx.respond = false; board(ctx.req, ctx.res); });
 * // Fastify
 * app.all('/dashboard', (req, reply) => { reply.hijack(); board(req.raw, reply.raw); });
 * app.all('/dashboard/*', (req, reply) => { reply.hijack(); board(req.raw, reply.raw); });
 * // Plain Node
 * http.createServer(dashboard(policies)).listen(9100);
 */
export function dashboard(policies: Policies, options?: DashboardOptions): DashboardHandler {
  const o = optionsObject('dashboard', options);
  knownKeys('dashboard', o, KEYS);
  if (o.title !== undefined && (typeof o.title !== 'string' || o.title.length === 0)) {
    throw new TypeError(`dashboard: title must be a non-empty string, got ${JSON.stringify(o.title)}`);
  }
  const title = o.title ?? 'bulwark';
  const intervalMs = o.intervalMs === undefined ? 1000 : duration('dashboard', 'intervalMs', o.intervalMs);
  if (intervalMs < 100) throw new TypeError(`dashboard: intervalMs must be at least 100, got ${intervalMs}`);
  const hub = new Hub(policyList('dashboard', policies), { intervalMs, historyLength: Math.ceil(HISTORY_MS / intervalMs), title });
  const page = Buffer.from(renderPage(title));

  const handler = function bulwarkDashboard(req: IncomingMessage, res: ServerResponse, next?: (error?: unknown) => void): void {
    const route = routeOf(req);
    if (route.kind === 'other') {
      if (typeof next === 'function') next();
      else plain(res, 404, 'Not Found');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      plain(res, 405, 'Method Not Allowed');
      return;
    }
    if (route.kind === 'redirect') {
      res.writeHead(302, { location: route.location, 'content-length': '0' }).end();
    } else if (route.kind === 'events') {
      if (req.method === 'HEAD') res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache' }).end();
      else hub.connect(req, res);
    } else {
      res.writeHead(200, {
        'content-type': 'text/html; charset=utf-8',
        'content-length': String(page.length),
        'cache-control': 'no-cache',
        'content-security-policy': PAGE_CSP,
        'x-content-type-options': 'nosniff',
        'referrer-policy': 'no-referrer',
      });
      res.end(req.method === 'HEAD' ? undefined : page);
    }
  } as DashboardHandler;
  Object.defineProperty(handler, 'close', { value: () => hub.close() });
  Object.defineProperty(handler, 'connections', { get: () => hub.connections });
  return handler;
}

type Route = { kind: 'page' } | { kind: 'events' } | { kind: 'redirect'; location: string } | { kind: 'other' };

/**
 * Where a request goes. Express's `app.use(path, …)` hands over `req.url` relative to the
 * mount (the full URL stays in `req.originalUrl`): there the routes are exact. Koa,
 * Fastify and plain Node hand over the full URL and the mount path is not known: the
 * page is any path ending in `/`, the stream any path ending in `/events`.
 */
function routeOf(req: IncomingMessage): Route {
  const url = req.url ?? '/';
  const queryAt = url.indexOf('?');
  const path = queryAt === -1 ? url : url.slice(0, queryAt);
  const original = (req as IncomingMessage & { originalUrl?: unknown }).originalUrl;
  const stripped = typeof original === 'string' && original !== url;
  if (stripped) {
    if (path === '/events') return { kind: 'events' };
    if (path !== '/' && path !== '') return { kind: 'other' };
    return withSlash(original);
  }
  if (path.endsWith('/events')) return { kind: 'events' };
  if (path.endsWith('/')) return { kind: 'page' };
  return withSlash(url);
}

/**
 * The page must be served at a path ending in `/`, or its relative URLs would resolve
 * one level up: `/dashboard` is sent to `./dashboard/` (relative, so that it also works
 * behind a proxy that adds a prefix).
 */
function withSlash(url: string): Route {
  const queryAt = url.indexOf('?');
  const path = queryAt === -1 ? url : url.slice(0, queryAt);
  if (path.endsWith('/')) return { kind: 'page' };
  const last = path.slice(path.lastIndexOf('/') + 1);
  // Not a mount root: a file the browser looked for (favicon.ico), or nothing at all.
  if (last === '' || last.includes('.')) return { kind: 'other' };
  // `./` first, so that a segment such as `http:` cannot read as an absolute URL.
  return { kind: 'redirect', location: `./${last}/${queryAt === -1 ? '' : url.slice(queryAt)}` };
}

function plain(res: ServerResponse, status: number, text: string): void {
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': String(Buffer.byteLength(text)) }).end(text);
}
