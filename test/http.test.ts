import { EventEmitter } from 'node:events';
import { expect } from 'chai';
import sinon from 'sinon';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { BulkheadFullError, CircuitOpenError, ClientDisconnectedError, isClientDisconnected, OverloadError, RateLimitError, TimeoutError } from '../lib/errors.js';
import {
  customRejectionAnswer,
  degradedAnswer,
  errorStatus,
  Exchange,
  FailedResponseError,
  httpGuard,
  httpRequest,
  MAX_CACHED_BODY,
  rateLimitHeaders,
  rejectionAnswer,
  ResponseCache,
  retryAfterSeconds,
  type GuardOptions,
  type HttpAnswer,
  type HttpRequest,
  type ResponseTarget,
} from '../lib/http.js';
import { pipeline } from '../lib/pipeline.js';
import { BasePolicy, run, type Call, type InternalFunction, type Policy } from '../lib/policy.js';
import { retry } from '../lib/retry.js';
import { chaos } from '../lib/chaos.js';
import { fallback } from '../lib/fallback.js';
import { keyed } from '../lib/keyed.js';
import { rateLimit } from '../lib/rate-limit.js';
import { timeout } from '../lib/timeout.js';

describe('http mapping', () => {
  describe('retryAfterSeconds', () => {
    it('rounds the known wait up to whole seconds, at least 1', () => {
      expect([0, 1, 999, 1000, 1001, 29_100, 30_000].map(retryAfterSeconds)).to.deep.equal([1, 1, 1, 1, 2, 30, 30]);
    });
    it('answers 1 when the wait is unknown or nonsense', () => {
      expect([undefined, -5, NaN, Infinity].map(retryAfterSeconds)).to.deep.equal([1, 1, 1, 1]);
    });
  });

  describe('rejectionAnswer', () => {
    it('maps each rejection to its status and exact body', () => {
      const cases: Array<[Error & { reason: string }, number, string]> = [
        [new CircuitOpenError(29_100), 503, '{"error":"Service Unavailable","reason":"circuit_open","retryAfter":30}'],
        [new BulkheadFullError(), 503, '{"error":"Service Unavailable","reason":"bulkhead_full","retryAfter":1}'],
        [new TimeoutError(100), 503, '{"error":"Service Unavailable","reason":"timeout","retryAfter":1}'],
        [new OverloadError(undefined, 2500), 503, '{"error":"Service Unavailable","reason":"overloaded","retryAfter":3}'],
        [new RateLimitError(10_000), 429, '{"error":"Too Many Requests","reason":"rate_limited","retryAfter":10}'],
      ];
      for (const [rejection, status, body] of cases) {
        const answer = rejectionAnswer(rejection as CircuitOpenError, 503);
        expect(answer.status, rejection.reason).to.equal(status);
        expect(answer.body).to.equal(body);
        expect(answer.headers['content-type']).to.equal('application/json');
        expect(answer.headers['retry-after']).to.equal(String(JSON.parse(body).retryAfter));
      }
    });

    it('escapes a reason that does not come from bulwark, and keeps the body valid JSON', () => {
      const odd = new CircuitOpenError(1000);
      Object.defineProperty(odd, 'reason', { value: 'say "hi"\n' });
      const answer = rejectionAnswer(odd, 503);
      expect(JSON.parse(answer.body as string)).to.deep.equal({ error: 'Service Unavailable', reason: 'say "hi"\n', retryAfter: 1 });
    });

    it('answers a timeout with timeoutStatus, and adds the RateLimit headers it is given', () => {
      const answer = rejectionAnswer(new TimeoutError(100), 504, { limit: 10, remaining: 3, resetMs: 1500 });
      expect(answer.status).to.equal(504);
      expect(answer.body).to.equal('{"error":"Gateway Timeout","reason":"timeout","retryAfter":1}');
      expect(answer.headers).to.include({ 'ratelimit-limit': '10', 'ratelimit-remaining': '3', 'ratelimit-reset': '2' });
    });
  });

  it('rateLimitHeaders rounds the reset up and never goes below 0', () => {
    expect(rateLimitHeaders({ limit: 5, remaining: -1, resetMs: 0 })).to.deep.equal({ 'ratelimit-limit': '5', 'ratelimit-remaining': '0', 'ratelimit-reset': '0' });
    expect(rateLimitHeaders({ limit: 5, remaining: 4, resetMs: 1 })['ratelimit-reset']).to.equal('1');
  });

  describe('degradedAnswer', () => {
    it('wraps the data in the envelope, with status 200', () => {
      const answer = degradedAnswer({ a: 1 }, 'cache', 'timeout');
      expect(answer.status).to.equal(200);
      expect(answer.body).to.equal('{"data":{"a":1},"source":"cache","status":"degraded","reason":"timeout"}');
      expect(answer.headers).to.deep.equal({ 'content-type': 'application/json', 'cache-control': 'no-store' });
    });
    it('sends undefined data as null, and throws for data JSON cannot hold', () => {
      expect(degradedAnswer(undefined, 'fallback', 'error').body).to.equal('{"data":null,"source":"fallback","status":"degraded","reason":"error"}');
      const cycle: Record<string, unknown> = {};
      cycle.self = cycle;
      expect(() => degradedAnswer(cycle, 'fallback', 'error')).to.throw(TypeError);
    });
  });

  describe('customRejectionAnswer', () => {
    const standard: HttpAnswer = rejectionAnswer(new CircuitOpenError(5000), 503, { limit: 1, remaining: 0, resetMs: 1000 });

    it('keeps what onReject set, adding Retry-After and RateLimit-* only where missing', () => {
      const answer = customRejectionAnswer({ status: 503, headers: { 'Retry-After': 60, 'X-Id': ['a', 'b'] }, body: { title: 'x' } }, standard)!;
      expect(answer.headers).to.deep.equal({
        'retry-after': '60',
        'x-id': 'a, b',
        'ratelimit-limit': '1',
        'ratelimit-remaining': '0',
        'ratelimit-reset': '1',
        'content-type': 'application/json',
      });
      expect(answer.body).to.equal('{"title":"x"}');
    });

    it('types strings as text, bytes as octets, no body as empty text, and keeps a given type', () => {
      expect(customRejectionAnswer({ status: 503, body: 'busy' }, standard)!.headers['content-type']).to.match(/^text\/plain/);
      expect(customRejectionAnswer({ status: 503, body: new Uint8Array([1]) }, standard)!.headers['content-type']).to.equal('application/octet-stream');
      expect(customRejectionAnswer({ status: 503 }, standard)!.body).to.equal('');
      expect(customRejectionAnswer({ status: 503, headers: { 'content-type': 'text/html' }, body: '<p>busy</p>' }, standard)!.headers['content-type']).to.equal('text/html');
    });

    it('refuses a malformed result (the default answer then stands)', () => {
      for (const bad of [null, 'nope', { status: 99 }, { status: 200.5 }, { status: 600 }, { body: 'x' }]) {
        expect(customRejectionAnswer(bad as never, standard), JSON.stringify(bad)).to.equal(undefined);
      }
    });
  });

  it('errorStatus reads a 4xx/5xx status or statusCode, else 500', () => {
    expect(errorStatus(Object.assign(new Error(), { status: 404 }))).to.equal(404);
    expect(errorStatus({ statusCode: 503 })).to.equal(503);
    expect(errorStatus({ status: 302 })).to.equal(500);
    expect(errorStatus({ status: '404' })).to.equal(500);
    expect(errorStatus('boom')).to.equal(500);
  });

  it('httpRequest splits the path from the query and keeps the URL', () => {
    expect(httpRequest('::1', 'GET', '/a/b?c=1', { host: 'x' })).to.deep.equal({ ip: '::1', method: 'GET', path: '/a/b', url: '/a/b?c=1', headers: { host: 'x' } });
    expect(httpRequest(undefined, 'POST', '/a', {}).ip).to.equal('');
  });
});

