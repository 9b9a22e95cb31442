import { compile, FusedSegment, isDeadline, isFusable, runNested } from './fused.js';
import { BasePolicy, defaultName, run, runPolicy, type Call, type CallContext, type GuardedFunction, type InternalFunction, type Policy } from './policy.js';

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
    // A nested pipeline of ours is only composition, so its guards join this one's and
    // can be fused with their neighbours.
    this.parts = compile(this.policies.flatMap((policy) => (policy instanceof Pipeline ? policy.flat : [policy])));
    const only = this.parts.length === 1 ? this.parts[0] : undefined;
    this.lone = only instanceof FusedSegment ? only : undefined;
  }

  /** The one fused segment this pipeline is, when it is one. */
  private readonly lone: FusedSegment | undefined;

  override execute<T>(fn: GuardedFunction<T>, signal?: AbortSignal, context?: CallContext): Promise<T> {
    // Without a signal nothing outside can cancel the call: the segment's record is the call.
    const lone = this.lone;
    if (signal === undefined && lone !== undefined) return lone.runRoot(fn, context);
    return super.execute(fn, signal, context);
  }

  /** The guards in order, nested pipelines of ours opened up. */
  private get flat(): readonly Policy[] {
    return this.parts.flatMap((part) => (part instanceof FusedSegment ? part.policies : [part]));
  }

  private readonly parts: ReadonlyArray<FusedSegment | Policy>;

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    const lone = this.lone;
    if (lone !== undefined) return lone.run(fn, call);
    return runParts(this.parts, 0, fn, call);
  }

  children(): Iterable<Policy> {
    return this.policies;
  }

  /** @internal The single fused segment this pipeline runs as; null when it is empty, undefined when it is more than one segment. */
  get segment(): FusedSegment | null | undefined {
    if (this.lone !== undefined) return this.lone;
    const parts = this.parts;
    if (parts.length === 0) return null;
    // One part that is not a fused segment: a guard on its own.
    return parts.length > 1 ? undefined : soleSegment(parts[0] as Policy);
  }

  stats(): PipelineStats {
    return { policies: this.policies.length };
  }
}

function runParts<T>(parts: ReadonlyArray<FusedSegment | Policy>, index: number, fn: InternalFunction<T>, call: Call): Promise<T> {
  const part = parts[index];
  if (part === undefined) return runNested([], 0, fn, call);
  const next: InternalFunction<T> = index === parts.length - 1 ? fn : (inner) => runParts(parts, index + 1, fn, inner);
  return part instanceof FusedSegment ? part.run(next, call) : runPolicy(part, next, call);
}

/**
 * The fused segment `policy` runs as, for callers that drive a segment without promises
 * (the HTTP exchange): null when there is nothing to run through, undefined when `policy`
 * is not one segment.
 */
export function fusedSegmentOf(policy: Policy): FusedSegment | null | undefined {
  return policy instanceof Pipeline ? policy.segment : soleSegment(policy);
}

function soleSegment(policy: Policy): FusedSegment | undefined {
  if (isDeadline(policy)) return new FusedSegment([policy], 0);
  if (isFusable(policy)) return new FusedSegment([policy], -1);
  return undefined;
}

/** Every policy inside `policy` (itself included), depth first. */
export function* walk(policy: Policy): Generator<Policy> {
  yield policy;
  const children = policy.children?.();
  if (children !== undefined) for (const child of children) yield* walk(child);
}
