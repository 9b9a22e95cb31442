// One harness per framework behind one interface, so that the contract suite is written
// once. Servers listen on 127.0.0.1:0; tests talk to them over real sockets.

import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { Writable, type Readable } from 'node:stream';
import Router from '@koa/router';
import express from 'express';
import express4 from 'express4';
import Fastify from 'fastify';
import Koa from 'koa';
import { guard as expressGuard } from '../../adapters/express.js';
import bulwark from '../../adapters/fastify.js';
import { guard as koaGuard } from '../../adapters/koa.js';
import type { GuardOptions } from '../../lib/http.js';
import type { Policy } from '../../lib/policy.js';

/** What a test handler can do, the same in every framework. */
export interface Kit {
  readonly signal: AbortSignal;
  header(name: string): string | undefined;
  /** Answers JSON with a status (and headers). */
  json(status: number, body: unknown, headers?: Record<string, string>): void;
  /** Answers with a stream body. */
  stream(status: number, body: Readable, headers?: Record<string, string>): void;
  /** Express `next()`; a no-op elsewhere. */
  next(error?: unknown): void;
}

/** A route handler: may return a promise; throwing or rejecting is a failure. */
export type TestHandler = (kit: Kit) => unknown;

export interface RouteSpec {
  method?: 'GET' | 'POST';
  path: string;
  policy: Policy;
  options?: GuardOptions;
  handler: TestHandler;
}

export interface TestServer {
  readonly port: number;
  readonly url: string;
  /** Errors the framework's error handling saw (Express error layer, Koa 'error', Fastify error logs). */
  readonly errors: unknown[];
  /** Log lines at warn level or above (Fastify's logger). */
  readonly logs: string[];
  close(): Promise<void>;
}

export interface Harness {
  readonly name: string;
  start(routes: RouteSpec[]): Promise<TestServer>;
}

async function listen(server: http.Server): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

