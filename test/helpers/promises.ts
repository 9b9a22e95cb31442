// Promise helpers the unit tests share.

export interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
}

/** A promise with its settle functions, for a test to decide when a call ends. */
export function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

export interface Tracked<T> {
  state: 'pending' | 'fulfilled' | 'rejected';
  value?: T;
  error?: unknown;
}

/** The settled state of a promise, readable at any time without awaiting it for good. */
export function track<T>(promise: Promise<T>): Tracked<T> {
  const box: Tracked<T> = { state: 'pending' };
  promise.then(
    (value) => Object.assign(box, { state: 'fulfilled', value }),
    (error: unknown) => Object.assign(box, { state: 'rejected', error }),
  );
  return box;
}

/** Lets every pending promise reaction run. */
export async function flush(): Promise<void> {
  for (let i = 0; i < 10; i++) await Promise.resolve();
}
