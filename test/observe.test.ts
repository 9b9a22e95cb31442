import { expect } from 'chai';
import sinon from 'sinon';
import { adaptiveConcurrency } from '../lib/adaptive-concurrency.js';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { Emitter } from '../lib/events.js';
import { keyed } from '../lib/keyed.js';
import { GuardTracker, observe, type ObserveLogger } from '../lib/observe.js';
import { pipeline } from '../lib/pipeline.js';
import type { Policy } from '../lib/policy.js';
import { rateLimit } from '../lib/rate-limit.js';
import { retry } from '../lib/retry.js';
import type { RateLimitStore } from '../lib/stores/types.js';

interface Line {
  level: 'warn' | 'info' | 'debug';
  object: Record<string, unknown>;
  message: string;
}

function memoryLogger(debug = false): ObserveLogger & { lines: Line[] } {
  const lines: Line[] = [];
  const write = (level: Line['level']) => (object: object, message: string) => lines.push({ level, object: object as Record<string, unknown>, message });
  return { lines, warn: write('warn'), info: write('info'), debug: write('debug'), isLevelEnabled: (level) => level !== 'debug' || debug };
}

/** True while any listener is subscribed to the guard (its lazy emitter exists and is active). */
function listened(policy: Policy): boolean {
  const events = (policy as unknown as { events?: Emitter<object> }).events;
  return events !== undefined && events.active;
}

const fail = (): Promise<never> => Promise.reject(new Error('down'));

