// The per-connection watch that tells in-flight requests their client went away.

import { EventEmitter } from 'node:events';
import { expect } from 'chai';
import { unwatchSocket, watchSocket, type SocketWatcher } from '../lib/http/socket-watch.js';

class FakeSocket extends EventEmitter {
  destroyed = false;
  close(): void {
    this.destroyed = true;
    this.emit('close');
  }
}

function watcher(log: string[], name: string): SocketWatcher {
  return { socketClosed: () => void log.push(name) };
}

describe('socket watch', () => {
  it('adds one close listener per socket, however many requests it watches in turn', () => {
    const socket = new FakeSocket();
    const log: string[] = [];
    for (let i = 0; i < 5; i++) {
      const w = watcher(log, `r${i}`);
      expect(watchSocket(socket, w)).to.equal(true);
      unwatchSocket(socket, w);
    }
    expect(socket.listenerCount('close')).to.equal(1);
    socket.close();
    expect(log, 'nobody watching when it closed').to.deep.equal([]);
  });

  it('tells every request watching at once (pipelined), except those that stopped watching', () => {
    const socket = new FakeSocket();
    const log: string[] = [];
    const [a, b, c] = [watcher(log, 'a'), watcher(log, 'b'), watcher(log, 'c')];
    for (const w of [a, b, c]) watchSocket(socket, w);
    unwatchSocket(socket, b);
    socket.close();
    expect(log).to.deep.equal(['a', 'c']);
  });

  it('returns to a single watcher after a pipelined burst', () => {
    const socket = new FakeSocket();
    const log: string[] = [];
    const [a, b, c] = [watcher(log, 'a'), watcher(log, 'b'), watcher(log, 'c')];
    watchSocket(socket, a);
    watchSocket(socket, b);
    unwatchSocket(socket, a);
    unwatchSocket(socket, b);
    watchSocket(socket, c);
    socket.close();
    expect(log).to.deep.equal(['c']);
  });

  it('refuses a socket that is closed already: the caller must listen some other way', () => {
    const socket = new FakeSocket();
    socket.destroyed = true;
    expect(watchSocket(socket, watcher([], 'late'))).to.equal(false);
    expect(socket.listenerCount('close')).to.equal(0);
  });
});
