import { withoutStack } from './errors.js';
import { BasePolicy, defaultName, invoke, run, type Call, type InternalFunction, type NormalizedRequest, type PolicyEvents } from './policy.js';
import { duration, fail, func, knownKeys, name as checkName, optionsObject, rate } from './validate.js';

/** Decides per call whether chaos applies; receives the normalised request (undefined outside a request). */
export type ChaosSwitch = boolean | ((request: NormalizedRequest | undefined) => boolean);

/** Wait `ms` before the call, with probability `rate` (0..1). */
export interface ChaosLatency {
  ms: number;
  rate: number;
}

/**
 * Fail instead of calling, with probability `rate` (0..1): with `error` (an Error, or a
 * function of the request returning one), else with a `ChaosFaultError` carrying `status`.
 */
export interface ChaosFault {
  rate: number;
  /** Status of the default `ChaosFaultError`, 400..599 (default 500). */
  status?: number;
  error?: Error | ((request: NormalizedRequest | undefined) => Error);
}

export interface ChaosOptions {
  latency?: ChaosLatency;
  fault?: ChaosFault;
  /** On (default), off, or a per-request decision such as a header or a tenant. */
  enabled?: ChaosSwitch;
  /** Source of randomness in [0, 1) (default `Math.random`); tests pass a fixed sequence. */
  random?: () => number;
  name?: string;
}

export interface ChaosStats {
  /** False when switched off; true when on or decided per request. */
  enabled: boolean;
  injectedLatency: number;
  injectedFaults: number;
  calls: number;
}

export interface ChaosEvents extends PolicyEvents {
  /** A delay was injected before a call. */
  latency: { ms: number };
  /** A fault was thrown instead of calling. */
  fault: { error: Error };
}

/**
 * The error a chaos fault throws by default. It carries `status` and `statusCode`, so the
 * adapters and the frameworks' own error handlers answer with that status, and retry and
 * breakers treat it like the real failure it stands for.
 */
export class ChaosFaultError extends Error {
  readonly status: number;
  readonly statusCode: number;
  readonly code = 'BULWARK_CHAOS_FAULT';
  /** Koa and http-errors read this: the message may reach the client (it holds nothing secret). */
  readonly expose: boolean;

  constructor(status = 500, policy?: string) {
    super(`chaos${policy ? ` "${policy}"` : ''} injected a fault (status ${status})`);
    this.name = 'ChaosFaultError';
    this.status = status;
    this.statusCode = status;
    this.expose = status < 500;
  }
}

const GUARD = 'chaos';
const KEYS = ['latency', 'fault', 'enabled', 'random', 'name'] as const;

/**
 * Fault injection for resilience testing, in the spirit of Polly's Simmy: adds latency to a
 * share of calls and makes a share fail, so that timeouts, retries, breakers and fallbacks
 * can be seen working before production needs them. Scope it to a header or a tenant with
 * `enabled`; switched off it costs one check per call.
 *
 * @example
 * const monkey = chaos({
 *   latency: { ms: 800, rate: 0.2 },
 *   fault: { rate: 0.05, status: 503 },
 *   enabled: (request) => request?.headers['x-chaos'] === 'on',
 * });
 * app.get('/orders', guard(pipeline(timeout(500), monkey)), handler);
 */
export function chaos(options: ChaosOptions): Chaos {
  return new Chaos(options);
}

export class Chaos extends BasePolicy<ChaosStats, ChaosEvents> {
  readonly kind = 'chaos';
  private switch: ChaosSwitch;
  private readonly random: () => number;
  private readonly latencyMs: number;
  private readonly latencyRate: number;
  private readonly faultRate: number;
  private readonly faultStatus: number;
  private readonly faultError: ChaosFault['error'];
  private warned = false;
  private calls = 0;
  private injectedLatency = 0;
  private injectedFaults = 0;

