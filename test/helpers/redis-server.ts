import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';

/** A free TCP port on the loopback interface, as the OS hands it out. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/**
 * A private `redis-server` for fault tests: no persistence, its own port, killed with
 * SIGKILL and restarted on the same port at will.
 *
 * @example
 * const server = await RedisServer.start();
 * const client = new Redis(server.port, '127.0.0.1');
 * await server.kill();    // mid-traffic
 * await server.restart(); // same port, empty
 * await server.stop();    // in after()
 */
export class RedisServer {
  private process: ChildProcess | undefined;

  private constructor(readonly port: number) {}

  static async start(port?: number): Promise<RedisServer> {
    const server = new RedisServer(port ?? (await freePort()));
    await server.restart();
    return server;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  get running(): boolean {
    return this.process !== undefined;
  }

  /** Starts the server (again) on its port and resolves once it accepts connections. */
  async restart(): Promise<void> {
    if (this.process !== undefined) throw new Error(`redis-server on port ${this.port} is already running`);
    const child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.process = child;
    await new Promise<void>((resolve, reject) => {
      let output = '';
      const timer = setTimeout(() => fail(new Error(`redis-server did not start on port ${this.port} within 5 s:\n${output}`)), 5000);
      const fail = (error: Error): void => {
        clearTimeout(timer);
        this.process = undefined;
        child.kill('SIGKILL');
        reject(error);
      };
      child.once('error', (error) => fail(new Error(`could not run redis-server (is it installed?): ${error.message}`)));
      child.once('exit', (code) => fail(new Error(`redis-server exited with code ${code} on port ${this.port}:\n${output}`)));
      child.stdout!.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        if (output.includes('Ready to accept connections')) {
          clearTimeout(timer);
          child.removeAllListeners('exit');
          child.removeAllListeners('error');
          child.stdout!.removeAllListeners('data');
          child.stdout!.resume();
          child.stderr!.resume();
          resolve();
        }
      });
    });
  }

  /** SIGKILL: the server dies without closing anything politely. Resolves once it is gone. */
  async kill(): Promise<void> {
    const child = this.process;
    if (child === undefined) return;
    this.process = undefined;
    if (child.exitCode !== null || child.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.kill('SIGKILL');
    });
  }

  stop(): Promise<void> {
    return this.kill();
  }
}