describe('httpGuard options', () => {
  const policy = pipeline();

  it('refuses a policy that contains a retry, however deep', () => {
    expect(() => httpGuard('express guard', pipeline(timeout(100), pipeline(retry({ attempts: 2 }))))).to.throw(TypeError, /express guard: the policy contains a retry \("retry-\d+"\)/);
  });

  it('refuses what is not a policy', () => {
    expect(() => httpGuard('koa guard', {} as Policy)).to.throw(TypeError, /koa guard: policy must be a policy/);
    expect(() => httpGuard('koa guard', undefined as unknown as Policy)).to.throw(TypeError, /got undefined/);
  });

  const invalid: Array<[string, unknown, RegExp]> = [
    ['not an object', 'fallback', /options must be an object/],
    ['typo', { fallbak: 1 }, /unknown option "fallbak"/],
    ['timeoutStatus', { timeoutStatus: 500 }, /timeoutStatus must be 503 or 504, got 500/],
    ['isFailure', { isFailure: true }, /isFailure must be a function, got true/],
    ['onReject', { onReject: {} }, /onReject must be a function/],
    ['cache', { cache: 5 }, /cache must be an object/],
    ['cache.ttlMs', { cache: { ttlMs: 0, maxEntries: 1 } }, /cache\.ttlMs must be a finite number of milliseconds > 0, got 0/],
    ['cache.maxEntries', { cache: { ttlMs: 10, maxEntries: 1.5 } }, /cache\.maxEntries must be a positive integer, got 1\.5/],
    ['cache.key', { cache: { ttlMs: 10, maxEntries: 1, key: 'url' } }, /cache\.key must be a function/],
    ['cache typo', { cache: { ttlMs: 10, maxEntries: 1, max: 2 } }, /unknown option "max"/],
  ];
  for (const [what, options, message] of invalid) {
    it(`refuses a bad ${what}`, () => {
      expect(() => httpGuard('guard', policy, options as GuardOptions)).to.throw(TypeError, message);
    });
  }

  it('leaves the options object alone and defaults timeoutStatus to 503', () => {
    const options = Object.freeze({ cache: Object.freeze({ ttlMs: 10, maxEntries: 2 }), fallback: null });
    const compiled = httpGuard('guard', policy, options);
    expect(compiled.timeoutStatus).to.equal(503);
    expect(compiled.hasFallback).to.equal(true);
    expect(compiled.degradable).to.equal(true);
    expect(httpGuard('guard', policy).degradable).to.equal(false);
  });

  it('knows whether a guard of the policy may read the request', () => {
    const blind = pipeline(bulkhead({ limit: 1 }), timeout(100), circuitBreaker(), fallback(0));
    expect(httpGuard('guard', blind).exposesRequest).to.equal(false);
    expect(httpGuard('guard', pipeline(blind, rateLimit({ limit: 1, windowMs: 1000 }))).exposesRequest).to.equal(true);
    expect(httpGuard('guard', pipeline(keyed(() => bulkhead({ limit: 1 }), { key: () => 'k' }))).exposesRequest).to.equal(true);
    expect(httpGuard('guard', pipeline(chaos({ enabled: false, fault: { rate: 1 } }))).exposesRequest).to.equal(true);
    // A policy bulwark did not make may read anything.
    const foreign: Policy = { name: 'mine', kind: 'bulkhead', execute: (fn) => Promise.resolve(fn({ signal: new AbortController().signal, attempt: 1, context: {} })), stats: () => ({}) };
    expect(httpGuard('guard', pipeline(foreign)).exposesRequest).to.equal(true);
  });

  it('counts 5xx and thrown errors without a 4xx status as failures by default; a broken isFailure falls back to that', () => {
    const compiled = httpGuard('guard', policy);
    expect([200, 404, 499, 500, 503].map((status) => compiled.failed(status, undefined))).to.deep.equal([false, false, false, true, true]);
    const broken = httpGuard('guard', policy, {
      isFailure: () => {
        throw new Error('oops');
      },
    });
    expect(broken.failed(502, undefined)).to.equal(true);
    expect(broken.failed(404, undefined)).to.equal(false);
  });
});

