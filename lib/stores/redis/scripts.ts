import { createHash } from 'node:crypto';
import type { RedisArgument, RedisClientLike } from './client.js';

// Every decision is one Lua script: atomic per key, one round trip, and the key's expiry set
// in the same script that writes it (INCR then EXPIRE as two commands can leave a key
// without a TTL forever: redis/redis#4548). Time comes from the server's TIME, so instances
// whose clocks disagree still share one window (spring-cloud-gateway#2412).
//
// The rate-limit scripts are ports of lib/stores/algorithms.ts, expression for expression;
// keep the two in step (test/redis/rate-limit.test.ts checks them against each other on
// random sequences). Lua numbers are doubles like JavaScript's, so the same expressions
// give the same results, and stored fractions are written with 17 significant digits so
// that they round-trip exactly.

export interface Script {
  readonly body: string;
  readonly sha: string;
}

function script(body: string): Script {
  return { body, sha: createHash('sha1').update(body).digest('hex') };
}

// Redis 5 and later replicate scripts by their effects, which is what makes a write after
// TIME legal; 3.2 and 4 need to be asked (the call is a no-op where it is the default).
const PRELUDE = `
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
`;

/**
 * Sliding window counter. KEYS[1] hash {s = window start, p = previous count, c = current
 * count}; ARGV limit, windowMs. Returns {allowed, remaining, resetMs, retryAfterMs}.
 *
 * Within a window an admission is one HINCRBY, and the expiry is set once per window, as
 * the absolute time the key goes idle (slidingWindowIdle: start + 2 × windowMs). A refusal
 * writes nothing, not even when the window rolled: the stored state then rolls the same way
 * on the next call, and expires when the rolled state would have gone idle.
 */
export const slidingWindowScript = script(`${PRELUDE}
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local windowMs = tonumber(ARGV[2])
local s = redis.call('HMGET', key, 's', 'p', 'c')
local stored = tonumber(s[1])
-- A clock that steps back must not reset a spent window (slidingWindowConsume does the same).
if stored ~= nil and now < stored then now = stored end
local start = math.floor(now / windowMs) * windowMs
local previous = 0
local current = 0
if stored == start then
  previous = tonumber(s[2])
  current = tonumber(s[3])
elseif stored ~= nil and start - stored == windowMs then
  previous = tonumber(s[3])
end
local left = windowMs - (now - start)
local estimate = (previous * left) / windowMs + current
if estimate + 1 <= limit + 1e-9 then
  if stored == start then
    redis.call('HINCRBY', key, 'c', 1)
  else
    redis.call('HSET', key, 's', start, 'p', previous, 'c', 1)
    redis.call('PEXPIREAT', key, start + 2 * windowMs)
  end
  return {1, math.max(0, math.floor(limit - estimate - 1)), math.ceil(left + windowMs), 0}
end
local wait
local room = limit - 1 - current
if room >= 0 and previous > 0 and left - (windowMs * room) / previous <= left then
  wait = math.max(0, left - (windowMs * room) / previous)
elseif current <= limit - 1 then
  wait = left
else
  wait = left + windowMs - (windowMs * (limit - 1)) / current
end
local reset = left
if current > 0 then reset = left + windowMs end
return {0, 0, math.ceil(reset), math.max(1, math.ceil(wait))}
`);

/**
 * Token bucket. KEYS[1] string "<tokens> <at>" (at: when tokens was brought up to date);
 * ARGV limit, windowMs. Returns {allowed, remaining, resetMs, retryAfterMs}. The expiry is
 * the time until the bucket is full again (tokenBucketIdle): a full bucket and a missing key
 * decide alike.
 */