function nodeServer(server: http.Server, port: number, errors: unknown[], logs: string[]): TestServer {
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    errors,
    logs,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Serves `server` on a free loopback port, for a test that reads no framework errors. */
export async function serveOnLoopback(server: http.Server): Promise<TestServer> {
  return nodeServer(server, await listen(server), [], []);
}

/** Express (5, or `express4`) with the guard as a layer of its own, or (`wrapped`) around the handler. */
function expressHarnessOf(wrapped: boolean, make: typeof express = express, version = ''): Harness {
  const name = `express${version}`;
  return {
    name: wrapped ? `${name} (guard().wrap(handler))` : name,
    start: (routes) => startExpress(make, routes, wrapped),
  };
}

async function startExpress(make: typeof express, routes: RouteSpec[], wrapped: boolean): Promise<TestServer> {
  const app = make();
  const errors: unknown[] = [];
  for (const route of routes) {
    const method = (route.method ?? 'GET').toLowerCase() as 'get' | 'post';
    const handler = (req: express.Request, res: express.Response, next: express.NextFunction): unknown =>
      route.handler({
        get signal() {
          return req.signal;
        },
        header: (name) => req.get(name),
        json: (status, body, headers) => void res.status(status).set(headers ?? {}).json(body),
        stream: (status, body, headers) => void body.pipe(res.status(status).set(headers ?? {})),
        next: (error) => next(error),
      });
    const guard = expressGuard(route.policy, route.options);
    if (wrapped) app[method](route.path, guard.wrap(handler));
    else app[method](route.path, guard, handler);
  }
  app.use((error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
    errors.push(error);
    const status = (error as { status?: unknown }).status;
    if (res.headersSent) res.destroy();
    else res.status(typeof status === 'number' ? status : 500).json({ error: 'internal' });
  });
  const server = http.createServer(app);
  return nodeServer(server, await listen(server), errors, []);
}

export const expressHarness = expressHarnessOf(false);
export const expressWrappedHarness = expressHarnessOf(true);
const express4Harness = expressHarnessOf(false, express4, ' 4');
const express4WrappedHarness = expressHarnessOf(true, express4, ' 4');

/** Koa with the guard as a middleware of its own, or (`wrapped`) around the handler. */
function koaHarnessOf(wrapped: boolean): Harness {
  return {
    name: wrapped ? 'koa (guard().wrap(handler))' : 'koa',
    start: (routes) => startKoa(routes, wrapped),
  };
}

async function startKoa(routes: RouteSpec[], wrapped: boolean): Promise<TestServer> {
  const app = new Koa();
  const errors: unknown[] = [];
  app.silent = true;
  app.on('error', (error: unknown) => errors.push(error));
  const router = new Router();
  for (const route of routes) {
    const method = (route.method ?? 'GET').toLowerCase() as 'get' | 'post';
    const handler = async (ctx: Koa.ParameterizedContext): Promise<void> => {
      await route.handler({
        get signal() {
          return ctx.signal;
        },
        header: (name) => ctx.get(name) || undefined,
        json: (status, body, headers) => {
          ctx.status = status;
          if (headers !== undefined) ctx.set(headers);
          ctx.body = body;
        },
        stream: (status, body, headers) => {
          ctx.status = status;
          if (headers !== undefined) ctx.set(headers);
          ctx.body = body;
        },
        next: () => {},
      });
    };
    const guard = koaGuard(route.policy, route.options);
    if (wrapped) router[method](route.path, guard.wrap(handler));
    else router[method](route.path, guard, handler);
  }
  app.use(router.routes());
  const server = http.createServer(app.callback());
  return nodeServer(server, await listen(server), errors, []);
}

export const koaHarness = koaHarnessOf(false);
export const koaWrappedHarness = koaHarnessOf(true);

export const fastifyHarness: Harness = {
  name: 'fastify',
  async start(routes) {
    const logs: string[] = [];
    const errors: unknown[] = [];
    const stream = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        const line = chunk.toString();
        try {
          const entry = JSON.parse(line) as { level: number; err?: unknown };
          if (entry.level >= 40) logs.push(line);
          if (entry.level >= 50) errors.push(entry.err ?? line);
        } catch {
          logs.push(line);
        }
        callback();
      },
    });
    const app = Fastify({ logger: { level: 'info', stream }, forceCloseConnections: true });
    await app.register(bulwark);
    for (const route of routes) {
      app.route({
        method: route.method ?? 'GET',
        url: route.path,
        config: { bulwark: { policy: route.policy, ...route.options } },
        handler: async (request, reply) => {
          await route.handler({
            get signal() {
              return request.signal;
            },
            header: (name) => {
              const value = request.headers[name.toLowerCase()];
              return Array.isArray(value) ? value.join(', ') : value;
            },
            json: (status, body, headers) => void reply.code(status).headers(headers ?? {}).send(body),
            stream: (status, body, headers) => void reply.code(status).headers(headers ?? {}).send(body),
            next: () => {},
          });
        },
      });
    }
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    return { port, url: `http://127.0.0.1:${port}`, errors, logs, close: () => app.close() };
  },
};

export const harnesses: readonly Harness[] = [expressHarness, expressWrappedHarness, express4Harness, express4WrappedHarness, koaHarness, koaWrappedHarness, fastifyHarness];

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `check` holds (polling), or fails after `ms`. */
export async function eventually(check: () => boolean, ms = 1000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

export interface Answer {
  status: number;
  headers: Record<string, string>;
  text: string;
  json: unknown;
}

/** A GET (or other) request over a fresh connection, no keep-alive. */
export async function request(server: TestServer, path: string, init: { method?: string; headers?: Record<string, string> } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.port, path, method: init.method ?? 'GET', headers: { connection: 'close', ...init.headers }, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        const headers: Record<string, string> = {};
        for (const [name, value] of Object.entries(res.headers)) headers[name] = Array.isArray(value) ? value.join(', ') : String(value);
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers, text, json });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** Sends a request and closes the connection after `ms` without waiting for the answer. */
export async function abandon(server: TestServer, path: string, ms: number): Promise<void> {
  const socket = net.connect(server.port, '127.0.0.1');
  await once(socket, 'connect');
  socket.on('error', () => {});
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
  await sleep(ms);
  socket.destroy();
}

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/**
 * A keep-alive connection read byte by byte: parses whole responses and keeps any bytes
 * beyond them, so a test can tell that exactly one answer came.
 */