describe('ResponseCache', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  const get = (url: string, headers: Record<string, string> = {}) => httpRequest('1.2.3.4', 'GET', url, headers);
  const json = (name: string): string | undefined => (name === 'content-type' ? 'application/json' : undefined);

  it('keys GET requests by URL (query included), and never personal ones', () => {
    const cache = new ResponseCache({ ttlMs: 1000, maxEntries: 10 });
    expect(cache.keyFor(get('/a?x=1'))).to.equal('GET /a?x=1');
    expect(cache.keyFor(httpRequest('', 'POST', '/a', {}))).to.equal(undefined);
    expect(cache.keyFor(get('/a', { authorization: 'Bearer t' }))).to.equal(undefined);
    expect(cache.keyFor(get('/a', { cookie: 's=1' }))).to.equal(undefined);
  });

  it('lets a key function decide; a throwing or empty key means no caching', () => {
    const byUser = new ResponseCache({ ttlMs: 1000, maxEntries: 10, key: (r) => `${r.path}|${String(r.headers.authorization)}` });
    expect(byUser.keyFor(get('/a', { authorization: 'alice' }))).to.equal('/a|alice');
    const broken = new ResponseCache({
      ttlMs: 1000,
      maxEntries: 10,
      key: () => {
        throw new Error('x');
      },
    });
    expect(broken.keyFor(get('/a'))).to.equal(undefined);
    expect(new ResponseCache({ ttlMs: 1000, maxEntries: 10, key: () => '' }).keyFor(get('/a'))).to.equal(undefined);
  });

  it('keeps 2xx JSON and text answers, parsed back on lookup', () => {
    const cache = new ResponseCache({ ttlMs: 1000, maxEntries: 10 });
    cache.offer('j', 200, '{"a":[1]}', json);
    cache.offer('p', 201, 'plain', (name) => (name === 'content-type' ? 'text/plain; charset=utf-8' : undefined));
    cache.offer('h', 200, Buffer.from('{"hal":true}'), (name) => (name === 'content-type' ? ['application/hal+json'] : undefined));
    expect(cache.lookup('j')).to.deep.equal({ found: true, data: { a: [1] } });
    expect(cache.lookup('p')).to.deep.equal({ found: true, data: 'plain' });
    expect(cache.lookup('h')).to.deep.equal({ found: true, data: { hal: true } });
    expect(cache.lookup('nothing')).to.deep.equal({ found: false, data: undefined });
  });

  it('turns away what must not or cannot be kept', () => {
    const cache = new ResponseCache({ ttlMs: 1000, maxEntries: 10 });
    const headers =
      (extra: Record<string, string>) =>
      (name: string): string | undefined =>
        extra[name] ?? json(name);
    cache.offer('a', 500, '{}', json);
    cache.offer('b', 304, '{}', json);
    cache.offer('c', 200, '{}', headers({ 'cache-control': 'no-store' }));
    cache.offer('d', 200, '{}', headers({ 'cache-control': 'max-age=0, private' }));
    cache.offer('e', 200, '{}', headers({ 'set-cookie': 's=1' }));
    cache.offer('f', 200, '{}', headers({ 'content-encoding': 'gzip' }));
    cache.offer('g', 200, 'x', (name) => (name === 'content-type' ? 'image/png' : undefined));
    cache.offer('h', 200, 'x', () => undefined);
    cache.offer('i', 200, 'x'.repeat(MAX_CACHED_BODY + 1), (name) => (name === 'content-type' ? 'text/plain' : undefined));
    expect(cache.size).to.equal(0);
  });

  it('with a key function, keeps private and cookie-setting answers but never no-store', () => {
    const cache = new ResponseCache({ ttlMs: 1000, maxEntries: 10, key: (r) => r.url });
    cache.offer('d', 200, '{}', (name) => ({ 'cache-control': 'private', 'content-type': 'application/json' })[name]);
    cache.offer('e', 200, '{}', (name) => ({ 'set-cookie': 's=1', 'content-type': 'application/json' })[name]);
    cache.offer('c', 200, '{}', (name) => ({ 'cache-control': 'no-store', 'content-type': 'application/json' })[name]);
    expect([cache.lookup('d').found, cache.lookup('e').found, cache.lookup('c').found]).to.deep.equal([true, true, false]);
  });

  it('forgets after ttlMs and keeps at most maxEntries, least recently used first', async () => {
    const cache = new ResponseCache({ ttlMs: 1000, maxEntries: 2 });
    cache.offer('a', 200, '1', json);
    cache.offer('b', 200, '2', json);
    cache.lookup('a');
    cache.offer('c', 200, '3', json);
    expect([cache.lookup('a').found, cache.lookup('b').found, cache.lookup('c').found]).to.deep.equal([true, false, true]);
    await clock.tickAsync(1000);
    expect(cache.lookup('a').found).to.equal(false);
  });
});