export const tokenBucketScript = script(`${PRELUDE}
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local windowMs = tonumber(ARGV[2])
local tokens = limit
local at = now
local s = redis.call('GET', key)
if s then
  local a, b = string.match(s, '^(%S+) (%S+)$')
  tokens = tonumber(a)
  at = tonumber(b)
end
-- A clock that steps back must not move 'at' back: the same span would refill twice.
if now > at then
  tokens = math.min(limit, tokens + ((now - at) * limit) / windowMs)
  at = now
end
local allowed = 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
  allowed = 1
end
local reset = math.ceil(((limit - tokens) * windowMs) / limit)
-- Written on a refusal too: skipping it would describe the same bucket mathematically, but
-- not to the last bit, and the two stores must decide alike at every edge. %.17g keeps
-- every bit of both numbers.
redis.call('SET', key, string.format('%.17g %.17g', tokens, at), 'PX', math.max(1, reset))
if allowed == 1 then return {1, math.floor(tokens), reset, 0} end
return {0, 0, reset, math.max(1, math.ceil(((1 - tokens) * windowMs) / limit))}
`);

// Breaker state: a hash {state = 'open', until = Redis ms, by = origin} that exists only
// while some instance has the breaker open (or half-open: `until` has passed), with an
// expiry, plus messages on one channel per store prefix. Times are whole milliseconds here
// because cjson encodes numbers with 14 significant digits.
const BREAKER_PRELUDE = `
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`;

/**
 * KEYS[1] state hash; ARGV channel, origin, name, openMs, linger (how long the record
 * outlives the open period). Returns the shared `until`.
 */
export const breakerOpenScript = script(`${BREAKER_PRELUDE}
local openMs = tonumber(ARGV[4])
local untilMs = now + openMs
redis.call('HSET', KEYS[1], 'state', 'open', 'until', untilMs, 'by', ARGV[2])
redis.call('PEXPIRE', KEYS[1], openMs + tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[1], cjson.encode({s = 'open', n = ARGV[3], o = ARGV[2], u = untilMs, r = openMs}))
return untilMs
`);

/**
 * KEYS[1] state hash; ARGV channel, origin, name, known (the latest `until` the closer has
 * seen). A close never undoes an open the closer has not heard of: then nothing changes and
 * the script answers {0, until, remaining} so that the closer opens too. Else {1}.
 */
export const breakerCloseScript = script(`${BREAKER_PRELUDE}
local untilMs = tonumber(redis.call('HGET', KEYS[1], 'until'))
if untilMs ~= nil and untilMs > tonumber(ARGV[4]) then
  return {0, untilMs, untilMs - now}
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], cjson.encode({s = 'closed', n = ARGV[3], o = ARGV[2]}))
return {1}
`);

/** KEYS[1] state hash. Returns {until, remaining, by} or {} when no instance has it open. */
export const breakerReadScript = script(`${BREAKER_PRELUDE}
local s = redis.call('HMGET', KEYS[1], 'until', 'by')
local untilMs = tonumber(s[1])
if untilMs == nil then return {} end
return {untilMs, untilMs - now, s[2]}
`);

/**
 * KEYS[1] probe lock; ARGV token, ttlMs. Returns {1} when the token holds the lock (newly or
 * already), else {0, the lock's remaining ms}.
 */
export const probeAcquireScript = script(`
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1}
end
return {0, redis.call('PTTL', KEYS[1])}
`);

/**
 * KEYS[1] probe lock; ARGV token. Deletes the lock only if the token still holds it (it may
 * have expired and gone to another instance meanwhile).
 */
export const probeReleaseScript = script(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
`);

/** The server does not have the script: EVAL it instead. */
export function isNoScript(error: unknown): boolean {
  return error instanceof Error && error.message.startsWith('NOSCRIPT');
}

/** EVALSHA, and EVAL when the server does not have the script (first use, restart, flush). */
export function evalScript(client: RedisClientLike, s: Script, key: string, args: RedisArgument[]): Promise<unknown> {
  return client.evalsha(s.sha, 1, key, ...args).catch((error: unknown) => {
    if (isNoScript(error)) return client.eval(s.body, 1, key, ...args);
    throw error;
  });
}
