import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

// Timers are unref'd and cleared: a process that used bulwark ends when its own work does.
describe('process exit', () => {
  it('a script that used every guard exits by itself, soon after its work ends', async function () {
    this.timeout(20_000);
    const script = fileURLToPath(new URL('./fixtures/every-guard.ts', import.meta.url));
    const child = spawn(process.execPath, ['--import', 'tsx', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk));
    let doneAt = 0;
    child.stdout.on('data', () => {
      if (doneAt === 0 && output.includes('every guard used')) doneAt = performance.now();
    });
    const code = await new Promise<number | null>((resolve) => {
      const guardTimer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      child.on('exit', (exitCode) => {
        clearTimeout(guardTimer);
        resolve(exitCode);
      });
    });
    expect(output).to.include('every guard used');
    expect(code, output).to.equal(0);
    // Nothing kept it alive once the script's own work was done (a ref'd interval would
    // keep it until the 15 s kill above).
    expect(performance.now() - doneAt).to.be.below(2_000);
  });
});
