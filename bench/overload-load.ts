// The load generator of `npm run bench:overload`: an open loop at a fixed request rate over
// a pool of keep-alive HTTP/1.1 connections, recording every answer's latency by status.
//
// Why not autocannon's histogram: autocannon is a closed loop per connection (a connection
// sends its next request when the previous answer is back), its `overallRate` is a per-second
// budget per connection (spent as fast as answers come back, then the connection waits for
// the next second), and its latency histogram mixes every status. Against a guard that
// answers rejections in microseconds, that makes the offered load a burst at the start of
// every second instead of a rate, and the admitted requests' latency invisible. Here request
// i is issued at t0 + i / rate whether or not earlier ones came back; a request that finds
// every connection busy waits in a client-side queue, and that wait counts in its latency
// (no coordinated omission). Latency runs from the moment the request was issued to the
// last byte of its answer, so it includes everything the server made it wait: the socket
// buffers and the accept backlog while the event loop was busy, then the handler.
import { connect, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';

export interface LoadResult {
  /** Requests per second asked for. */
  rate: number;
  durationMs: number;
  /** Requests issued during the run (rate × duration). */
  issued: number;
  /** Latencies (ms) of the answers, by HTTP status. */
  latencies: Map<number, number[]>;
  /** 2xx answers that completed within the run window, per second. */
  goodput: number;
  /** Answers of any status that completed within the run window, per second. */
  throughput: number;
  /** Requests still unanswered when the run gave up waiting (after the drain time). */
  unanswered: number;
  /** Connection errors (resets, closes with a request in flight). */
  errors: number;
  /** Requests that found every connection busy and waited in the client-side queue. */
  queuedClientSide: number;
  /** How late the generator issued requests (p99, ms): a sanity check of the generator itself. */
  issueLateP99Ms: number;
}

const REQUEST = (path: string): Buffer => Buffer.from(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n`, 'latin1');
const HEADER_END = '\r\n\r\n';
const CONTENT_LENGTH = /\r\ncontent-length:\s*(\d+)/i;

type OnAnswer = (connection: Connection, status: number, issuedAt: number) => void;

class Connection {
  private socket: Socket;
  private buffer = '';
  issuedAt = -1;
  ready: Promise<void>;

  constructor(
    private readonly port: number,
    private readonly request: Buffer,
    private readonly onAnswer: OnAnswer,
    private readonly onError: (connection: Connection) => void,
  ) {
    this.socket = this.open();
    this.ready = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('error', reject);
    });
  }

  get busy(): boolean {
    return this.issuedAt >= 0;
  }

  send(issuedAt: number): void {
    this.issuedAt = issuedAt;
    this.socket.write(this.request);
  }

  close(): void {
    this.socket.removeAllListeners();
    this.socket.on('error', () => {});
    this.socket.destroy();
  }

  private open(): Socket {
    const socket = connect({ port: this.port, host: '127.0.0.1', noDelay: true });
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => this.data(chunk));
    const lost = (): void => {
      if (socket !== this.socket) return;
      this.buffer = '';
      const wasBusy = this.busy;
      this.issuedAt = -1;
      this.socket = this.open();
      if (wasBusy) this.onError(this);
    };
    socket.on('error', lost);
    socket.on('close', lost);
    return socket;
  }

  private data(chunk: string): void {
    this.buffer += chunk;
    for (;;) {
      const end = this.buffer.indexOf(HEADER_END);
      if (end < 0) return;
      const head = this.buffer.slice(0, end);
      const length = CONTENT_LENGTH.exec(head);
      if (length === null) throw new Error(`answer without content-length: ${head}`);
      const total = end + HEADER_END.length + Number(length[1]);
      if (this.buffer.length < total) return;
      this.buffer = this.buffer.slice(total);
      const status = Number(head.slice(9, 12));
      const issuedAt = this.issuedAt;
      this.issuedAt = -1;
      this.onAnswer(this, status, issuedAt);
    }
  }
}

/** A pool of keep-alive connections to one server, reused across runs (warm-up, then the measured run). */
export class LoadPool {
  private readonly connections: Connection[] = [];
  private readonly free: Connection[] = [];
  private queue: number[] = [];
  private queueHead = 0;
  private record: ((status: number, issuedAt: number, now: number) => void) | undefined;
  private lost: (() => void) | undefined;

  private constructor(
    readonly port: number,
    readonly path: string,
  ) {}

  static async open(port: number, size: number, path = '/work'): Promise<LoadPool> {
    const pool = new LoadPool(port, path);
    const request = REQUEST(path);
    for (let i = 0; i < size; i++) {
      const connection = new Connection(port, request, (c, status, issuedAt) => pool.answered(c, status, issuedAt), (c) => pool.failed(c));
      pool.connections.push(connection);
    }
    await Promise.all(pool.connections.map((c) => c.ready));
    pool.free.push(...pool.connections);
    return pool;
  }

  close(): void {
    for (const connection of this.connections) connection.close();
  }

  /**
   * Issues `rate` requests per second for `durationMs`, evenly spaced, then waits up to
   * `drainMs` for the answers still out.
   */
  async run(rate: number, durationMs: number, drainMs: number, atWindowEnd?: () => void): Promise<LoadResult> {
    const latencies = new Map<number, number[]>();
    const lateness: number[] = [];
    let answered2xxInWindow = 0;
    let answeredInWindow = 0;
    let answered = 0;
    let errors = 0;
    let queuedClientSide = 0;
    const total = Math.round((rate * durationMs) / 1000);
    const interval = 1000 / rate;
    const t0 = performance.now() + 5;
    const end = t0 + durationMs;

    this.record = (status, issuedAt, now) => {
      answered++;
      let list = latencies.get(status);
      if (list === undefined) latencies.set(status, (list = []));
      list.push(now - issuedAt);
      if (now <= end) {
        answeredInWindow++;
        if (status >= 200 && status < 300) answered2xxInWindow++;
      }
    };
    this.lost = () => {
      errors++;
    };

    let issued = 0;
    await new Promise<void>((resolve) => {
      const tick = (): void => {
        const now = performance.now();
        while (issued < total && t0 + issued * interval <= now) {
          lateness.push(now - (t0 + issued * interval));
          issued++;
          const connection = this.free.pop();
          if (connection !== undefined) connection.send(now);
          else {
            queuedClientSide++;
            this.queue.push(now);
          }
        }
        if (issued < total) setTimeout(tick, Math.max(0, Math.min(1, t0 + issued * interval - now)));
        else {
          atWindowEnd?.();
          resolve();
        }
      };
      setTimeout(tick, 5);
    });

    const deadline = performance.now() + drainMs;
    while (answered + errors < issued && performance.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
    const unanswered = issued - answered - errors;
    // Forget what is still queued: the next run starts clean.
    this.queue = [];
    this.queueHead = 0;
    this.record = undefined;
    this.lost = undefined;
    lateness.sort((a, b) => a - b);
    return {
      rate,
      durationMs,
      issued,
      latencies,
      goodput: (answered2xxInWindow * 1000) / durationMs,
      throughput: (answeredInWindow * 1000) / durationMs,
      unanswered,
      errors,
      queuedClientSide,
      issueLateP99Ms: percentile(lateness, 0.99),
    };
  }

  private answered(connection: Connection, status: number, issuedAt: number): void {
    const now = performance.now();
    this.record?.(status, issuedAt, now);
    this.next(connection);
  }

  private failed(connection: Connection): void {
    this.lost?.();
    this.next(connection);
  }

  private next(connection: Connection): void {
    if (this.queueHead < this.queue.length) {
      connection.send(this.queue[this.queueHead++]!);
      if (this.queueHead > 4096 && this.queueHead * 2 > this.queue.length) {
        this.queue = this.queue.slice(this.queueHead);
        this.queueHead = 0;
      }
    } else {
      this.free.push(connection);
    }
  }
}

/** The p-th quantile (0..1) of sorted values, nearest rank; NaN when empty. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1));
  return sorted[rank]!;
}
