// The core entry point (`bulwark`): re-exports only. Framework adapters, the Redis store,
// Prometheus metrics and the dashboard have entry points of their own.

export {
  GuardRejection,
  CircuitOpenError,
  BulkheadFullError,
  TimeoutError,
  RateLimitError,
  OverloadError,
  ClientDisconnectedError,
  isGuardRejection,
  isClientDisconnected,
  type RejectionReason,
} from './errors.js';
export type {
  Policy,
  PolicyKind,
  PolicyEvents,
  ExecuteContext,
  GuardedFunction,
  CallContext,
  NormalizedRequest,
  RateLimitInfo,
} from './policy.js';
export type { Unsubscribe } from './events.js';
export type { Clock } from './clock.js';

export { pipeline, Pipeline, type PipelineStats } from './pipeline.js';
export {
  circuitBreaker,
  CircuitBreaker,
  type CircuitBreakerOptions,
  type CircuitBreakerStats,
  type CircuitBreakerEvents,
  type CircuitState,
  type TransitionReason,
  type ErrorClass,
} from './circuit-breaker.js';
export { bulkhead, Bulkhead, type BulkheadOptions, type BulkheadStats, type BulkheadEvents } from './bulkhead.js';
export { timeout, Timeout, type TimeoutOptions, type TimeoutStats, type TimeoutEvents } from './timeout.js';
export {
  retry,
  Retry,
  isTransientError,
  RETRYABLE_STATUSES,
  TRANSIENT_ERROR_CODES,
  type RetryOptions,
  type RetryStats,
  type RetryEvents,
} from './retry.js';
export { parseRetryAfter, type BackoffOptions, type Jitter } from './backoff.js';
export {
  fallback,
  Fallback,
  type FallbackOptions,
  type FallbackStats,
  type FallbackEvents,
  type FallbackReason,
  type FallbackFunction,
} from './fallback.js';
export { guardedFetch, HttpStatusError, isFailureStatus } from './fetch.js';
export { rateLimit, RateLimit, type RateLimitOptions, type RateLimitStats, type RateLimitEvents } from './rate-limit.js';
export { keyed, Keyed, type KeyedOptions, type KeyedStats, type KeyedEvents } from './keyed.js';
export { ipKey, canonicalIp } from './client-ip.js';
export { loadShedder, LoadShedder, type LoadShedderOptions, type LoadShedderStats } from './load-shedder.js';
export { sharedSampler, type PressureSample } from './pressure-sampler.js';
export {
  adaptiveConcurrency,
  AdaptiveConcurrency,
  isOverloadFailure,
  type AdaptiveConcurrencyOptions,
  type AdaptiveConcurrencyStats,
  type AdaptiveConcurrencyEvents,
  type AdaptiveConcurrencyAlgorithm,
} from './adaptive-concurrency.js';
export {
  chaos,
  Chaos,
  ChaosFaultError,
  type ChaosOptions,
  type ChaosStats,
  type ChaosEvents,
  type ChaosLatency,
  type ChaosFault,
  type ChaosSwitch,
} from './chaos.js';
export { health, healthResponse, guardHealth, isDegrading, type Health, type GuardHealth, type GuardState } from './health.js';
export { observe, type ObserveOptions, type ObserveLogger, type ObservableStore, type Policies } from './observe.js';
export { memoryStore, MemoryStore, type MemoryStoreOptions } from './stores/memory.js';
export type {
  RateLimitStore,
  RateLimitRule,
  RateLimitDecision,
  RateLimitAlgorithm,
  BreakerStore,
  BreakerLink,
  BreakerPeerHandler,
  SharedBreakerState,
} from './stores/types.js';
