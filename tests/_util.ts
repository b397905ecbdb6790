import { inspect } from "node:util";

// Helpers shared by the test files. Test-only code: it may use runtime APIs.

/** A random key prefix, so tests can run in parallel and in any order. */
export function prefix(label = "t"): string {
  return `/test/${label}/${crypto.randomUUID().slice(0, 8)}`;
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Whether `promise` is still pending after the current macrotask turn(s). */
export async function isPending(promise: Promise<unknown>, turns = 3): Promise<boolean> {
  let settled = false;
  promise.then(() => settled = true, () => settled = true);
  for (let i = 0; i < turns; i++) await sleep(0);
  return !settled;
}

/** Waits until `condition()` holds, polling every 10 ms; fails after `ms`. */
export async function until(
  condition: () => boolean | Promise<boolean>,
  ms: number,
  what: string,
): Promise<void> {
  const deadline = performance.now() + ms;
  while (!(await condition())) {
    if (performance.now() > deadline) {
      throw new Error(`Timed out after ${ms} ms waiting for ${what}`);
    }
    await sleep(10);
  }
}

/** Forces a full garbage collection: Deno and Node with --expose-gc, or Bun. */
export function collectGarbage(): void {
  const bun = (globalThis as { Bun?: { gc(force: boolean): void } }).Bun;
  if (bun) return bun.gc(true);
  const gc = (globalThis as { gc?: () => void }).gc;
  if (typeof gc !== "function") {
    throw new Error("No gc(): run Deno with --v8-flags=--expose-gc (scripts/test.sh does)");
  }
  gc();
}

/** What `promise` resolves, or `fallback` if it has not settled within `ms`. */
export async function within<T, F>(promise: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<F>((resolve) => timer = setTimeout(() => resolve(fallback), ms));
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Everything a caller or a log could see of an error: inspect with hidden fields and causes, String, JSON. */
export function everything(error: unknown): string {
  return inspect(error, { depth: Infinity, showHidden: true }) + String(error) +
    JSON.stringify(error);
}

/** Errors a test file provoked, kept to be scanned for secrets at its end. */
export class Provoked {
  readonly errors: unknown[] = [];

  /** Keeps `error` and returns it. */
  keep<T>(error: T): T {
    this.errors.push(error);
    return error;
  }

  /** Fails if any kept error shows any of `secrets` or a Redis lock token. */
  assertClean(secrets: string[]): void {
    if (this.errors.length === 0) {
      throw new Error("No error was kept: the scan would prove nothing");
    }
    for (const error of this.errors) {
      const seen = everything(error);
      for (const secret of secrets) {
        if (seen.includes(secret)) throw new Error(`A secret shows in an error:\n${seen}`);
      }
      if (TOKEN_ANYWHERE.test(seen)) {
        throw new Error(`A lock token shows in an error:\n${seen}`);
      }
    }
  }
}

/** A Redis lock token, as the backend writes it: a version 4 UUID. */
export const TOKEN = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** A Redis lock token anywhere in a text. */
const TOKEN_ANYWHERE = new RegExp(TOKEN.source.slice(1, -1), "i");
