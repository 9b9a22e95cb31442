import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));

/** Runs the demo as a newcomer does, through `npm start`, on the compressed time scale. */
function runDemo(): Promise<{ code: number | null; stdout: string; stderr: string; ms: number }> {
  const started = Date.now();
  return new Promise((resolve) => {
    const child = execFile('npm', ['start', '--silent', '--', '--fast'], { cwd: root, env: { ...process.env, NO_COLOR: '1' }, timeout: 30_000 }, (error, stdout, stderr) => {
      resolve({ code: error ? ((error as { code?: number }).code ?? null) : child.exitCode, stdout, stderr, ms: Date.now() - started });
    });
  });
}

describe('npm start (the demo)', function () {
  this.timeout(40_000);
  let run: Awaited<ReturnType<typeof runDemo>>;

  before(async () => {
    run = await runDemo();
  });

  it('ends by itself with exit code 0', () => {
    expect(run.stderr).to.equal('');
    expect(run.code).to.equal(0);
    expect(run.ms).to.be.below(20_000);
  });

  it('prints the dashboard URL', () => {
    expect(run.stdout).to.match(/dashboard {2}http:\/\/127\.0\.0\.1:\d+\/dashboard\//);
  });

  it('shows the breaker open, half-open and closed again, in that order, and the bulkhead shedding', () => {
    const out = run.stdout;
    const opened = out.indexOf('circuit breaker "prices-api" opened');
    const halfOpen = out.indexOf('circuit breaker "prices-api" half-open', opened);
    const closed = out.indexOf('circuit breaker "prices-api" closed (probes-succeeded)', halfOpen);
    expect(opened, 'opened').to.be.greaterThan(0);
    expect(halfOpen, 'half-open after opened').to.be.greaterThan(opened);
    expect(closed, 'closed after half-open').to.be.greaterThan(halfOpen);
    expect(out.indexOf('▶ upstream is back')).to.be.lessThan(closed);
    expect(out).to.include('bulkhead "prices-pool" is full: shedding load');
    expect(out).to.match(/breaker {4}closed → open → half-open( → open → half-open)* → closed\n/);
  });

  it('serves answers from the cache while the upstream cannot answer', () => {
    const summary = /(\d+) price requests: (\d+) fresh \(\d+%\), (\d+) from the cache \(\d+%\), (\d+) errors/.exec(run.stdout);
    expect(summary, run.stdout).to.not.equal(null);
    const [, total, fresh, cache, errors] = summary!.map(Number);
    expect(cache).to.be.greaterThan(0);
    expect(fresh).to.be.greaterThan(0);
    expect(fresh! + cache! + errors!).to.equal(total);
    // Down-phase report lines show the cache answering.
    const down = run.stdout.split('\n').filter((line) => /^\S+\s+down\s/.test(line));
    expect(down.length).to.be.greaterThan(0);
    expect(down.some((line) => Number(line.split(/\s+/)[3]) > 0)).to.equal(true);
    expect(run.stdout).to.match(/bulkhead {3}\d+ calls shed .*; 0 running, 0 queued at rest/);
  });
});
