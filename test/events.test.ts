import { expect } from 'chai';
import { adaptiveConcurrency } from '../lib/adaptive-concurrency.js';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { loadShedder } from '../lib/load-shedder.js';
import { pipeline } from '../lib/pipeline.js';
import type { Policy } from '../lib/policy.js';
import { sharedSampler } from '../lib/pressure-sampler.js';
import { rateLimit } from '../lib/rate-limit.js';
import { timeout } from '../lib/timeout.js';

// `admitted` from every guard that can refuse, alone and inside a fused pipeline.
describe('admitted events', () => {
  after(() => sharedSampler.stop());

  type Admitting = Policy & { on(event: 'admitted', listener: () => void): () => void };
  const guards = (): Record<string, Admitting> => ({
    circuitBreaker: circuitBreaker(),
    bulkhead: bulkhead({ limit: 1 }),
    rateLimit: rateLimit({ limit: 1, windowMs: 60_000 }),
    loadShedder: loadShedder({ maxHeapUsedBytes: 2 ** 50 }),
    adaptiveConcurrency: adaptiveConcurrency(),
  });

  const placements: Record<string, (guard: Admitting) => Policy> = {
    alone: (guard) => guard,
    'in a pipeline': (guard) => pipeline(bulkhead({ limit: 10 }), timeout(1000), guard),
  };
  for (const [name, make] of Object.entries(placements)) {
    it(`is published once per admitted call, ${name}`, async () => {
      for (const [kind, guard] of Object.entries(guards())) {
        let admitted = 0;
        const off = guard.on('admitted', () => admitted++);
        await make(guard).execute(() => 'ok');
        expect(admitted, kind).to.equal(1);
        off();
        await make(guard).execute(() => 'ok').catch(() => undefined);
        expect(admitted, `${kind} after unsubscribing`).to.equal(1);
      }
    });
  }

  it('is not published for a refused call', async () => {
    const breaker = circuitBreaker();
    breaker.forceOpen();
    let admitted = 0;
    breaker.on('admitted', () => admitted++);
    await breaker.execute(() => 'no').catch(() => undefined);
    expect(admitted).to.equal(0);
  });
});
