// `npm start`: a price service guarded by bulwark, in front of a flaky upstream, driven by
// its own traffic. The upstream is healthy, then slow, then down, then back; the terminal
// shows what the guards do about it, and so does the dashboard.
//
//   npm start                  about 35 s, then exits
//   npm start -- --serve       keeps running (the schedule repeats) for you to watch the dashboard
//   npm start -- --fast        the same story, compressed to about 9 s (the tests use it)
//   npm start -- --port 8080   the service's port (default: 3000 with --serve, any free one otherwise)

import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import { Registry } from 'prom-client';
import { dashboard } from '../adapters/dashboard.js';
import { guard } from '../adapters/express.js';
import { metrics } from '../adapters/prometheus.js';
import { bulkhead } from '../lib/bulkhead.js';
import { circuitBreaker } from '../lib/circuit-breaker.js';
import { healthResponse } from '../lib/health.js';
import { observe, type ObserveLogger } from '../lib/observe.js';
import { pipeline } from '../lib/pipeline.js';
import { rateLimit } from '../lib/rate-limit.js';
import { timeout } from '../lib/timeout.js';

// ---------------------------------------------------------------------------- options

const args = process.argv.slice(2);
const serveForever = args.includes('--serve');
const scale = args.includes('--fast') ? 0.25 : 1;
const portArg = args.indexOf('--port');
const port = portArg >= 0 ? Number(args[portArg + 1]) : serveForever ? Number(process.env.PORT ?? 3000) : 0;
/** Demo milliseconds to real ones. */
const ms = (value: number): number => Math.max(1, Math.round(value * scale));

const color = process.stdout.isTTY === true && process.env.NO_COLOR === undefined;
const paint = (code: string) => (text: string) => (color ? `\x1b[${code}m${text}\x1b[0m` : text);
const dim = paint('2');
const bold = paint('1');
const red = paint('31');
const green = paint('32');
const yellow = paint('33');
const cyan = paint('36');

// ---------------------------------------------------------------------------- the upstream

interface Phase {
  name: 'healthy' | 'slow' | 'down' | 'recovered';
  /** Demo seconds. */
  from: number;
  say: string;
}

const PHASES: Phase[] = [
  { name: 'healthy', from: 0, say: 'upstream is healthy (20–60 ms)' },
  { name: 'slow', from: 6, say: 'upstream turns slow (300–900 ms): the bulkhead fills up' },
  { name: 'down', from: 13, say: 'upstream is down (answers 503)' },
  { name: 'recovered', from: 22, say: 'upstream is back' },
];
const DEMO_SECONDS = 34;

let startedAt = performance.now();
/** Seconds since the start, real time. */
const elapsed = (): number => (performance.now() - startedAt) / 1000;
/** The phase now: demo time is real time divided by the scale, and repeats with --serve. */
function phase(): Phase {
  const demo = (elapsed() / scale) % (serveForever ? DEMO_SECONDS : Infinity);
  let current = PHASES[0]!;
  for (const p of PHASES) if (demo >= p.from) current = p;
  return current;
}

const PRICES: Record<string, number> = { AAPL: 231.4, MSFT: 447.9, NVDA: 121.2, AMZN: 186.5, GOOG: 168.3, TSLA: 248.1 };
const SYMBOLS = Object.keys(PRICES);

const upstream = http.createServer((req, res) => {
  const symbol = decodeURIComponent(req.url?.split('/').pop() ?? '');
  const now = phase().name;
  if (now === 'down') {
    setTimeout(() => res.writeHead(503, { 'content-type': 'application/json' }).end('{"error":"maintenance"}'), ms(5));
    return;
  }
  const latency = now === 'slow' ? 300 + Math.random() * 600 : 20 + Math.random() * 40;
  setTimeout(() => {
    if (res.destroyed) return;
    // A healthy upstream still fails now and then.
    if (Math.random() < 0.02) return void res.writeHead(500).end();
    const price = (PRICES[symbol] ?? 100) * (1 + (Math.random() - 0.5) / 100);
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ symbol, price: Math.round(price * 100) / 100, at: new Date().toISOString() }));
  }, ms(latency));
});

// ---------------------------------------------------------------------------- the service

// Outermost first: at most 6 calls to the upstream at once (4 more may wait 250 ms), each
// cut at 1 s, through a breaker that opens at 50% failures over the last 20 calls.
const pool = bulkhead({ name: 'prices-pool', limit: 6, queue: 4, queueTimeoutMs: ms(250) });
const breaker = circuitBreaker({ name: 'prices-api', window: { kind: 'count', size: 20 }, minimumCalls: 10, failureRateThreshold: 50, openMs: ms(3000) });
const prices = pipeline(pool, timeout(ms(1000), { name: 'prices-timeout' }), breaker);
// Search is cheap but rationed: 10 requests per second per client.
const perClient = rateLimit({ name: 'search-per-client', limit: 10, windowMs: ms(1000), key: (request) => String(request?.headers['x-client-id'] ?? request?.ip) });
const policies = [prices, perClient];

