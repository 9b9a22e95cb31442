// The guards' health in one object: what a readiness probe, a status page or a load
// balancer asks. Stateless: every call reads the guards as they are now.

import { JSON_TYPE, type HttpAnswer } from './http/answers.js';
import { guardsOf, policyList, type Policies } from './observe.js';
import type { Policy } from './policy.js';

/**
 * What a guard is doing now:
 * - circuit breaker: `closed`, `open` or `half-open`;
 * - load shedder: `shedding` or `ok`;
 * - bulkhead: `busy` (every place taken, calls wait), `full` (new calls are refused) or `ok`;
 * - adaptive concurrency: `full` (at its limit: new calls are refused) or `ok`;
 * - chaos: `on` or `off`;
 * - every other guard: `ok`.
 */
export type GuardState = 'closed' | 'open' | 'half-open' | 'ok' | 'busy' | 'full' | 'shedding' | 'on' | 'off';

export interface GuardHealth {
  name: string;
  kind: string;
  state: GuardState;
  /** The guard's own `stats()`. */
  stats: object;
}

export interface Health {
  /** `degraded` while a circuit breaker is open or a load shedder is shedding. */
  status: 'ok' | 'degraded';
  /** Every guard, pipelines walked and keyed guards' live policies included (pipelines themselves left out). */
  guards: GuardHealth[];
}

/**
 * The health of every guard inside `policies`: `degraded` while any circuit breaker is
 * open (forced open included) or any load shedder is shedding, else `ok`; and each guard's
 * name, kind, state and stats. Pipelines and keyed guards are walked (a guard that sits
 * in two pipelines is listed once); pipelines themselves are left out, having no state.
 *
 * @example
 * const { status, guards } = health([apiPolicy, searchPolicy]);
 * // status: 'degraded', guards: [{ name: 'prices', kind: 'circuit-breaker', state: 'open', stats: { … } }, …]
 */
export function health(policies: Policies): Health {
  const guards: GuardHealth[] = [];
  let degraded = false;
  for (const guard of guardsOf(policyList('health', policies))) {
    if (guard.kind === 'pipeline') continue;
    const entry = guardHealth(guard);
    if (isDegrading(entry.state)) degraded = true;
    guards.push(entry);
  }
  return { status: degraded ? 'degraded' : 'ok', guards };
}

/**
 * `health(policies)` as an HTTP answer, the same in every framework: `200` when ok, `503`
 * when degraded, the health as JSON, never cached. The adapters' `healthRoute(policies)`
 * send it; with plain Node, write it yourself.
 *
 * @example
 * http.createServer((req, res) => {
 *   if (req.url === '/health') {
 *     const { status, headers, body } = healthResponse(policies);
 *     res.writeHead(status, headers).end(body);
 *   }
 * });
 */
export function healthResponse(policies: Policies): HttpAnswer {
  const report = health(policies);
  return {
    status: report.status === 'ok' ? 200 : 503,
    headers: { 'content-type': JSON_TYPE, 'cache-control': 'no-store' },
    body: JSON.stringify(report),
  };
}

/**
 * One guard's entry of `health()`: its name, kind, state and stats.
 * @example guardHealth(breaker); // { name: 'prices-api', kind: 'circuit-breaker', state: 'open', stats: { … } }
 */
export function guardHealth(guard: Policy): GuardHealth {
  const stats = guard.stats();
  return { name: guard.name, kind: guard.kind, state: stateOf(guard.kind, stats as Record<string, unknown>), stats };
}

/**
 * True for the states that make the whole `degraded`: an open breaker, a shedding load shedder.
 * @example isDegrading(guardHealth(breaker).state);
 */
export function isDegrading(state: GuardState): boolean {
  return state === 'open' || state === 'shedding';
}

function stateOf(kind: string, stats: Record<string, unknown>): GuardState {
  switch (kind) {
    case 'circuit-breaker': {
      const state = stats.state;
      return state === 'open' || state === 'half-open' ? state : 'closed';
    }
    case 'load-shedder':
      return stats.shedding === true ? 'shedding' : 'ok';
    case 'bulkhead': {
      const { active, limit, queued, queue } = stats as { active: number; limit: number; queued: number; queue: number };
      if (active < limit) return 'ok';
      return queued >= queue ? 'full' : 'busy';
    }
    case 'adaptive-concurrency': {
      const { inflight, limit } = stats as { inflight: number; limit: number };
      return inflight >= limit ? 'full' : 'ok';
    }
    case 'chaos':
      return stats.enabled === false ? 'off' : 'on';
    default:
      return 'ok';
  }
}
