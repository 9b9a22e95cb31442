import type { Unsubscribe } from './events.js';

type AbortHandler = (reason: unknown) => void;

/**
 * The cancellation state of one call, without an `AbortController` until somebody asks for
 * a signal. Aborting a controller costs ~18 µs and most calls never abort, so guards pass
 * scopes along and the `AbortSignal` is made only when user code reads `signal`.
 *
 * A scope aborts when its parent (another scope or a caller's `AbortSignal`) aborts, or
 * when `abort()` is called. The link to the parent is made lazily, on the first
 * `onAbort()` or `signal` read, and undone by `dispose()` so that a long-lived caller
 * signal does not collect listeners.
 */
export class Scope {
  private abortedWith: { reason: unknown } | undefined;
  private controller: AbortController | undefined;
  private handlers: AbortHandler[] | undefined;
  private unlinkParent: Unsubscribe | undefined;

  constructor(private readonly parent?: Scope | AbortSignal) {}

  get aborted(): boolean {
    if (this.abortedWith !== undefined) return true;
    if (this.parent !== undefined && this.unlinkParent === undefined && this.parent.aborted) {
      this.abort(this.parent.reason);
      return true;
    }
    return false;
  }

  get reason(): unknown {
    return this.aborted ? this.abortedWith?.reason : undefined;
  }

  /** The `AbortSignal` for user code, created on first read. */
  get signal(): AbortSignal {
    if (this.controller === undefined) {
      this.controller = new AbortController();
      if (this.aborted) this.controller.abort(this.abortedWith?.reason);
      else this.link();
    }
    return this.controller.signal;
  }

  /**
   * Calls `handler` once when the scope aborts (at once if it already has). Returns a
   * function that removes the handler.
   */
  onAbort(handler: AbortHandler): Unsubscribe {
    if (this.aborted) {
      handler(this.abortedWith?.reason);
      return noop;
    }
    this.link();
    (this.handlers ??= []).push(handler);
    return () => {
      const list = this.handlers;
      if (list === undefined) return;
      const index = list.indexOf(handler);
      if (index >= 0) list.splice(index, 1);
    };
  }

  /** Aborts the scope; later calls are ignored, so the first reason is the one kept. */
  abort(reason: unknown): void {
    if (this.abortedWith !== undefined) return;
    this.abortedWith = { reason };
    this.unlink();
    this.controller?.abort(reason);
    const handlers = this.handlers;
    this.handlers = undefined;
    if (handlers !== undefined) for (const handler of handlers) handler(reason);
  }

  /** Detaches from the parent; call when the work this scope covered is over. */
  dispose(): void {
    this.unlink();
    this.handlers = undefined;
  }

  private link(): void {
    const parent = this.parent;
    if (parent === undefined || this.unlinkParent !== undefined) return;
    if (parent instanceof Scope) {
      this.unlinkParent = parent.onAbort((reason) => this.abort(reason));
      return;
    }
    const listener = (): void => this.abort(parent.reason);
    parent.addEventListener('abort', listener, { once: true });
    this.unlinkParent = () => parent.removeEventListener('abort', listener);
  }

  private unlink(): void {
    const unlink = this.unlinkParent;
    if (unlink === undefined) return;
    this.unlinkParent = noop;
    unlink();
  }
}

function noop(): void {}