const app = express();
const board = dashboard(policies, { title: 'bulwark demo · prices service' });
app.use('/dashboard', board);
app.get('/health', (_req, res) => {
  const { status, headers, body } = healthResponse(policies);
  res.writeHead(status, headers).end(body);
});
const registry = new Registry();
const exported = metrics(policies, { register: registry });
app.get('/metrics', async (_req, res) => {
  res.type(registry.contentType).send(await registry.metrics());
});

let upstreamUrl = '';
app.get('/api/prices/:symbol', guard(prices, { cache: { ttlMs: 5 * 60_000, maxEntries: 100 } }), async (req, res) => {
  const answer = await fetch(`${upstreamUrl}/prices/${encodeURIComponent(String(req.params.symbol))}`, { signal: req.signal });
  if (!answer.ok) {
    res.status(502).json({ error: 'upstream failed', status: answer.status });
    return;
  }
  res.json(await answer.json());
});
app.get('/api/search', guard(perClient), (req, res) => {
  const q = String(req.query.q ?? '').toUpperCase();
  res.json({ results: SYMBOLS.filter((s) => s.includes(q)) });
});

// ---------------------------------------------------------------------------- the timeline

const pad = (text: string, width: number): string => (text.length >= width ? text : text + ' '.repeat(width - text.length));
const stamp = (): string => dim(pad(`${elapsed().toFixed(1)}s`, 7));
const line = (text: string): void => void process.stdout.write(`${stamp()} ${text}\n`);

// What the guards do, as they do it: observe() writes to any pino-style logger.
const timeline: ObserveLogger = {
  warn: (_fields, message) => line(red(`⚠ ${message}`)),
  info: (fields, message) => line(((fields as { to?: string }).to === 'closed' ? green : yellow)(`${(fields as { to?: string }).to === 'closed' ? '✔' : '◐'} ${message}`)),
};
const stopObserving = observe(policies, { logger: timeline, throttleMs: ms(4000) });
const transitions: string[] = ['closed'];
breaker.on('stateChange', ({ to }) => transitions.push(to));
breaker.on('stateChange', ({ to }) => {
  if (to === 'open') line(dim('  the breaker refuses calls at once: answers come from the cache'));
  if (to === 'half-open') line(dim('  one probe goes to the upstream; the others are still answered from the cache'));
});
// Shedding starts: said once per burst.
let lastShed = -Infinity;
pool.on('rejected', () => {
  const now = elapsed();
  if (now - lastShed > 1.5 * scale) line(yellow(`⚠ bulkhead "prices-pool" is full: shedding load, answers from the cache`));
  lastShed = now;
});

interface Tally {
  fresh: number;
  cache: number;
  fallback: number;
  rejected: number;
  limited: number;
  failed: number;
}
const zero = (): Tally => ({ fresh: 0, cache: 0, fallback: 0, rejected: 0, limited: 0, failed: 0 });
let second = zero();
const total = zero();
const count = (key: keyof Tally): void => {
  second[key]++;
  total[key]++;
};

const HEADER = `${' '.repeat(8)}${pad('upstream', 11)}${pad('fresh', 7)}${pad('cache', 7)}${pad('503', 6)}${pad('429', 6)}${pad('breaker', 11)}bulkhead`;
let announced: Phase | undefined;
/** Says so when the upstream's phase changes. */
function announce(): void {
  const now = phase();
  if (now === announced) return;
  announced = now;
  line(bold(`▶ ${now.say}`));
}

function report(): void {
  announce();
  const t = second;
  second = zero();
  const state = breaker.state;
  const { active, queued } = pool.stats();
  const stateText = pad(state, 11);
  line(
    pad(phase().name, 11) +
      pad(String(t.fresh), 7) +
      (t.cache > 0 ? cyan(pad(String(t.cache), 7)) : pad('0', 7)) +
      pad(String(t.rejected + t.failed), 6) +
      pad(String(t.limited), 6) +
      (state === 'open' ? red(stateText) : state === 'half-open' ? yellow(stateText) : green(stateText)) +
      `${active}/6 running${queued > 0 ? `, ${queued} queued` : ''}`,
  );
}

// ---------------------------------------------------------------------------- the traffic