/** A raw response and target that record what the exchange decided. */
class FakeResponse extends EventEmitter {
  headersSent = false;
  writableEnded = false;
  statusCode = 200;
  destroyed = false;
  destroy(): void {
    this.destroyed = true;
    this.emit('close');
  }
  finish(status = 200): void {
    this.statusCode = status;
    this.headersSent = true;
    this.writableEnded = true;
    this.emit('close');
  }
}

class FakeTarget implements ResponseTarget {
  readonly raw = new FakeResponse();
  readonly sent: HttpAnswer[] = [];
  readonly released: Array<[unknown, boolean]> = [];
  readonly headers: Record<string, string> = {};
  takenOver = 0;
  send(answer: HttpAnswer): void {
    this.sent.push(answer);
    this.raw.finish(answer.status);
  }
  takeOver(): void {
    this.takenOver++;
  }
  release(error: unknown, thrown: boolean): void {
    this.released.push([error, thrown]);
  }
  setHeaders(headers: Record<string, string>): void {
    Object.assign(this.headers, headers);
  }
}

/** An adapter's way: the exchange is its own target and describes the request on demand. */
class SelfTarget extends Exchange implements ResponseTarget {
  readonly raw = new FakeResponse();
  readonly sent: HttpAnswer[] = [];
  descriptions = 0;
  started = 0;
  describe(): HttpRequest {
    this.descriptions++;
    return httpRequest('1.2.3.4', 'GET', '/x?q=1', {});
  }
  start(): void {
    this.started++;
  }
  send(answer: HttpAnswer): void {
    this.sent.push(answer);
    this.raw.finish(answer.status);
  }
  takeOver(): void {}
  release(_error: unknown, _thrown: boolean): void {}
  setHeaders(): void {}
}

