// A gate on a Node `ServerResponse` that the handler writes to directly (Express): it sees
// the handler's answer start, holds a failing one back while the guard decides, drops the
// handler's writes once the guard answers, and lets the guard write its own answer.

import { STATUS_CODES, type ServerResponse } from 'node:http';
import { REPRESENTATION_HEADERS, type HttpAnswer } from './answers.js';
import { MAX_CACHED_BODY } from './cache.js';
import type { Exchange } from './exchange.js';

type Method = (this: ServerResponse, ...args: unknown[]) => unknown;

/** Calls that start the answer (the first one tells its status). */
const COMMITS = ['writeHead', 'flushHeaders', 'write', 'end'] as const;
/** Calls that only change headers or send interim answers: dropped once the guard answers. */
const SIDE_CALLS = ['setHeader', 'setHeaders', 'appendHeader', 'removeHeader', 'addTrailers', 'writeContinue', 'writeProcessing', 'writeEarlyHints'] as const;

type Commit = (typeof COMMITS)[number];
type Mode = 'watch' | 'pass' | 'hold' | 'drop';

/**
 * Writes a guard answer on a raw response: removes headers that would describe another
 * body, then the status (with its standard reason phrase), the headers and the body.
 *
 * @example writeAnswer(res, rejectionAnswer(error, 503));
 */
export function writeAnswer(res: ServerResponse, answer: HttpAnswer): void {
  for (const name of REPRESENTATION_HEADERS) if (res.hasHeader(name)) res.removeHeader(name);
  res.writeHead(answer.status, STATUS_CODES[answer.status] ?? '', answer.headers);
  res.end(answer.body);
}

/**
 * Installed per request on the response object itself (instance properties over the
 * prototype's methods, above any wrapper a compression middleware put there). Modes:
 * `watch` asks the exchange at the handler's first write whether to hold it; `pass` writes
 * through (copying a cacheable body); `hold` records; `drop` ignores.
 *
 * @example
 * const gate = new ResponseGate(res, exchange, 'watch');
 * // …later, the guard answers instead of the handler:
 * gate.send(answer);
 */
export class ResponseGate {
  private mode: Mode;
  /** True while the guard writes its own answer: every call passes. */
  private owning = false;
  private readonly originals = new Map<string, Method>();
  private held: Array<[Commit, unknown[]]> = [];
  private copy: Buffer[] | undefined = undefined;
  private copied = 0;
  private sideCalls = false;

  constructor(
    private readonly res: ServerResponse,
    private readonly exchange: Exchange,
    mode: 'watch' | 'drop',
  ) {
    this.mode = mode;
    const target = res as unknown as Record<string, unknown>;
    for (const name of COMMITS) this.install(target, name, (original, self, args) => this.commit(name, original, self, args));
    if (mode === 'drop') this.installSideCalls();
  }

  /** Header calls only need a gate once the handler's calls are dropped. */
  private installSideCalls(): void {
    if (this.sideCalls) return;
    this.sideCalls = true;
    const target = this.res as unknown as Record<string, unknown>;
    for (const name of SIDE_CALLS) this.install(target, name, (original, self, args) => (this.owning || this.mode !== 'drop' ? original.apply(self, args) : sideResult(name, self)));
  }

  /** The guard answers: the handler's past (held) and future writes are dropped. */
  send(answer: HttpAnswer): void {
    this.drop();
    this.owning = true;
    try {
      writeAnswer(this.res, answer);
    } finally {
      this.owning = false;
    }
  }

  /** The guard took the response over; its answer follows. */
  drop(): void {
    this.installSideCalls();
    this.mode = 'drop';
    this.held = [];
    this.copy = undefined;
  }

  /** The handler's failure stands: what was held goes out as written, and so does the rest. */
  release(): void {
    const held = this.held;
    this.held = [];
    this.mode = 'pass';
    for (const [name, args] of held) this.originals.get(name)!.apply(this.res, args);
  }

  private install(target: Record<string, unknown>, name: string, gated: (original: Method, self: ServerResponse, args: unknown[]) => unknown): void {
    const original = target[name];
    if (typeof original !== 'function') return;
    this.originals.set(name, original as Method);
    target[name] = function gate(this: ServerResponse, ...args: unknown[]): unknown {
      return gated(original as Method, this, args);
    };
  }

  private commit(name: Commit, original: Method, self: ServerResponse, args: unknown[]): unknown {
    if (this.owning) return original.apply(self, args);
    if (this.mode === 'watch') this.decide(name === 'writeHead' ? Number(args[0]) : self.statusCode);
    switch (this.mode) {
      case 'drop':
        return name === 'write' ? true : name === 'flushHeaders' ? undefined : self;
      case 'hold':
        this.held.push([name, args]);
        return name === 'write' ? true : name === 'flushHeaders' ? undefined : self;
      default: {
        if (this.copy !== undefined && (name === 'write' || name === 'end')) this.keep(args[0], args[1]);
        const result = original.apply(self, args);
        if (name === 'end' && this.copy !== undefined) {
          const body = Buffer.concat(this.copy);
          this.copy = undefined;
          this.exchange.offer(self.statusCode, body, (header) => self.getHeader(header));
        }
        return result;
      }
    }
  }

  private decide(status: number): void {
    const exchange = this.exchange;
    if (exchange.accepting) {
      this.mode = exchange.respond(status) ? 'hold' : 'pass';
      if (this.mode === 'pass' && status >= 200 && status < 300 && exchange.caching) this.copy = [];
    } else {
      this.mode = exchange.superseded ? 'drop' : 'pass';
    }
  }

  /** Copies a chunk of a body the cache may keep; gives up past the size the cache accepts. */
  private keep(chunk: unknown, encoding: unknown): void {
    if (chunk === undefined || chunk === null || typeof chunk === 'function') return;
    let bytes: Buffer;
    // Strings become fresh buffers; bytes are copied, since a writer may reuse its buffer.
    if (typeof chunk === 'string') bytes = Buffer.from(chunk, typeof encoding === 'string' ? (encoding as BufferEncoding) : 'utf8');
    else if (chunk instanceof Uint8Array) bytes = Buffer.from(chunk);
    else return;
    this.copied += bytes.length;
    if (this.copied > MAX_CACHED_BODY) this.copy = undefined;
    else this.copy?.push(bytes);
  }
}

function sideResult(name: string, self: ServerResponse): unknown {
  return name === 'setHeader' || name === 'setHeaders' || name === 'appendHeader' ? self : undefined;
}
