/** What keeps the settle functions of a promise made for it (`promiseFor`). */
export interface Settlers {
  resolve: ((value: unknown) => void) | undefined;
  reject: ((error: unknown) => void) | undefined;
}

// The promise executor runs synchronously inside `new Promise`, so a module slot hands it
// its holder: no closure per promise, which on a per-call path costs more than the rest.
let capturing: Settlers | undefined;

function capture(resolve: (value: never) => void, reject: (error: unknown) => void): void {
  capturing!.resolve = resolve as (value: unknown) => void;
  capturing!.reject = reject;
  capturing = undefined;
}

/**
 * A new promise whose `resolve` and `reject` go to `holder`.
 *
 * @example
 * const pending = { resolve: undefined, reject: undefined };
 * const promise = promiseFor<number>(pending);
 * pending.resolve!(1);
 */
export function promiseFor<T>(holder: Settlers): Promise<T> {
  capturing = holder;
  return new Promise<T>(capture);
}
