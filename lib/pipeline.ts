import { BasePolicy, defaultName, run, runPolicy, type Call, type InternalFunction, type Policy } from './policy.js';

export interface PipelineStats {
  policies: number;
}

/**
 * Policies combined into one, outermost first: `pipeline(bulkhead, timeout, breaker)`
 * admits through the bulkhead, then times the call, then consults the breaker. A pipeline
 * is itself a policy and can be nested anywhere.
 *
 * @example
 * const guard = pipeline(bulkhead({ limit: 10 }), timeout(2000), circuitBreaker({ name: 'users-api' }));
 * const user = await guard.execute(({ signal }) => fetch(url, { signal }));
 */
export function pipeline(...policies: Policy[]): Pipeline {
  return new Pipeline(policies);
}

export class Pipeline extends BasePolicy<PipelineStats> {
  readonly kind = 'pipeline';
  readonly policies: readonly Policy[];

  constructor(policies: readonly Policy[], name?: string) {
    super(name ?? defaultName('pipeline'));
    policies.forEach((policy, index) => {
      if (typeof policy !== 'object' || policy === null || typeof policy.execute !== 'function') {
        throw new TypeError(`pipeline: argument ${index + 1} must be a policy (an object with execute()), got ${policy === null ? 'null' : typeof policy}`);
      }
    });
    this.policies = [...policies];
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    return runFrom(this.policies, 0, fn, call);
  }

  children(): Iterable<Policy> {
    return this.policies;
  }

  stats(): PipelineStats {
    return { policies: this.policies.length };
  }
}

function runFrom<T>(policies: readonly Policy[], index: number, fn: InternalFunction<T>, call: Call): Promise<T> {
  if (index === policies.length - 1) return runPolicy(policies[index]!, fn, call);
  if (index >= policies.length) return Promise.resolve().then(() => fn(call));
  return runPolicy(policies[index]!, (inner) => runFrom(policies, index + 1, fn, inner), call);
}

/** Every policy inside `policy` (itself included), depth first. */
export function* walk(policy: Policy): Generator<Policy> {
  yield policy;
  const children = policy.children?.();
  if (children !== undefined) for (const child of children) yield* walk(child);
}
