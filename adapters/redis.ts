// `bulwark/redis`: shared state for rate limits and circuit breakers over an ioredis client.
// The implementation lives in the core (it needs no dependency: the client is described
// structurally), this entry point only gives it its own import path.
export {
  redisStore,
  RedisStore,
  RedisTimeoutError,
  type RedisStoreOptions,
  type RedisStoreStats,
  type RedisStoreEvents,
  type RedisStoreLogger,
  type RedisOperation,
  type RedisClientLike,
  type RedisSubscriberClient,
  type RedisCallback,
  type RedisArgument,
} from '../lib/stores/redis.js';
