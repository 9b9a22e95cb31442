/** Removes the listener it was returned for. Calling it twice is harmless. */
export type Unsubscribe = () => void;

/**
 * A minimal typed event emitter. Guards hold one lazily, so a guard nobody listens to pays
 * one `undefined` check per event. A listener that throws is reported on the next tick
 * through `process.emitWarning`, never into the guarded call.
 */
export class Emitter<Events extends object> {
  private listeners: { [K in keyof Events]?: Array<(event: Events[K]) => void> } = {};
  private count = 0;

  /** True when at least one listener of any event is subscribed. */
  get active(): boolean {
    return this.count > 0;
  }

  has<K extends keyof Events>(event: K): boolean {
    const list = this.listeners[event];
    return list !== undefined && list.length > 0;
  }

  on<K extends keyof Events>(event: K, listener: (event: Events[K]) => void): Unsubscribe {
    if (typeof listener !== 'function') throw new TypeError(`on: listener must be a function, got ${typeof listener}`);
    // Copy on write: emit iterates a snapshot, so (un)subscribing inside a listener is safe.
    this.listeners[event] = [...(this.listeners[event] ?? []), listener];
    this.count++;
    let subscribed = true;
    return () => {
      if (!subscribed) return;
      subscribed = false;
      const list = this.listeners[event] ?? [];
      const index = list.indexOf(listener);
      if (index >= 0) {
        this.listeners[event] = [...list.slice(0, index), ...list.slice(index + 1)];
        this.count--;
      }
    };
  }

  emit<K extends keyof Events>(event: K, payload: Events[K]): void {
    const list = this.listeners[event];
    if (list === undefined) return;
    for (const listener of list) {
      try {
        listener(payload);
      } catch (error) {
        queueMicrotask(() => process.emitWarning(`bulwark: a "${String(event)}" listener threw: ${String(error)}`, 'BulwarkListenerWarning'));
      }
    }
  }
}
