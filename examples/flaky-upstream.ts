// A fake upstream for the examples: a product catalog that can be healthy, failing, slow or
// flaky (mostly fine, sometimes 503, sometimes slow). Plus the scripted run the examples do
// with `--smoke`: healthy, slow, failing, breaker open, each checked against what the
// HTTP contract promises.

import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export type UpstreamMode = 'healthy' | 'failing' | 'slow' | 'flaky';

export interface FlakyUpstream {
  readonly url: string;
  mode: UpstreamMode;
  /** Requests the upstream received (those that reached it through the guard). */
  readonly hits: number;
  close(): Promise<void>;
}

/** Starts the catalog on 127.0.0.1 (a free port): `GET /products/:id`. */
export async function startFlakyUpstream(mode: UpstreamMode = 'flaky'): Promise<FlakyUpstream> {
  let hits = 0;
  const state = { mode };
  const server = http.createServer((req, res) => {
    hits++;
    const id = /^\/products\/([\w-]+)$/.exec(req.url ?? '')?.[1];
    if (id === undefined) return void res.writeHead(404).end();
    const roll = Math.random();
    const current = state.mode;
    if (current === 'failing' || (current === 'flaky' && roll < 0.2)) {
      res.writeHead(503, { 'content-type': 'application/json' }).end('{"error":"catalog database unavailable"}');
      return;
    }
    const delay = current === 'slow' || (current === 'flaky' && roll > 0.9) ? 3000 : 5 + Math.random() * 20;
    const timer = setTimeout(() => {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ id, name: `Product ${id}`, price: 10 + id.length }));
    }, delay);
    res.on('close', () => clearTimeout(timer));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    get mode() {
      return state.mode;
    },
    set mode(next: UpstreamMode) {
      state.mode = next;
    },
    get hits() {
      return hits;
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

interface Step {
  mode: UpstreamMode;
  path: string;
  /** What the client should get: 'ok', or the degraded answer's source and reason. */
  expect: 'ok' | `${'cache' | 'fallback'}/${string}`;
}

// Timeout 500 ms, breaker opening after 3 failures in a row (see the examples' policy).
const SCRIPT: Step[] = [
  { mode: 'healthy', path: '/products/1', expect: 'ok' },
  { mode: 'slow', path: '/products/2', expect: 'fallback/timeout' },
  { mode: 'failing', path: '/products/1', expect: 'cache/error' },
  { mode: 'failing', path: '/products/3', expect: 'fallback/error' },
  { mode: 'failing', path: '/products/1', expect: 'cache/circuit_open' },
  { mode: 'healthy', path: '/products/4', expect: 'fallback/circuit_open' },
];

/** Runs the scripted traffic against a service; prints each answer; true when all were as expected. */
export async function runSmoke(service: string, upstream: FlakyUpstream, log: (line: string) => void = console.log): Promise<boolean> {
  let passed = true;
  for (const step of SCRIPT) {
    upstream.mode = step.mode;
    const response = await fetch(`${service}${step.path}`);
    const body = (await response.json()) as { status?: string; source?: string; reason?: string };
    const got = body.status === 'degraded' ? `${body.source}/${body.reason}` : response.ok ? 'ok' : `status ${response.status}`;
    const good = got === step.expect;
    passed &&= good;
    log(`${good ? 'ok  ' : 'FAIL'} upstream ${step.mode.padEnd(7)} GET ${step.path} -> ${response.status} ${got}${good ? '' : ` (expected ${step.expect})`}`);
  }
  return passed;
}