let running = true;
const BUYERS = 12;
const sleep = (value: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, value));

async function buyer(id: number): Promise<void> {
  // Clients arrive over a moment, not all in the same millisecond.
  await sleep(ms(Math.random() * 160));
  while (running) {
    const symbol = SYMBOLS[(id + Math.floor(Math.random() * 3)) % SYMBOLS.length]!;
    try {
      const res = await fetch(`${serviceUrl}/api/prices/${symbol}`);
      const body = (await res.json()) as { source?: string };
      if (res.status === 200) count(body.source === 'cache' ? 'cache' : body.source === 'fallback' ? 'fallback' : 'fresh');
      else if (res.status === 503) count('rejected');
      else count('failed');
    } catch {
      count('failed');
    }
    await sleep(ms(80 + Math.random() * 80));
  }
}

async function scraper(): Promise<void> {
  while (running) {
    try {
      const res = await fetch(`${serviceUrl}/api/search?q=a`, { headers: { 'x-client-id': 'scraper' } });
      await res.arrayBuffer();
      if (res.status === 429) count('limited');
    } catch {
      count('failed');
    }
    await sleep(ms(25));
  }
}

// ---------------------------------------------------------------------------- run

let serviceUrl = '';
const service = http.createServer(app);

async function main(): Promise<void> {
  upstream.listen(0, '127.0.0.1');
  await once(upstream, 'listening');
  upstreamUrl = `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`;
  await listen(service, port);
  serviceUrl = `http://127.0.0.1:${(service.address() as AddressInfo).port}`;

  const length = serveForever ? 'until Ctrl-C' : `about ${Math.round(DEMO_SECONDS * scale + 1)} s`;
  console.log(`${bold('bulwark demo')}: a price service in front of a flaky upstream, ${length}`);
  console.log(`  dashboard  ${cyan(`${serviceUrl}/dashboard/`)}${serveForever ? '' : dim('   (npm start -- --serve keeps it running)')}`);
  console.log(`  health     ${serviceUrl}/health      metrics  ${serviceUrl}/metrics`);
  console.log(`  guards     pipeline(bulkhead 6 + queue 4, timeout ${ms(1000)} ms, circuit breaker), cache; rate limit on /api/search`);
  console.log(`  traffic    ${BUYERS} clients buying prices, 1 scraper searching too fast\n`);
  console.log(dim(HEADER));

  // A service that has been running a while: warm, and its cache holds every symbol.
  for (let round = 0; round < 3; round++) {
    for (const symbol of SYMBOLS) await (await fetch(`${serviceUrl}/api/prices/${symbol}`)).arrayBuffer();
  }
  startedAt = performance.now();
  announce();
  const tick = setInterval(announce, ms(100));
  const reporter = setInterval(report, serveForever ? 5000 : ms(1000));
  const clients = [...Array.from({ length: BUYERS }, (_, i) => buyer(i)), scraper()];

  if (serveForever) {
    await new Promise<void>((resolve) => process.once('SIGINT', () => resolve()));
  } else {
    await sleep(ms(DEMO_SECONDS * 1000));
  }
  running = false;
  clearInterval(tick);
  clearInterval(reporter);
  await Promise.all(clients);
  report();

  const bought = total.fresh + total.cache + total.fallback + total.rejected + total.failed;
  const errors = total.rejected + total.failed;
  const share = (n: number): string => `${bought === 0 ? 0 : Math.round((n / bought) * 100)}%`;
  console.log(`\n${bold('summary')}  ${bought} price requests: ${total.fresh} fresh (${share(total.fresh)}), ${cyan(`${total.cache} from the cache`)} (${share(total.cache)}), ${errors} errors (${share(errors)})`);
  console.log(`  breaker    ${transitions.join(' → ')}`);
  const stats = pool.stats();
  console.log(`  bulkhead   ${stats.rejected} calls shed (${stats.queueTimeouts} after waiting in the queue); ${stats.active} running, ${stats.queued} queued at rest`);
  console.log(`  search     ${total.limited} answers to the scraper were 429 Too Many Requests`);

  stopObserving();
  exported.unregister();
  board.close();
  await Promise.all([close(service), close(upstream)]);
}

function listen(server: http.Server, wanted: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', (error: NodeJS.ErrnoException) => {
      // The usual port is taken: any free one will do.
      if (error.code === 'EADDRINUSE' && wanted !== 0) resolve(listen(server, 0));
      else reject(error);
    });
    server.listen(wanted, '127.0.0.1', () => resolve());
  });
}

function close(server: http.Server): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeAllConnections();
  return closed;
}

main().then(
  () => {
    process.exitCode = 0;
  },
  (error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  },
);
