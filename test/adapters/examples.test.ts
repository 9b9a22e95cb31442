// Each framework example runs its scripted smoke check (healthy, slow, failing, breaker
// open) against its own flaky upstream and must exit 0 by itself.

import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';

const root = fileURLToPath(new URL('../..', import.meta.url));

function runExample(name: string): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', `examples/${name}.ts`, '--smoke'], { cwd: root, timeout: 20_000 }, (error, stdout, stderr) => {
      resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : null, output: stdout + stderr });
    });
  });
}

describe('examples (--smoke)', function () {
  this.timeout(25_000);
  const runs = new Map<string, Promise<{ code: number | null; output: string }>>();

  before(() => {
    // Started together: most of each run is the TypeScript loader starting up.
    for (const name of ['express', 'koa', 'fastify']) runs.set(name, runExample(name));
  });

  for (const name of ['express', 'koa', 'fastify']) {
    it(`${name}: answers from upstream, fallback and cache, and stops by itself`, async () => {
      const { code, output } = await runs.get(name)!;
      expect(output, output).not.to.contain('FAIL');
      expect(output).to.contain('GET /products/1 -> 200 ok');
      expect(output).to.contain('cache/circuit_open');
      expect(code, output).to.equal(0);
    });
  }
});
