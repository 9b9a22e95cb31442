import { expect } from 'chai';
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { bulkhead } from '../lib/bulkhead.js';
import { ClientDisconnectedError, TimeoutError } from '../lib/errors.js';
import { guardedFetch, HttpStatusError, isFailureStatus } from '../lib/fetch.js';
import { pipeline } from '../lib/pipeline.js';
import type { Policy } from '../lib/policy.js';
import { retry } from '../lib/retry.js';
import { timeout } from '../lib/timeout.js';

type Handler = (req: IncomingMessage, res: ServerResponse, body: string) => void;

/** A real HTTP server on 127.0.0.1; each test sets `handler`. */
describe('guardedFetch', () => {
  let server: Server;
  let base: string;
  let handler: Handler;
  let requests: Array<{ method: string; url: string; body: string }>;
  let closed: number;
  let connections: number;
  /** Sockets opened during the current test and not closed yet. */
  let sockets: Set<unknown>;

  before(async () => {
    server = createServer((req, res) => {
      let body = '';
      req.setEncoding('utf8');
      req.on('data', (chunk: string) => (body += chunk));
      req.on('end', () => {
        requests.push({ method: req.method ?? '', url: req.url ?? '', body });
        res.on('close', () => {
          if (!res.writableEnded) closed++;
        });
        handler(req, res, body);
      });
    });
    server.on('connection', (socket) => {
      connections++;
      const mine = sockets;
      mine.add(socket);
      socket.on('close', () => mine.delete(socket));
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => {
    server.closeAllConnections();
    server.close();
  });
  beforeEach(() => {
    requests = [];
    closed = 0;
    connections = 0;
    sockets = new Set();
    handler = (_req, res) => res.end('ok');
  });

  const fastRetry = (attempts = 3): Policy => retry({ attempts, backoff: { initialMs: 1, maxMs: 5, jitter: 'none' } });

  it('validates its arguments', () => {
    expect(() => guardedFetch(undefined as unknown as Policy)).to.throw(TypeError, 'guardedFetch: policy must be a policy (an object with execute()), got undefined');
    expect(() => guardedFetch(timeout(10), 'fetch' as unknown as typeof fetch)).to.throw(TypeError, 'guardedFetch: fetchImpl must be a function, got string');
  });

  it('passes a 2xx (and its body) through', async () => {
    handler = (_req, res) => res.end('hello');
    const api = guardedFetch(timeout(2000));
    const res = await api(`${base}/hello`);
    expect(res.status).to.equal(200);
    expect(await res.text()).to.equal('hello');
  });

  for (const status of [400, 401, 403, 404, 422]) {
    it(`passes a ${status} through as a response, not an error, and does not retry it`, async () => {
      handler = (_req, res) => {
        res.statusCode = status;
        res.end('client problem');
      };
      const res = await guardedFetch(fastRetry())(`${base}/x`);
      expect(res.status).to.equal(status);
      expect(await res.text()).to.equal('client problem');
      expect(requests).to.have.length(1);
    });
  }

  it('turns a 503 into an HttpStatusError with status, response and retryAfterMs', async () => {
    handler = (_req, res) => {
      res.statusCode = 503;
      res.setHeader('Retry-After', '7');
      res.end('busy');
    };
    const error = await guardedFetch(timeout(2000))(`${base}/busy`).catch((e: unknown) => e);
    expect(error).to.be.instanceOf(HttpStatusError);
    const httpError = error as HttpStatusError;
    expect(httpError).to.include({ status: 503, retryAfterMs: 7000, url: `${base}/busy`, code: 'BULWARK_HTTP_STATUS', name: 'HttpStatusError' });
    expect(httpError.response.status).to.equal(503);
    expect(httpError.response.headers.get('retry-after')).to.equal('7');
    expect(httpError.message).to.equal(`upstream answered 503 Service Unavailable (${base}/busy)`);
    // The body was cancelled so that the connection is not held by it.
    await httpError.response.text().then(
      () => expect.fail('the body should have been cancelled'),
      (e: unknown) => expect(e).to.be.instanceOf(TypeError),
    );
  });

  it('reads Retry-After as an HTTP-date too', async () => {
    handler = (_req, res) => {
      res.statusCode = 429;
      res.setHeader('Retry-After', new Date(Date.now() + 30_000).toUTCString());
      res.end();
    };
    const error = (await guardedFetch(timeout(2000))(base).catch((e: unknown) => e)) as HttpStatusError;
    expect(error.status).to.equal(429);
    expect(error.retryAfterMs).to.be.within(28_000, 30_000);
  });

  it('treats 408, 429 and every 5xx as failures, nothing else', () => {
    expect([408, 429, 500, 501, 502, 503, 504, 599].every(isFailureStatus)).to.equal(true);
    expect([200, 204, 301, 304, 400, 404, 409, 499, 600].some(isFailureStatus)).to.equal(false);
  });

  it('retries a 503 until the upstream answers, each try on the wire', async () => {
    let n = 0;
    handler = (_req, res) => {
      n++;
      res.statusCode = n < 3 ? 503 : 200;
      res.end(n < 3 ? 'x'.repeat(100_000) : 'recovered');
    };
    const res = await guardedFetch(fastRetry())(`${base}/flaky`);
    expect(await res.text()).to.equal('recovered');
    expect(requests.map((r) => r.url)).to.deep.equal(['/flaky', '/flaky', '/flaky']);
  });

  it('gives up after the last try with the last HttpStatusError', async () => {
    handler = (_req, res) => {
      res.statusCode = 502;
      res.end('bad gateway');
    };
    const error = await guardedFetch(fastRetry(2))(base).catch((e: unknown) => e);
    expect(error).to.be.instanceOf(HttpStatusError);
    expect((error as HttpStatusError).status).to.equal(502);
    expect(requests).to.have.length(2);
  });

  it('does not leak connections when failed answers are retried', async () => {
    handler = (_req, res) => {
      res.statusCode = 503;
      res.end('y'.repeat(1_000_000));
    };
    const api = guardedFetch(fastRetry(5));
    for (let i = 0; i < 4; i++) await api(base).catch(() => undefined);
    expect(requests).to.have.length(20);
    // Unread bodies would hold one connection per failed try (20 here); cancelled ones let go.
    expect(connections).to.be.at.least(2);
    await waitFor(() => sockets.size <= 2);
  });

  it('sends the body of a Request again on every try', async () => {
    let n = 0;
    handler = (_req, res, body) => {
      n++;
      res.statusCode = n < 2 ? 503 : 201;
      res.end(body.toUpperCase());
    };
    const request = new Request(`${base}/items`, { method: 'POST', body: 'payload' });
    const res = await guardedFetch(fastRetry())(request);
    expect(res.status).to.equal(201);
    expect(await res.text()).to.equal('PAYLOAD');
    expect(requests.map((r) => [r.method, r.body])).to.deep.equal([
      ['POST', 'payload'],
      ['POST', 'payload'],
    ]);
  });

  it('aborts the request when a timeout of the policy fires, with the TimeoutError as reason', async () => {
    handler = () => undefined; // never answers
    const started = Date.now();
    const error = await guardedFetch(timeout(100))(`${base}/hang`).catch((e: unknown) => e);
    expect(error).to.be.instanceOf(TimeoutError);
    expect(Date.now() - started).to.be.below(1000);
    await waitFor(() => closed === 1);
  });

  it("aborts the request when the caller's signal aborts, and does not retry", async () => {
    handler = () => undefined;
    const controller = new AbortController();
    const reason = new ClientDisconnectedError();
    const pending = guardedFetch(pipeline(fastRetry(), timeout(5000)))(`${base}/hang`, { signal: controller.signal });
    await waitFor(() => requests.length === 1);
    controller.abort(reason);
    expect(await pending.catch((e: unknown) => e)).to.equal(reason);
    await waitFor(() => closed === 1);
    expect(requests).to.have.length(1);
  });

  it("honours the signal of a Request given as input", async () => {
    handler = () => undefined;
    const controller = new AbortController();
    const pending = guardedFetch(timeout(5000))(new Request(`${base}/hang`, { signal: controller.signal }));
    await waitFor(() => requests.length === 1);
    controller.abort(new Error('stop'));
    expect(((await pending.catch((e: unknown) => e)) as Error).message).to.equal('stop');
  });

  it('hands fetch the policy signal and the caller init', async () => {
    const seen: Array<RequestInit | undefined> = [];
    const fakeFetch = (async (_input: unknown, init?: RequestInit) => {
      seen.push(init);
      return new Response('fake', { status: 200 });
    }) as typeof fetch;
    const api = guardedFetch(bulkhead({ limit: 1 }), fakeFetch);
    const res = await api('http://example.invalid/', { method: 'PUT', headers: { 'x-a': '1' } });
    expect(await res.text()).to.equal('fake');
    expect(seen[0]).to.include({ method: 'PUT' });
    expect(seen[0]!.signal).to.be.instanceOf(AbortSignal);
    expect(seen[0]!.signal!.aborted).to.equal(false);
  });
});

async function waitFor(condition: () => boolean, ms = 2000): Promise<void> {
  const until = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