export class RawConnection {
  private buffer = Buffer.alloc(0);
  closed = false;
  private readonly socket: net.Socket;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
    });
    socket.on('close', () => {
      this.closed = true;
    });
    socket.on('error', () => {});
  }

  static async open(port: number): Promise<RawConnection> {
    const socket = net.connect(port, '127.0.0.1');
    await once(socket, 'connect');
    return new RawConnection(socket);
  }

  send(path: string, method = 'GET'): void {
    this.socket.write(`${method} ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n`);
  }

  /** Bytes received and not yet read as a response. */
  get pending(): number {
    return this.buffer.length;
  }

  async read(ms = 2000): Promise<RawResponse> {
    const deadline = Date.now() + ms;
    for (;;) {
      const parsed = parse(this.buffer);
      if (parsed !== undefined) {
        this.buffer = this.buffer.subarray(parsed.length);
        return parsed.response;
      }
      if (this.closed) throw new Error(`connection closed before a whole response (${this.buffer.length} bytes: ${JSON.stringify(this.buffer.toString())})`);
      if (Date.now() > deadline) throw new Error(`no whole response within ${ms} ms (${JSON.stringify(this.buffer.toString())})`);
      await sleep(5);
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

function parse(buffer: Buffer): { response: RawResponse; length: number } | undefined {
  const end = buffer.indexOf('\r\n\r\n');
  if (end < 0) return undefined;
  const head = buffer.subarray(0, end).toString('latin1').split('\r\n');
  const status = Number(head[0]!.split(' ')[1]);
  const headers: Record<string, string> = {};
  for (const line of head.slice(1)) {
    const colon = line.indexOf(':');
    headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  let offset = end + 4;
  if (headers['transfer-encoding'] === 'chunked') {
    const parts: Buffer[] = [];
    for (;;) {
      const lineEnd = buffer.indexOf('\r\n', offset);
      if (lineEnd < 0) return undefined;
      const size = parseInt(buffer.subarray(offset, lineEnd).toString(), 16);
      if (buffer.length < lineEnd + 2 + size + 2) return undefined;
      parts.push(buffer.subarray(lineEnd + 2, lineEnd + 2 + size));
      offset = lineEnd + 2 + size + 2;
      if (size === 0) break;
    }
    return { response: { status, headers, body: Buffer.concat(parts).toString() }, length: offset };
  }
  const size = Number(headers['content-length'] ?? 0);
  if (buffer.length < offset + size) return undefined;
  return { response: { status, headers, body: buffer.subarray(offset, offset + size).toString() }, length: offset + size };
}

/** The server and the watchdog of the test that runs now (`watchedServers`). */
export interface WatchedTest {
  /** The test's server, closed after it. */
  server: TestServer | undefined;
  readonly watchdog: Watchdog;
}

/**
 * Mocha hooks for a suite whose tests each serve one `TestServer` under a `Watchdog`: the
 * watchdog starts before each test; after it, the server (if one was set) closes and the
 * watchdog stops.
 */
export function watchedServers(): WatchedTest {
  let watchdog: Watchdog | undefined;
  const current: WatchedTest = {
    server: undefined,
    get watchdog(): Watchdog {
      if (watchdog === undefined) throw new Error('watchedServers: no test is running');
      return watchdog;
    },
  };
  beforeEach(() => {
    watchdog = new Watchdog().start();
  });
  afterEach(async () => {
    await current.server?.close();
    current.server = undefined;
    watchdog?.stop();
    watchdog = undefined;
  });
  return current;
}

/**
 * Records what must never happen while a test runs: console errors and warnings, process
 * warnings, unhandled rejections, uncaught exceptions.
 */
export class Watchdog {
  readonly events: string[] = [];
  private readonly restore: Array<() => void> = [];

  start(): this {
    for (const method of ['error', 'warn'] as const) {
      const original = console[method];
      console[method] = (...args: unknown[]) => {
        this.events.push(`console.${method}: ${args.map(String).join(' ')}`);
      };
      this.restore.push(() => {
        console[method] = original;
      });
    }
    const onWarning = (warning: Error): void => void this.events.push(`warning: ${warning.message}`);
    const onRejection = (reason: unknown): void => void this.events.push(`unhandledRejection: ${String(reason)}`);
    process.on('warning', onWarning);
    process.on('unhandledRejection', onRejection);
    this.restore.push(() => {
      process.off('warning', onWarning);
      process.off('unhandledRejection', onRejection);
    });
    return this;
  }

  stop(): string[] {
    for (const undo of this.restore.splice(0).reverse()) undo();
    return this.events;
  }
}
