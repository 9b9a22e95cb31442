import { createHash } from 'node:crypto';
import { tokenBucketConsume, type TokenBucketState } from '../algorithms.js';
import type { RateLimitDecision } from '../types.js';
import type { RedisArgument, RedisClientLike } from './client.js';

// Every decision is one Lua script: atomic per key, one round trip, and the key's expiry set
// in the same script that writes it (INCR then EXPIRE as two commands can leave a key
// without a TTL forever: redis/redis#4548). Time comes from the server's TIME, so instances
// whose clocks disagree still share one window (spring-cloud-gateway#2412).
//
// The rate-limit scripts are ports of lib/stores/algorithms.ts, expression for expression;
// keep the two in step (test/redis/rate-limit.test.ts checks them against each other on
// random sequences). Lua numbers are doubles like JavaScript's, so the same expressions
// give the same results.
//
// Redis runs the decisions of every instance on one core, so the scripts are written for
// what Redis spends per call (instructions counted with callgrind, Redis 7.0): 13k to run a
// script at all, 4–6k per redis.call() (13k for a SET with an expiry), 1.2k per argument
// of EVALSHA, 5k to turn a returned table into a reply, 1–4k to parse or print a decimal
// number, 0.4k per call of a C function such as math.floor. Hence:
// - the limit and the window are literals in a script of each limiter's own, not arguments;
// - state is one string of packed doubles (struct), read with GET and never parsed or
//   printed as decimal text: exact to the last bit, and cheaper than a hash;
// - the reply is one integer (see decodeReply);
// - math.min and math.max are written as comparisons, which give the same numbers;
// - a whole number passed to a command is formatted with %d: Redis would print it with
//   %.17g, which costs it 2–4k.

export interface Script {
  readonly body: string;
  readonly sha: string;
}

function script(body: string): Script {
  return { body, sha: createHash('sha1').update(body).digest('hex') };
}

// Redis 5 and later replicate scripts by their effects, which is what makes a write after
// TIME legal; 3.2 and 4 need to be asked (the call is a no-op where it is the default).
// TIME's two numbers become one by arithmetic on the strings, which converts them as
// tonumber() would, once instead of twice.
const PRELUDE = `
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
`;

/** Every millisecond value a decision returns is at most this many times its window. */
const RADIX_WINDOWS = 2;
/** Largest integer a Lua (and JavaScript) number holds exactly. */
const MAX_EXACT = '9007199254740991';

/**
 * The radix of a limiter's packed replies: one more than any millisecond value a decision
 * returns (`resetMs` and `retryAfterMs` are at most 2 × windowMs for both algorithms).
 */
export function replyRadix(windowMs: number): number {
  return RADIX_WINDOWS * windowMs + 1;
}

// A limit and a window are positive safe integers (rateLimit checks), so String() writes
// them as Lua reads them. One script per setting rather than per call: a service has a few
// settings, and Redis keeps each script it is sent (recent versions drop the least
// recently used of more than 500 sent with EVAL, redis/redis#13108; the store then sends it
// again: NOSCRIPT → EVAL).
function constants(limit: number, windowMs: number): string {
  return `local limit = ${String(limit)}
local windowMs = ${String(windowMs)}
local radix = ${String(replyRadix(windowMs))}`;
}

// A decision's reply: remaining × radix + resetMs when admitted, −(retryAfterMs × radix +
// resetMs) when refused; {remaining, resetMs} or {−retryAfterMs, resetMs} in the rare case
// where that integer would pass 2^53 (limit × windowMs or windowMs² beyond about 4.5e15:
// a billion calls per 75 minutes, refusals in a window of 13 hours).
const ADMIT = (remaining: string, reset: string): string => `local r = ${remaining} * radix + ${reset}
  if r <= ${MAX_EXACT} then return r end
  return {${remaining}, ${reset}}`;
const REFUSE = (retry: string, reset: string): string => `local r = ${retry} * radix + ${reset}
if r <= ${MAX_EXACT} then return -r end
return {-${retry}, ${reset}}`;

/**
 * Sliding window counter of one limiter. KEYS[1] a string of three packed doubles: window
 * start, previous count, current count. Returns a packed decision (decodeReply).
 *
 * Within a window an admission overwrites the current count in place (SETRANGE keeps the
 * expiry), and the expiry is set once per window, as the absolute time the key goes idle
 * (slidingWindowIdle: start + 2 × windowMs). A refusal writes nothing, not even when the
 * window rolled: the stored state then rolls the same way on the next call, and expires
 * when the rolled state would have gone idle.
 */
