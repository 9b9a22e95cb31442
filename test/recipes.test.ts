// The README's recipes, run as written there against a real HTTP upstream on 127.0.0.1.
import { expect } from 'chai';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import {
  circuitBreaker,
  CircuitOpenError,
  fallback,
  guardedFetch,
  HttpStatusError,
  isTransientError,
  pipeline,
  retry,
  timeout,
  bulkhead,
  TimeoutError,
} from '../lib/index.js';

/** A tiny upstream whose behaviour each test scripts per request. */
class Upstream {
  requests = 0;
  private server: http.Server;
  private respond: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void = (_q, res) => res.end('{}');

  constructor() {
    this.server = http.createServer((req, res) => {
      this.requests++;
      this.respond(req, res, this.requests);
    });
  }

  script(respond: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void): void {
    this.respond = respond;
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function json(res: http.ServerResponse, status: number, body: unknown, headers: http.OutgoingHttpHeaders = {}): void {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
}

describe('README recipes', () => {
  let upstream: Upstream;
  let base: string;

  beforeEach(async () => {
    upstream = new Upstream();
    base = await upstream.start();
  });
  afterEach(() => upstream.stop());

  describe('an external (LLM) API call with timeout, retry, breaker, bulkhead and fallback', () => {
    // Recipe: retry outermost, then the breaker (an open breaker ends the retries at
    // once), a bulkhead and a per-try timeout, all in guardedFetch; the fallback wraps the
    // whole exchange, JSON parsing included.
    function makeClient(url: string) {
      const llmFetch = guardedFetch(
        pipeline(
          retry({ attempts: 3, backoff: { initialMs: 5, maxMs: 20 } }),
          circuitBreaker({ name: 'llm-api', consecutiveFailures: 5, openMs: 30_000 }),
          bulkhead({ limit: 4, queue: 16 }),
          timeout(200),
        ),
      );
      const busy = fallback(() => ({ text: 'The assistant is busy; please try again shortly.' }));
      return (prompt: string): Promise<{ text: string }> =>
        busy.execute(async ({ signal }) => {
          const res = await llmFetch(`${url}/v1/complete`, { method: 'POST', body: JSON.stringify({ prompt }), signal });
          return (await res.json()) as { text: string };
        });
    }

    it('retries a 503 and a hang, then answers', async () => {
      upstream.script((_req, res, n) => {
        if (n === 1) return json(res, 503, { error: 'overloaded' });
        if (n === 2) return; // hangs: the 200 ms timeout aborts this try
        json(res, 200, { text: 'hello' });
      });
      const complete = makeClient(base);
      expect(await complete('hi')).to.deep.equal({ text: 'hello' });
      expect(upstream.requests).to.equal(3);
    });

    it('falls back when every try fails, and stops calling once the breaker opens', async () => {
      upstream.script((_req, res) => json(res, 500, { error: 'boom' }));
      const complete = makeClient(base);
      expect(await complete('hi')).to.deep.equal({ text: 'The assistant is busy; please try again shortly.' });
      expect(await complete('hi')).to.deep.equal({ text: 'The assistant is busy; please try again shortly.' });
      // 3 tries, then 2 more before the 5th consecutive failure opened the breaker.
      expect(upstream.requests).to.equal(5);
      expect(await complete('hi')).to.deep.equal({ text: 'The assistant is busy; please try again shortly.' });
      expect(upstream.requests).to.equal(5);
    });
  });

  describe('a multi-service fallback chain (primary, secondary, tertiary)', () => {
    it('answers from the first service that works and remembers which are down', async () => {
      const primaryBreaker = circuitBreaker({ name: 'primary', consecutiveFailures: 1, openMs: 60_000 });
      const secondaryBreaker = circuitBreaker({ name: 'secondary', consecutiveFailures: 1, openMs: 60_000 });
      const fetchPrimary = guardedFetch(pipeline(primaryBreaker, timeout(100)));
      const fetchSecondary = guardedFetch(pipeline(secondaryBreaker, timeout(100)));
      const fetchTertiary = guardedFetch(timeout(500));
      upstream.script((req, res) => {
        if (req.url === '/primary') return json(res, 502, {});
        if (req.url === '/secondary') return; // hangs
        json(res, 200, { source: 'tertiary' });
      });
      // Recipe: each tier's fallback is the next tier.
      const getJson = (get: typeof fetch, url: string) => async () => (await get(url)).json();
      const tertiary = getJson(fetchTertiary, `${base}/tertiary`);
      const secondary = fallback(() => tertiary());
      const primary = fallback(() => secondary.execute(getJson(fetchSecondary, `${base}/secondary`)));
      const price = () => primary.execute(getJson(fetchPrimary, `${base}/primary`));

      expect(await price()).to.deep.equal({ source: 'tertiary' });
      expect(upstream.requests).to.equal(3);
      expect(primaryBreaker.state).to.equal('open');
      expect(secondaryBreaker.state).to.equal('open');
      expect(await price()).to.deep.equal({ source: 'tertiary' });
      expect(upstream.requests, 'open breakers are not called').to.equal(4);
    });
  });

  describe('strict settings for payments, lenient ones for analytics', () => {
    it('a payment breaker opens on the second failure in a row and never retries', async () => {
      upstream.script((_req, res) => json(res, 503, {}));
      const payments = pipeline(circuitBreaker({ name: 'payments', consecutiveFailures: 2, minimumCalls: 5, failureRateThreshold: 20, openMs: 60_000 }), timeout(2_000));
      const pay = guardedFetch(payments);
      for (let i = 0; i < 2; i++) {
        const error = await pay(`${base}/charge`, { method: 'POST' }).catch((e: unknown) => e);
        expect(error).to.be.instanceOf(HttpStatusError);
      }
      expect(await pay(`${base}/charge`, { method: 'POST' }).catch((e: unknown) => e)).to.be.instanceOf(CircuitOpenError);
      expect(upstream.requests).to.equal(2);
    });

    it('an analytics client shrugs off a flaky upstream: retries, a high threshold, a fire-and-forget fallback', async () => {
      upstream.script((_req, res, n) => (n % 2 === 1 ? json(res, 500, {}) : json(res, 204, {})));
      const analyticsBreaker = circuitBreaker({ name: 'analytics', failureRateThreshold: 90, minimumCalls: 50, openMs: 5_000 });
      const analytics = pipeline(fallback(undefined), retry({ attempts: 2, backoff: { initialMs: 1, maxMs: 5 } }), analyticsBreaker, timeout(500));
      const track = guardedFetch(analytics);
      for (let i = 0; i < 10; i++) await track(`${base}/event`, { method: 'POST' });
      expect(analyticsBreaker.state).to.equal('closed');
      expect(upstream.requests).to.equal(20);
    });
  });

  describe('which statuses are retried', () => {
    it('retries 408, 429, 500, 502, 503, 504 and network errors; never 400, 401, 403, 404', () => {
      for (const status of [408, 429, 500, 502, 503, 504]) expect(isTransientError({ status }), String(status)).to.equal(true);
      for (const status of [400, 401, 403, 404, 409, 422]) expect(isTransientError({ status }), String(status)).to.equal(false);
      expect(isTransientError(Object.assign(new Error('reset'), { code: 'ECONNRESET' }))).to.equal(true);
      expect(isTransientError(new CircuitOpenError(1000))).to.equal(false);
      expect(isTransientError(new TimeoutError(100))).to.equal(true);
    });

    it('waits at least the Retry-After of a 429 before the next try', async () => {
      const arrivals: number[] = [];
      upstream.script((_req, res, n) => {
        arrivals.push(performance.now());
        if (n === 1) return json(res, 429, {}, { 'retry-after': '1' });
        json(res, 200, { ok: true });
      });
      const get = guardedFetch(retry({ attempts: 2, backoff: { initialMs: 1, maxMs: 10 } }));
      const res = await get(`${base}/limited`);
      expect(res.status).to.equal(200);
      expect(arrivals[1]! - arrivals[0]!).to.be.at.least(990);
    });
  });
});