describe('observe', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => {
    clock = sinon.useFakeTimers();
  });
  afterEach(() => clock.restore());

  it('logs a breaker opening as a warning, half-open and closed as info', async () => {
    const logger = memoryLogger();
    const breaker = circuitBreaker({ name: 'prices', consecutiveFailures: 2, openMs: 1000 });
    observe([pipeline(breaker)], { logger });
    await breaker.execute(fail).catch(() => {});
    await breaker.execute(fail).catch(() => {});
    await clock.tickAsync(1000);
    await breaker.execute(() => 'ok');
    expect(logger.lines.map((l) => [l.level, l.message])).to.deep.equal([
      ['warn', 'circuit breaker "prices" opened (consecutive-failures)'],
      ['info', 'circuit breaker "prices" half-open: letting probes through'],
      ['info', 'circuit breaker "prices" closed (probes-succeeded)'],
    ]);
    expect(logger.lines[0]!.object).to.deep.equal({ guard: 'prices', kind: 'circuit-breaker', from: 'closed', to: 'open', reason: 'consecutive-failures' });
  });

  it('logs bulkhead queue timeouts at most once per throttleMs, with the count held back', async () => {
    const logger = memoryLogger();
    const pool = bulkhead({ name: 'pool', limit: 1, queue: 10, queueTimeoutMs: 100 });
    observe(pool, { logger, throttleMs: 1000 });
    let release!: () => void;
    const running = pool.execute(() => new Promise<void>((resolve) => (release = resolve)));
    const waiting = Array.from({ length: 3 }, () => pool.execute(() => undefined).catch((e: unknown) => e));
    // A queue timeout fires at queueTimeoutMs, or up to one tick of the queue later.
    await clock.tickAsync(150);
    await Promise.all(waiting);
    expect(logger.lines).to.have.length(1);
    expect(logger.lines[0]).to.deep.include({ level: 'warn', message: 'bulkhead "pool": a call timed out after waiting 100 ms in the queue' });
    const more = pool.execute(() => undefined).catch((e: unknown) => e);
    await clock.tickAsync(150);
    await more;
    await clock.tickAsync(900);
    expect(logger.lines).to.have.length(1);
    const late = pool.execute(() => undefined).catch((e: unknown) => e);
    await clock.tickAsync(150);
    await late;
    expect(logger.lines).to.have.length(2);
    expect(logger.lines[1]!.object).to.deep.include({ guard: 'pool', count: 4 });
    expect(logger.lines[1]!.message).to.equal('bulkhead "pool": 4 calls timed out after waiting 100 ms in the queue');
    release();
    await running;
  });

  it('logs the errors of a rate limit store, and of stores listed in options, throttled', async () => {
    const logger = memoryLogger();
    const emitter = new Emitter<{ error: { error: Error; operation: string } }>();
    const store: RateLimitStore & { on: typeof emitter.on } = {
      consume: () => ({ allowed: true, limit: 1, remaining: 0, resetMs: 1, retryAfterMs: 0 }),
      size: () => 0,
      on: (event, listener) => emitter.on(event, listener),
    };
    const other = new Emitter<{ error: { error: Error; operation: string } }>();
    const stop = observe(rateLimit({ name: 'api', limit: 1, windowMs: 1000, store }), {
      logger,
      stores: [{ on: (event, listener) => other.on(event, listener) }],
    });
    emitter.emit('error', { error: new Error('ECONNREFUSED'), operation: 'rate-limit' });
    emitter.emit('error', { error: new Error('ECONNREFUSED'), operation: 'rate-limit' });
    other.emit('error', { error: new Error('timeout'), operation: 'breaker-sync' });
    expect(logger.lines.map((l) => [l.level, l.message])).to.deep.equal([
      ['warn', 'bulwark store error (rate-limit): ECONNREFUSED'],
      ['warn', 'bulwark store error (breaker-sync): timeout'],
    ]);
    expect(logger.lines[0]!.object).to.deep.include({ operation: 'rate-limit', guard: 'api', count: 1 });
    stop();
    expect(emitter.active).to.equal(false);
    expect(other.active).to.equal(false);
  });

  it('logs per-call events at debug only when the logger has debug on', async () => {
    const quiet = memoryLogger(false);
    const verbose = memoryLogger(true);
    const tries = retry({ name: 'tries', attempts: 2, backoff: { initialMs: 10, jitter: 'none' } });
    const limiter = rateLimit({ name: 'limit', limit: 1, windowMs: 1000 });
    observe([tries, limiter], { logger: quiet });
    expect(listened(tries)).to.equal(false);
    observe([tries, limiter], { logger: verbose });
    const call = tries.execute(({ attempt }) => (attempt === 1 ? Promise.reject(Object.assign(new Error('busy'), { status: 503 })) : 'ok'));
    await clock.tickAsync(10);
    await call;
    await limiter.execute(() => 'ok');
    await limiter.execute(() => 'ok').catch(() => {});
    expect(quiet.lines).to.deep.equal([]);
    expect(verbose.lines.map((l) => [l.level, l.message])).to.deep.equal([
      ['debug', 'tries: try 2 in 10 ms'],
      ['debug', 'limit: rejected (rate_limited)'],
    ]);
  });

  it('follows the policies a keyed guard creates later, and lets go of the evicted ones', async () => {
    const logger = memoryLogger();
    const perHost = keyed((host) => circuitBreaker({ name: `upstream:${host}`, consecutiveFailures: 1 }), {
      key: (_request, context) => String(context.host),
      maxKeys: 1,
    });
    await perHost.execute(() => 'ok', undefined, { host: 'early' });
    const early = perHost.get('early')!;
    observe(perHost, { logger });
    expect(listened(early)).to.equal(true);
    await perHost.execute(fail, undefined, { host: 'late' }).catch(() => {});
    expect(logger.lines.map((l) => l.message)).to.deep.equal(['circuit breaker "upstream:late" opened (consecutive-failures)']);
    // 'early' was evicted to make room for 'late': nothing listens to it any more.
    expect(perHost.get('early')).to.equal(undefined);
    expect(listened(early)).to.equal(false);
  });

  it('unsubscribes from every guard', async () => {
    const logger = memoryLogger(true);
    const breaker = circuitBreaker({ name: 'b', consecutiveFailures: 1 });
    const limiter = adaptiveConcurrency({ name: 'a' });
    const perKey = keyed(() => bulkhead({ limit: 1 }), { key: () => 'k' });
    await perKey.execute(() => 'ok');
    const stop = observe([pipeline(breaker, limiter), perKey], { logger });
    expect([breaker, limiter, perKey, perKey.get('k')!].map(listened)).to.deep.equal([true, true, true, true]);
    stop();
    stop();
    expect([breaker, limiter, perKey, perKey.get('k')!].map(listened)).to.deep.equal([false, false, false, false]);
    await breaker.execute(fail).catch(() => {});
    expect(logger.lines).to.deep.equal([]);
  });

  it('checks its options', () => {
    const breaker = circuitBreaker();
    expect(() => observe(breaker, undefined as never)).to.throw(TypeError, 'observe: logger must be an object with warn() and info() methods (pino, console…), got undefined');
    expect(() => observe(breaker, { logger: { warn() {} } } as never)).to.throw(TypeError, 'observe: logger must be an object');
    expect(() => observe(breaker, { logger: console, throttle: 1 } as never)).to.throw(TypeError, 'observe: unknown option "throttle"');
    expect(() => observe(breaker, { logger: console, throttleMs: -1 })).to.throw(TypeError, 'observe: throttleMs must be a finite number of milliseconds >= 0, got -1');
    expect(() => observe('x' as never, { logger: console })).to.throw(TypeError, 'observe: policies must be a policy or an iterable of policies');
  });
});

describe('GuardTracker', () => {
  it('attaches once per guard (shared guards too) and detaches on stop', () => {
    const shared = circuitBreaker({ name: 's' });
    const attached: string[] = [];
    const detached: string[] = [];
    const tracker = new GuardTracker([pipeline(shared), pipeline(shared, bulkhead({ name: 'b', limit: 1 }))], (guard) => {
      attached.push(guard.kind);
      return () => detached.push(guard.kind);
    });
    expect(attached).to.deep.equal(['pipeline', 'circuit-breaker', 'pipeline', 'bulkhead']);
    expect([...tracker.guards].map((g) => g.kind)).to.deep.equal(attached);
    tracker.stop();
    expect(detached.sort()).to.deep.equal([...attached].sort());
    expect(tracker.size).to.equal(0);
  });

  it('keeps a policy shared by two keys until both are evicted', async () => {
    const shared = circuitBreaker({ name: 'shared' });
    const perKey = keyed(() => shared, { key: (_r, context) => String(context.k), maxKeys: 2 });
    await perKey.execute(() => 1, undefined, { k: 'a' });
    const tracker = new GuardTracker([perKey]);
    await perKey.execute(() => 1, undefined, { k: 'b' });
    expect([...tracker.guards]).to.include(shared);
    await perKey.execute(() => 1, undefined, { k: 'c' });
    expect([...tracker.guards]).to.include(shared);
    tracker.stop();
  });
});
