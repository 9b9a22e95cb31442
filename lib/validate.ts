// Construction-time checks shared by every factory. Each throws a TypeError that names the
// guard, the option, the value received and what is allowed, e.g.
// `bulkhead: limit must be a positive integer, got -1`.

function show(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return String(value);
  if (value === null || value === undefined) return String(value);
  if (typeof value === 'function') return 'a function';
  if (Array.isArray(value)) return 'an array';
  try {
    return JSON.stringify(value) ?? typeof value;
  } catch {
    return typeof value;
  }
}

export function fail(guard: string, option: string, allowed: string, value: unknown): never {
  throw new TypeError(`${guard}: ${option} must be ${allowed}, got ${show(value)}`);
}

/** Throws unless `options` is undefined or a plain object. */
export function optionsObject<T extends object>(guard: string, options: T | undefined): Partial<T> {
  if (options === undefined) return {};
  if (typeof options !== 'object' || options === null || Array.isArray(options)) fail(guard, 'options', 'an object', options);
  return options;
}

export function positiveInteger(guard: string, option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) fail(guard, option, 'a positive integer', value);
  return value;
}

export function nonNegativeInteger(guard: string, option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) fail(guard, option, 'a non-negative integer', value);
  return value;
}

/** A finite duration in milliseconds, > 0 (or >= 0 when `allowZero`). */
export function duration(guard: string, option: string, value: unknown, allowZero = false): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || (!allowZero && value === 0)) {
    fail(guard, option, allowZero ? 'a finite number of milliseconds >= 0' : 'a finite number of milliseconds > 0', value);
  }
  // setTimeout clamps larger values to 1 ms, which would turn a long wait into none at all.
  if (value > 2_147_483_647) fail(guard, option, 'at most 2147483647 ms (about 24.8 days)', value);
  return value;
}

/** A percentage in 0..100 (exclusive of 0 when `allowZero` is false). */
export function percentage(guard: string, option: string, value: unknown, allowZero = false): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value > 100 || value < 0 || (!allowZero && value === 0)) {
    fail(guard, option, allowZero ? 'a number from 0 to 100' : 'a number above 0 and at most 100', value);
  }
  return value;
}

/** A probability in 0..1. */
export function rate(guard: string, option: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || value > 1) fail(guard, option, 'a number from 0 to 1', value);
  return value;
}

export function finiteNumber(guard: string, option: string, value: unknown, min: number, max = Infinity): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
    fail(guard, option, max === Infinity ? `a finite number >= ${min}` : `a number from ${min} to ${max}`, value);
  }
  return value;
}

export function func<F>(guard: string, option: string, value: unknown): F {
  if (typeof value !== 'function') fail(guard, option, 'a function', value);
  return value as F;
}

export function oneOf<T extends string>(guard: string, option: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    fail(guard, option, `one of ${allowed.map((a) => `'${a}'`).join(', ')}`, value);
  }
  return value as T;
}

export function name(guard: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value.length === 0) fail(guard, 'name', 'a non-empty string', value);
  return value;
}

/** Rejects option names the guard does not know, which are almost always typos. */
export function knownKeys(guard: string, options: object, allowed: readonly string[]): void {
  for (const key of Object.keys(options)) {
    if (!allowed.includes(key)) throw new TypeError(`${guard}: unknown option "${key}" (allowed: ${allowed.join(', ')})`);
  }
}

/** An injected time source: undefined, or an object with a `now()` method. */
export function clockOption<C extends { now(): number }>(guard: string, value: C | undefined): C | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'object' || value === null || typeof value.now !== 'function') fail(guard, 'clock', 'an object with a now() method', value);
  return value;
}