export function slidingWindowScript(limit: number, windowMs: number): Script {
  return script(`${constants(limit, windowMs)}${PRELUDE}
local key = KEYS[1]
local s = redis.call('GET', key)
local stored, p, c
if s then stored, p, c = struct.unpack('<ddd', s) end
-- A clock that steps back must not reset a spent window (slidingWindowConsume does the same).
if stored ~= nil and now < stored then now = stored end
local start = math.floor(now / windowMs) * windowMs
local previous = 0
local current = 0
if stored == start then
  previous = p
  current = c
elseif stored ~= nil and start - stored == windowMs then
  previous = c
end
local left = windowMs - (now - start)
local estimate = (previous * left) / windowMs + current
if estimate + 1 <= limit + 1e-9 then
  if stored == start then
    redis.call('SETRANGE', key, '16', struct.pack('<d', current + 1))
  else
    redis.call('SET', key, struct.pack('<ddd', start, previous, 1))
    redis.call('PEXPIREAT', key, string.format('%d', start + 2 * windowMs))
  end
  local remaining = math.floor(limit - estimate - 1)
  if remaining < 0 then remaining = 0 end
  local reset = math.ceil(left + windowMs)
  ${ADMIT('remaining', 'reset')}
end
local wait
local room = limit - 1 - current
if room >= 0 and previous > 0 and left - (windowMs * room) / previous <= left then
  wait = left - (windowMs * room) / previous
  if wait < 0 then wait = 0 end
elseif current <= limit - 1 then
  wait = left
else
  wait = left + windowMs - (windowMs * (limit - 1)) / current
end
local reset = left
if current > 0 then reset = left + windowMs end
reset = math.ceil(reset)
local retry = math.ceil(wait)
if retry < 1 then retry = 1 end
${REFUSE('retry', 'reset')}
`);
}

/**
 * Token bucket of one limiter. KEYS[1] a string of two packed doubles: tokens, and when
 * they were brought up to date. Returns a packed decision (decodeReply). The expiry is the
 * time until the bucket is full again (tokenBucketIdle): a full bucket and a missing key
 * decide alike.
 *
 * A missing key is the common case: with a limit that a client rarely spends, its bucket
 * is full again, and its key gone, long before its next call. Its decision depends on the
 * limiter alone, so it is computed once, here, by tokenBucketConsume itself, and the script
 * only writes it out.
 */
export function tokenBucketScript(limit: number, windowMs: number): Script {
  const full: TokenBucketState = { tokens: limit, at: 0 };
  const first = tokenBucketConsume(full, 0, limit, windowMs);
  return script(`${constants(limit, windowMs)}${PRELUDE}
local key = KEYS[1]
local s = redis.call('GET', key)
if not s then
  local ttl = '${String(Math.max(1, first.resetMs))}'
  redis.call('SET', key, struct.pack('<dd', ${String(full.tokens)}, now), 'PX', ttl)
  return ${luaReply(first, replyRadix(windowMs))}
end
local tokens, at = struct.unpack('<dd', s)
-- A clock that steps back must not move 'at' back: the same span would refill twice.
if now > at then
  tokens = tokens + ((now - at) * limit) / windowMs
  if tokens > limit then tokens = limit end
  at = now
end
local allowed = false
if tokens >= 1 - 1e-9 then
  tokens = tokens - 1
  if tokens < 0 then tokens = 0 end
  allowed = true
end
local reset = math.ceil(((limit - tokens) * windowMs) / limit)
local ttl = reset
if ttl < 1 then ttl = 1 end
ttl = string.format('%d', ttl)
-- Written on a refusal too: skipping it would describe the same bucket mathematically, but
-- not to the last bit, and the two stores must decide alike at every edge.
redis.call('SET', key, struct.pack('<dd', tokens, at), 'PX', ttl)
if allowed then
  local remaining = math.floor(tokens)
  ${ADMIT('remaining', 'reset')}
end
local retry = math.ceil(((1 - tokens) * windowMs) / limit)
if retry < 1 then retry = 1 end
${REFUSE('retry', 'reset')}
`);
}

/** A decision as the Lua expression a script returns for it (see decodeReply). */
function luaReply(decision: RateLimitDecision, radix: number): string {
  const head = decision.allowed ? decision.remaining : -decision.retryAfterMs;
  const packed = Math.abs(head) * radix + decision.resetMs;
  if (packed <= Number.MAX_SAFE_INTEGER) return String(head < 0 ? -packed : packed);
  return `{${String(head)}, ${String(decision.resetMs)}}`;
}

/**
 * The decision a rate-limit script replied, or undefined for a reply it cannot have sent.
 * `radix` is the limiter's replyRadix(windowMs).
 */
export function decodeReply(reply: unknown, limit: number, radix: number): RateLimitDecision | undefined {
  // head: remaining (admitted) or −retryAfterMs (refused).
  let head: number;
  let resetMs: number;
  if (typeof reply === 'number') {
    const packed = Math.abs(reply);
    // Remainder first: the quotient of two exact integers is then exact too.
    resetMs = packed % radix;
    head = (packed - resetMs) / radix;
    if (reply < 0) head = -head;
  } else if (Array.isArray(reply) && reply.length === 2 && typeof reply[0] === 'number' && typeof reply[1] === 'number') {
    head = reply[0];
    resetMs = reply[1];
  } else {
    return undefined;
  }
  if (head >= 0) return { allowed: true, limit, remaining: head, resetMs, retryAfterMs: 0 };
  return { allowed: false, limit, remaining: 0, resetMs, retryAfterMs: -head };
}

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
