// Hearing that a client went away without a listener per request. A `close` listener on
// every response costs some 700 instructions a request (the listener's add, and the
// response's events object changing shape under Node's own emits); a connection carries
// many requests, so one listener per socket, added the first time a guarded request comes
// by on it, serves them all. It is also the only way to hear of a pipelined request whose
// response waits behind another: Node never gives that response a socket, and never
// emits its `close`, when the connection dies first.

/** The part of `net.Socket` the watch uses. */
export interface WatchableSocket {
  readonly destroyed: boolean;
  on(event: 'close', listener: () => void): unknown;
}

/** Told when the socket it watches closes. */
export interface SocketWatcher {
  socketClosed(): void;
}

const WATCHERS = Symbol('bulwark.socketWatchers');

/**
 * undefined: never watched (no listener yet); null: listened to, nobody watching now; an
 * array only while pipelined requests on the connection are watched at once.
 */
type Watched = WatchableSocket & { [WATCHERS]?: SocketWatcher | SocketWatcher[] | null };

/** Has `watcher.socketClosed()` called when `socket` closes. False when it is closed already. */
export function watchSocket(socket: WatchableSocket, watcher: SocketWatcher): boolean {
  if (socket.destroyed) return false;
  const watched = socket as Watched;
  const current = watched[WATCHERS];
  if (current === undefined) socket.on('close', onSocketClose);
  if (current === undefined || current === null) watched[WATCHERS] = watcher;
  else if (Array.isArray(current)) current.push(watcher);
  else watched[WATCHERS] = [current, watcher];
  return true;
}

/** Stops watching `socket` for `watcher`; the socket's listener stays for the next request. */
export function unwatchSocket(socket: WatchableSocket, watcher: SocketWatcher): void {
  const watched = socket as Watched;
  const current = watched[WATCHERS];
  if (current === watcher) {
    watched[WATCHERS] = null;
  } else if (Array.isArray(current)) {
    const index = current.indexOf(watcher);
    if (index >= 0) current.splice(index, 1);
    if (current.length === 0) watched[WATCHERS] = null;
  }
}

function onSocketClose(this: Watched): void {
  const current = this[WATCHERS];
  this[WATCHERS] = null;
  if (current === undefined || current === null) return;
  if (!Array.isArray(current)) {
    current.socketClosed();
    return;
  }
  for (const watcher of current) watcher.socketClosed();
}