  constructor(options: ChaosOptions) {
    if (options === undefined) fail(GUARD, 'options', 'an object with latency or fault', options);
    const o = optionsObject(GUARD, options);
    knownKeys(GUARD, o, KEYS);
    super(checkName(GUARD, o.name) ?? defaultName(GUARD));
    if (o.latency === undefined && o.fault === undefined) throw new TypeError(`${GUARD}: at least one of latency or fault is required`);

    const latency = o.latency === undefined ? undefined : part('latency', '{ ms, rate }', o.latency);
    if (latency !== undefined) {
      knownKeys(GUARD, latency, ['ms', 'rate']);
      this.latencyMs = duration(GUARD, 'latency.ms', latency.ms);
      this.latencyRate = rate(GUARD, 'latency.rate', latency.rate);
    } else {
      this.latencyMs = 0;
      this.latencyRate = 0;
    }

    const fault = o.fault === undefined ? undefined : part('fault', '{ rate, status?, error? }', o.fault);
    if (fault !== undefined) {
      knownKeys(GUARD, fault, ['rate', 'status', 'error']);
      this.faultRate = rate(GUARD, 'fault.rate', fault.rate);
      if (fault.status !== undefined && fault.error !== undefined) throw new TypeError(`${GUARD}: fault.status and fault.error cannot be combined (give the error its own status)`);
      const status = fault.status ?? 500;
      if (typeof status !== 'number' || !Number.isInteger(status) || status < 400 || status > 599) fail(GUARD, 'fault.status', 'an HTTP error status from 400 to 599', status);
      this.faultStatus = status;
      if (fault.error !== undefined && !(fault.error instanceof Error) && typeof fault.error !== 'function') fail(GUARD, 'fault.error', 'an Error or a function returning one', fault.error);
      this.faultError = fault.error;
    } else {
      this.faultRate = 0;
      this.faultStatus = 500;
      this.faultError = undefined;
    }

    this.switch = checkSwitch(o.enabled ?? true);
    this.random = o.random === undefined ? Math.random : func(GUARD, 'random', o.random);
  }

  /** Whether chaos is on: a boolean, or a function deciding per request. Settable at run time. */
  get enabled(): ChaosSwitch {
    return this.switch;
  }

  set enabled(value: ChaosSwitch) {
    this.switch = checkSwitch(value);
  }

  [run]<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    this.calls++;
    const on = this.switch;
    if (on === false || (on !== true && !this.decide(on, call))) return invoke(fn, call);

    if (this.latencyRate > 0 && this.random() < this.latencyRate) {
      this.injectedLatency++;
      if (this.events?.has('latency')) this.events.emit('latency', { ms: this.latencyMs });
      return this.delay(call).then(() => this.maybeFail(fn, call));
    }
    return this.maybeFail(fn, call);
  }

  stats(): ChaosStats {
    return {
      enabled: this.switch !== false,
      injectedLatency: this.injectedLatency,
      injectedFaults: this.injectedFaults,
      calls: this.calls,
    };
  }

  private maybeFail<T>(fn: InternalFunction<T>, call: Call): Promise<T> {
    if (this.faultRate > 0 && this.random() < this.faultRate) {
      this.injectedFaults++;
      const error = this.makeFault(call);
      if (this.events?.has('fault')) this.events.emit('fault', { error });
      return Promise.reject(error);
    }
    return invoke(fn, call);
  }

  private makeFault(call: Call): Error {
    const configured = this.faultError;
    if (configured === undefined) return withoutStack(() => new ChaosFaultError(this.faultStatus, this.name));
    if (configured instanceof Error) return configured;
    const made: unknown = configured(call.context.request);
    if (made instanceof Error) return made;
    return new TypeError(`${GUARD}: fault.error() must return an Error, got ${made === null ? 'null' : typeof made}`);
  }

  private decide(on: (request: NormalizedRequest | undefined) => boolean, call: Call): boolean {
    try {
      return on(call.context.request) === true;
    } catch (error) {
      // A broken switch must not break the service it was meant to test: stay off.
      if (!this.warned) {
        this.warned = true;
        process.emitWarning(`bulwark: the "enabled" function of chaos "${this.name}" threw, chaos stays off for such calls: ${String(error)}`, 'BulwarkChaosWarning');
      }
      return false;
    }
  }

  private delay(call: Call): Promise<void> {
    const scope = call.scope;
    if (scope?.aborted) return Promise.reject(scope.reason);
    return new Promise<void>((resolve, reject) => {
      // Not unref'd: the delay stands for work in progress (the slow upstream it imitates),
      // and like that work's socket it keeps the process alive until it is over.
      const timer = setTimeout(() => {
        unsubscribe?.();
        resolve();
      }, this.latencyMs);
      const unsubscribe = scope?.onAbort((reason) => {
        clearTimeout(timer);
        reject(reason);
      });
    });
  }
}

function part<T extends object>(option: string, shape: string, value: T): Partial<T> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(GUARD, option, `an object ${shape}`, value);
  return value;
}

function checkSwitch(value: unknown): ChaosSwitch {
  if (typeof value !== 'boolean' && typeof value !== 'function') fail(GUARD, 'enabled', 'a boolean or a function of the request', value);
  return value as ChaosSwitch;
}
