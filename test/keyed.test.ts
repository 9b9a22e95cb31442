import { expect } from 'chai';
import sinon from 'sinon';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { CircuitOpenError } from '../lib/errors.js';
import { keyed } from '../lib/keyed.js';
import { pipeline, walk } from '../lib/pipeline.js';
import { BasePolicy, run, type Call, type CallContext, type InternalFunction, type NormalizedRequest, type Policy } from '../lib/policy.js';
import { rateLimit } from '../lib/rate-limit.js';
import { deferred } from './helpers/promises.js';

/** The smallest policy: runs the function, remembers its key. */
class Plain extends BasePolicy<{ key: string }> {
  readonly kind = 'bulkhead';
  constructor(readonly key: string) {
    super(`plain:${key}`);
  }
  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    return Promise.resolve().then(() => fn(call));
  }
  stats(): { key: string } {
    return { key: this.key };
  }
}

const byTenant = (_request: NormalizedRequest | undefined, context: CallContext): string => String(context.tenant);
const as = (tenant: string): CallContext => ({ tenant });


describe('keyed', () => {
  it('is a policy of kind keyed with a default name', () => {
    const policy = keyed((key) => new Plain(key), { key: byTenant });
    expect(policy.kind).to.equal('keyed');
    expect(policy.name).to.match(/^keyed-\d+$/);
    expect(keyed((key) => new Plain(key), { key: byTenant, name: 'per-tenant' }).name).to.equal('per-tenant');
    expect(policy.maxKeys).to.equal(10_000);
  });

  it('makes one policy per key on first use and reuses it', async () => {
    const factory = sinon.spy((key: string) => new Plain(key));
    const policy = keyed(factory, { key: byTenant });
    const seen: string[] = [];
    for (const tenant of ['a', 'b', 'a', 'a', 'c', 'b']) {
      await policy.execute(() => seen.push(tenant), undefined, as(tenant));
    }
    expect(factory.args.map(([key]) => key)).to.deep.equal(['a', 'b', 'c']);
    expect(seen).to.deep.equal(['a', 'b', 'a', 'a', 'c', 'b']);
    expect(policy.stats()).to.deep.equal({ keys: 3, created: 3, evicted: 0 });
    expect(policy.get('a')).to.be.instanceOf(Plain);
    expect(policy.get('a')!.key).to.equal('a');
    expect(policy.get('zzz')).to.equal(undefined);
    expect(policy.stats().created).to.equal(3); // get() creates nothing
  });

  it('reads the key from the normalised request', async () => {
    const key = sinon.spy((request: NormalizedRequest | undefined) => request?.path);
    const policy = keyed((k) => new Plain(k), { key });
    const request: NormalizedRequest = { ip: '192.0.2.1', method: 'GET', path: '/users', headers: {} };
    const context: CallContext = { request };
    await policy.execute(() => 1, undefined, context);
    expect(key.firstCall.args).to.deep.equal([request, context]);
    expect([...policy.children()].map((p) => p.key)).to.deep.equal(['/users']);
  });

  it('sends calls whose key function throws (or returns nothing) to the shared key "*"', async () => {
    const boom = new Error('bad key');
    const policy = keyed((k) => new Plain(k), {
      key: (_request, context) => {
        if (context.tenant === 'throw') throw boom;
        return context.tenant as string | undefined;
      },
    });
    const errors: unknown[] = [];
    policy.on('keyError', ({ error }) => errors.push(error));
    expect(await policy.execute(() => 'ran', undefined, as('throw'))).to.equal('ran');
    await policy.execute(() => 'ran', undefined, {});
    await policy.execute(() => 'ran', undefined, as(''));
    expect([...policy.children()].map((p) => p.key)).to.deep.equal(['*']);
    expect(errors).to.deep.equal([boom]);
  });

  it('keeps at most maxKeys policies, least recently used out first', async () => {
    const policy = keyed((k) => new Plain(k), { key: byTenant, maxKeys: 2 });
    const evicted: string[] = [];
    const created: string[] = [];
    policy.on('evicted', ({ key }) => evicted.push(key));
    policy.on('created', ({ key }) => created.push(key));
    for (const tenant of ['a', 'b', 'a', 'c', 'd', 'a']) await policy.execute(() => 1, undefined, as(tenant));
    expect(created).to.deep.equal(['a', 'b', 'c', 'd', 'a']);
    expect(evicted).to.deep.equal(['b', 'a', 'c']);
    expect([...policy.children()].map((p) => p.key)).to.deep.equal(['d', 'a']);
    expect(policy.stats()).to.deep.equal({ keys: 2, created: 5, evicted: 3 });
  });

  it('never evicts a policy with calls in flight (and shrinks back once they end)', async () => {
    const policy = keyed((k) => new Plain(k), { key: byTenant, maxKeys: 1 });
    const gate = deferred();
    const slow = policy.execute(() => gate.promise, undefined, as('slow'));
    const slowPolicy = policy.get('slow');
    // While `slow` runs, `b` must be added above maxKeys…
    await policy.execute(() => expect(policy.stats().keys).to.equal(2), undefined, as('b'));
    // …and room is made again as soon as `b` is done, around the pinned entry.
    expect(policy.get('b')).to.equal(undefined);
    expect(policy.get('slow')).to.equal(slowPolicy);
    expect(policy.stats().keys).to.equal(1);
    await policy.execute(() => 1, undefined, as('c'));
    expect(policy.get('slow')).to.equal(slowPolicy);
    gate.resolve();
    await slow;
    // Done, `slow` is an ordinary entry again and makes way for the next key.
    await policy.execute(() => 1, undefined, as('d'));
    expect(policy.get('slow')).to.equal(undefined);
    expect(policy.stats()).to.deep.equal({ keys: 1, created: 4, evicted: 3 });
  });

  it('counts a failed or rejected call as finished too', async () => {
    const policy = keyed((k) => new Plain(k), { key: byTenant, maxKeys: 1 });
    await policy.execute(() => Promise.reject(new Error('x')), undefined, as('a')).catch(() => undefined);
    await policy.execute(() => 1, undefined, as('b'));
    expect(policy.get('a')).to.equal(undefined);
    expect(policy.stats().keys).to.equal(1);
  });

  describe('with circuit breakers', () => {
    let clock: sinon.SinonFakeTimers;
    beforeEach(() => {
      clock = sinon.useFakeTimers();
    });
    afterEach(() => clock.restore());

    it('never evicts an open breaker; evicts it once it is no longer open', async () => {
      const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}`, consecutiveFailures: 1, openMs: 10_000 }), {
        key: (_request, context) => context.host as string,
        maxKeys: 2,
      });
      const host = (name: string): CallContext => ({ host: name });
      await perHost.execute(() => Promise.reject(new Error('down')), undefined, host('down.example')).catch(() => undefined);
      const open = perHost.get('down.example')!;
      expect(open.state).to.equal('open');
      for (const name of ['a.example', 'b.example', 'c.example']) await perHost.execute(() => 1, undefined, host(name));
      expect(perHost.get('down.example')).to.equal(open);
      expect(await perHost.execute(() => 1, undefined, host('down.example')).catch((e: unknown) => e)).to.be.instanceOf(CircuitOpenError);
      // After openMs the breaker would let a probe through: it is half-open, not open, and may go.
      clock.tick(10_000);
      expect(open.state).to.equal('half-open');
      for (const name of ['d.example', 'e.example']) await perHost.execute(() => 1, undefined, host(name));
      expect(perHost.get('down.example')).to.equal(undefined);
    });

    it('looks for open breakers inside pipelines too', async () => {
      const perTenant = keyed(() => pipeline(rateLimit({ limit: 100, windowMs: 1000 }), circuitBreaker({ consecutiveFailures: 1 })), {
        key: byTenant,
        maxKeys: 1,
      });
      await perTenant.execute(() => Promise.reject(new Error('down')), undefined, as('t1')).catch(() => undefined);
      const tripped = perTenant.get('t1')!;
      await perTenant.execute(() => 1, undefined, as('t2'));
      await perTenant.execute(() => 1, undefined, as('t3'));
      expect(perTenant.get('t1')).to.equal(tripped);
      // health() and metrics see the live policies through walk().
      const breakers = [...walk(perTenant)].filter((p) => p.kind === 'circuit-breaker') as Array<ReturnType<typeof circuitBreaker>>;
      expect(breakers.map((b) => b.state)).to.deep.equal(['open']);
    });

    it('forced-open breakers stay until forced closed', async () => {
      const perHost = keyed(() => circuitBreaker(), { key: byTenant, maxKeys: 1 });
      await perHost.execute(() => 1, undefined, as('isolated'));
      const breaker = perHost.get('isolated')!;
      breaker.forceOpen();
      for (const tenant of ['x', 'y', 'z']) await perHost.execute(() => 1, undefined, as(tenant));
      expect(perHost.get('isolated')).to.equal(breaker);
      breaker.forceClosed();
      await perHost.execute(() => 1, undefined, as('w'));
      expect(perHost.get('isolated')).to.equal(undefined);
    });
  });

  it('rejects the call when the factory throws, and tries again next time', async () => {
    let fail = true;
    const policy = keyed(
      (k) => {
        if (fail) throw new Error('cannot build');
        return new Plain(k);
      },
      { key: byTenant },
    );
    expect(await policy.execute(() => 1, undefined, as('a')).catch((e: unknown) => (e as Error).message)).to.equal('cannot build');
    expect(policy.stats()).to.deep.equal({ keys: 0, created: 0, evicted: 0 });
    fail = false;
    expect(await policy.execute(() => 1, undefined, as('a'))).to.equal(1);
    expect(policy.stats().created).to.equal(1);
  });

  it('rejects the call when the factory returns something that is not a policy', async () => {
    const policy = keyed(() => ({}) as Policy, { key: byTenant });
    const error = await policy.execute(() => 1, undefined, as('a')).catch((e: unknown) => e);
    expect(error).to.be.instanceOf(TypeError);
    expect((error as Error).message).to.equal('keyed: factory must return a policy (an object with execute()), got object for key "a"');
  });

  it('runs policies from elsewhere (no internal entry point) through execute', async () => {
    const foreign: Policy = {
      name: 'foreign',
      kind: 'bulkhead',
      execute: (fn, signal, context) => Promise.resolve(fn({ signal: signal ?? new AbortController().signal, attempt: 1, context: context ?? {} })),
      stats: () => ({}),
    };
    const policy = keyed(() => foreign, { key: byTenant });
    const context = as('a');
    expect(await policy.execute(({ context: c }) => c, undefined, context)).to.equal(context);
  });

  describe('validation', () => {
    const factory = (k: string): Plain => new Plain(k);
    it('throws TypeErrors that name the option and the value', () => {
      expect(() => keyed('x' as never, { key: byTenant })).to.throw(TypeError, 'keyed: factory must be a function, got "x"');
      expect(() => keyed(factory, {} as never)).to.throw(TypeError, 'keyed: key must be a function, got undefined');
      expect(() => keyed(factory, undefined as never)).to.throw(TypeError, 'keyed: key must be a function, got undefined');
      expect(() => keyed(factory, { key: byTenant, maxKeys: 0 })).to.throw(TypeError, 'keyed: maxKeys must be a positive integer, got 0');
      expect(() => keyed(factory, { key: byTenant, maxKeys: -1 })).to.throw(TypeError, 'keyed: maxKeys must be a positive integer, got -1');
      expect(() => keyed(factory, { key: byTenant, maxKeys: NaN })).to.throw(TypeError, 'keyed: maxKeys must be a positive integer, got NaN');
      expect(() => keyed(factory, { key: byTenant, maxKeys: Infinity })).to.throw(TypeError, 'keyed: maxKeys must be a positive integer, got Infinity');
      expect(() => keyed(factory, { key: byTenant, maxKeys: '5' as never })).to.throw(TypeError, 'keyed: maxKeys must be a positive integer, got "5"');
      expect(() => keyed(factory, { key: byTenant, name: '' })).to.throw(TypeError, 'keyed: name must be a non-empty string, got ""');
      expect(() => keyed(factory, { key: byTenant, maxkeys: 5 } as never)).to.throw(TypeError, 'keyed: unknown option "maxkeys" (allowed: key, maxKeys, name)');
    });
  });
});