function exchangeFor(policy: Policy, options?: GuardOptions): { exchange: Exchange; target: FakeTarget } {
  const target = new FakeTarget();
  return { exchange: new Exchange(httpGuard('test', policy, options), httpRequest('1.2.3.4', 'GET', '/x', {}), target), target };
}

describe('Exchange', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  it('answers a rejection without running the handler', async () => {
    const breaker = circuitBreaker();
    breaker.forceOpen();
    const { exchange, target } = exchangeFor(breaker);
    let started = false;
    exchange.run(() => {
      started = true;
    });
    await exchange.decision();
    expect(started).to.equal(false);
    expect(target.sent.map((a) => a.status)).to.deep.equal([503]);
  });

  it('lets a successful answer stand and resolves the call when the response ends', async () => {
    const gate = bulkhead({ limit: 1 });
    const { exchange, target } = exchangeFor(gate);
    exchange.run(() => {});
    await clock.tickAsync(0);
    expect(exchange.respond(200)).to.equal(false);
    await exchange.decision();
    expect(gate.active).to.equal(1);
    target.raw.finish(200);
    await clock.tickAsync(0);
    expect(gate.active).to.equal(0);
    expect(target.sent).to.deep.equal([]);
  });

  it('treats a throw while starting the handler as its failure: the guards that admitted it hear of it', async () => {
    const gate = bulkhead({ limit: 1 });
    const limiter = rateLimit({ limit: 10, windowMs: 1000 });
    const { exchange, target } = exchangeFor(pipeline(gate, limiter));
    target.setHeaders = () => {
      throw new Error('header rejected');
    };
    let started = false;
    exchange.run(() => {
      started = true;
    });
    await exchange.decision();
    await clock.tickAsync(0);
    expect(started).to.equal(false);
    expect(gate.active).to.equal(0);
    expect(target.released).to.have.length(1);
    expect((target.released[0]![0] as Error).message).to.equal('header rejected');
  });

  it('holds a failing answer when a fallback may replace it, and counts the failure', async () => {
    const breaker = circuitBreaker({ consecutiveFailures: 5 });
    const { exchange, target } = exchangeFor(breaker, { fallback: 'fb' });
    exchange.run(() => {});
    await clock.tickAsync(0);
    expect(exchange.respond(503)).to.equal(true);
    await exchange.decision();
    expect(target.takenOver).to.equal(1);
    expect(target.sent.map((a) => a.body)).to.deep.equal(['{"data":"fb","source":"fallback","status":"degraded","reason":"error"}']);
    expect(breaker.stats().totals.failures).to.equal(1);
  });

  it('releases a held answer when the fallback throws, and a thrown error nothing replaces', async () => {
    const broken = exchangeFor(pipeline(), {
      fallback: () => {
        throw new Error('x');
      },
    });
    broken.exchange.run(() => {});
    await clock.tickAsync(0);
    broken.exchange.respond(500);
    await broken.exchange.decision();
    expect(broken.target.released).to.have.length(1);
    expect(broken.target.released[0]![0]).to.be.instanceOf(FailedResponseError);
    expect(broken.target.released[0]![1]).to.equal(false);

    const plain = exchangeFor(pipeline());
    const failure = new Error('boom');
    plain.exchange.run(() => {
      throw failure;
    });
    await plain.exchange.decision();
    expect(plain.target.released).to.deep.equal([[failure, true]]);
  });

  it('takes over at the timeout, ignores what the handler does later, and aborts its signal', async () => {
    const { exchange, target } = exchangeFor(timeout(100));
    let signal: AbortSignal | undefined;
    exchange.run(() => {
      signal = exchange.signal;
    });
    await clock.tickAsync(100);
    await exchange.decision();
    expect(target.takenOver).to.equal(1);
    expect(target.sent.map((a) => a.status)).to.deep.equal([503]);
    expect(signal?.reason).to.be.instanceOf(TimeoutError);
    exchange.fail(new Error('late'));
    expect(exchange.respond(200)).to.equal(false);
    expect(target.released).to.deep.equal([]);
    expect(target.sent).to.have.length(1);
  });

  it('destroys the connection when the timeout fires after the answer started', async () => {
    const { exchange, target } = exchangeFor(timeout(100));
    exchange.run(() => {});
    await clock.tickAsync(0);
    exchange.respond(200);
    target.raw.headersSent = true;
    await clock.tickAsync(100);
    expect(target.raw.destroyed).to.equal(true);
    expect(target.sent).to.deep.equal([]);
  });

  it('aborts with ClientDisconnectedError when the client leaves; a queued call never runs', async () => {
    const gate = bulkhead({ limit: 1, queue: 1 });
    const first = exchangeFor(gate);
    first.exchange.run(() => {});
    const second = exchangeFor(gate);
    let ran = false;
    second.exchange.run(() => {
      ran = true;
    });
    await clock.tickAsync(0);
    expect(gate.queued).to.equal(1);
    second.target.raw.emit('close');
    await second.exchange.decision();
    expect(isClientDisconnected(second.exchange.scope.reason)).to.equal(true);
    expect(gate.queued).to.equal(0);
    first.target.raw.emit('close');
    await clock.tickAsync(0);
    expect(ran).to.equal(false);
    expect(gate.active).to.equal(0);
    expect(first.exchange.scope.reason).to.be.instanceOf(ClientDisconnectedError);
  });

  it('sends the RateLimit headers recorded before the handler ran', async () => {
    class Recording extends BasePolicy<object> {
      readonly kind = 'rate-limit';
      constructor() {
        super('recording');
      }
      [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
        call.context.rateLimit = { limit: 10, remaining: 9, resetMs: 2000 };
        return Promise.resolve(fn(call));
      }
      stats(): object {
        return {};
      }
    }
    const { exchange, target } = exchangeFor(new Recording());
    exchange.run(() => {});
    await clock.tickAsync(0);
    expect(target.headers).to.deep.equal({ 'ratelimit-limit': '10', 'ratelimit-remaining': '9', 'ratelimit-reset': '2' });
  });

  it('refuses to run the handler twice', async () => {
    class Twice extends BasePolicy<object> {
      readonly kind = 'chaos';
      error: unknown;
      constructor() {
        super('twice');
      }
      async [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
        void fn(call);
        try {
          await fn(call);
        } catch (error) {
          this.error = error;
        }
        return undefined as T;
      }
      stats(): object {
        return {};
      }
    }
    const twice = new Twice();
    let runs = 0;
    const { exchange } = exchangeFor(twice);
    exchange.run(() => {
      runs++;
    });
    await clock.tickAsync(0);
    expect(runs).to.equal(1);
    expect(twice.error).to.be.instanceOf(TypeError);
  });

  it('runs the target\'s start() and describes the request only when something reads it', async () => {
    const blind = new SelfTarget(httpGuard('test', pipeline(bulkhead({ limit: 1 }), timeout(1000))));
    blind.run();
    await clock.tickAsync(0);
    expect(blind.started).to.equal(1);
    expect(blind.respond(200)).to.equal(false);
    blind.raw.finish(200);
    await blind.decision();
    expect(blind.descriptions).to.equal(0);
    expect(blind.context).to.deep.equal({});

    let seen: unknown;
    const reading = new SelfTarget(httpGuard('test', rateLimit({ limit: 1, windowMs: 1000, key: (request) => (seen = request)?.ip })));
    reading.run();
    await clock.tickAsync(0);
    expect(reading.descriptions).to.equal(1);
    expect(seen).to.deep.equal({ ip: '1.2.3.4', method: 'GET', path: '/x', headers: {}, url: '/x?q=1' });
    expect(reading.context.request).to.equal(seen);

    // A fallback is handed the request, described then.
    const open = circuitBreaker();
    open.forceOpen();
    let handed: unknown;
    const degraded = new SelfTarget(httpGuard('test', open, { fallback: ({ request }) => (handed = request).path }));
    degraded.run();
    await degraded.decision();
    expect(degraded.descriptions).to.equal(1);
    expect((handed as HttpRequest).path).to.equal('/x');
    expect(degraded.sent.map((a) => a.body)).to.deep.equal(['{"data":"/x","source":"fallback","status":"degraded","reason":"circuit_open"}']);
  });

  it('takes over at the timeout when the handler never read its signal; its late answer is ignored', async () => {
    const { exchange, target } = exchangeFor(timeout(100));
    exchange.run(() => {});
    await clock.tickAsync(100);
    await exchange.decision();
    expect(target.takenOver).to.equal(1);
    expect(target.sent.map((a) => a.status)).to.deep.equal([503]);
    expect(exchange.respond(200)).to.equal(false);
    expect(exchange.accepting).to.equal(false);
    expect(target.sent).to.have.length(1);
  });

  it('rejects decision() with the failure a target hands back to the framework (Koa rethrows it)', async () => {
    class Rethrowing extends SelfTarget {
      override release(_error: unknown, thrown: boolean): void {
        if (thrown) this.rethrowOnDecision();
      }
    }
    const failure = new Error('boom');
    const exchange = new Rethrowing(httpGuard('test', pipeline()));
    exchange.start = () => {
      throw failure;
    };
    exchange.run();
    const decided = exchange.decision();
    await clock.tickAsync(0);
    let caught: unknown;
    await decided.catch((error: unknown) => (caught = error));
    expect(caught).to.equal(failure);
    // Asked again once decided: the same answer.
    caught = undefined;
    await exchange.decision().catch((error: unknown) => (caught = error));
    expect(caught).to.equal(failure);
  });
});
