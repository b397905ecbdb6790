// The one Locker implementation that every backend shares. It owns what is
// the same everywhere (argument checks, the in-process FIFO per key, timeouts
// and cancellation, the held-lease table behind unlock(), withLock, close) and
// asks a backend's Driver only to acquire and release on the server.

import { LockClosedError, LockNotHeldError, LockTimeoutError } from "./errors.ts";
import { describe, MAX_DELAY, validateKey } from "./_options.ts";

/**
 * Options of one `lock()` or `tryLock()` call.
 *
 * @example Give up on a timeout or on shutdown
 * ```ts
 * import { type LockOptions, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * const shutdown = new AbortController(); // aborted when the process is asked to stop
 * const options: LockOptions = { signal: shutdown.signal, timeout: 2_000 };
 * const lease = await locker.lock("/jobs/a", options);
 * await lease.release();
 * await locker.close();
 * ```
 */
export interface LockOptions {
  /** Gives up when aborted: the call rejects with `signal.reason`. */
  signal?: AbortSignal;
  /**
   * Gives up after this many milliseconds, rejecting with a
   * `LockTimeoutError`. Shorthand for a timeout signal.
   */
  timeout?: number;
}

/**
 * A held lock. Release it with `release()`, or hold it with `await using`.
 *
 * @example Hold a lock for a block
 * ```ts
 * import { New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * {
 *   await using lease = await locker.lock("/jobs/a");
 *   console.log(lease.key, lease.token);
 * } // released here
 * await locker.close();
 * ```
 */
export interface Lease extends AsyncDisposable {
  /** The key this lease holds. */
  readonly key: string;
  /**
   * The fencing token: strictly greater than the token of every earlier
   * holder of this key. Storage that records the highest token it has seen
   * can reject a stale holder's writes.
   */
  readonly token: bigint;
  /**
   * Aborts, with a `LockLostError` as its reason, as soon as the lock is
   * lost (expired, or deleted behind this holder's back). Not aborted by a
   * normal release.
   */
  readonly signal: AbortSignal;
  /**
   * Releases the lock if it is still this lease's (a fenced release).
   * Idempotent: later calls return the first call's promise. A release that
   * finds the lock already taken away resolves, and aborts `signal` with a
   * `LockLostError` first.
   */
  release(): Promise<void>;
}

/**
 * A distributed lock client: mutual exclusion per key across every process
 * and every locker sharing the backend.
 *
 * @example Take a lock, do the work, let it go
 * ```ts
 * import { New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * const total = await locker.withLock("/counters/a", () => 1 + 1);
 * console.log(total); // 2
 * await locker.close();
 * ```
 */
export interface Locker extends AsyncDisposable {
  /**
   * Waits until the lock on `key` is acquired. Waiters are served first come,
   * first served within this locker. On etcd each locker also holds one place
   * per key in a queue shared with other lockers, processes and Go clients;
   * its next call for the key takes a new place only when the previous call
   * is done.
   *
   * @param key The lock's name: a non-empty, well-formed string of at most 1024 UTF-8 bytes.
   * @param options A signal and/or timeout to give up.
   * @returns The held lease.
   * @throws {TypeError} A key or option of the wrong type.
   * @throws {RangeError} An empty, too long or ill-formed key, or a bad timeout.
   * @throws {LockTimeoutError} The `timeout` ran out; nothing is left behind.
   * @throws {LockClosedError} The locker is or was closed while waiting.
   */
  lock(key: string, options?: LockOptions): Promise<Lease>;
  /**
   * Makes exactly one attempt to acquire `key` and never waits for a holder.
   *
   * @param key The lock's name.
   * @param options A signal and/or timeout for the one round trip.
   * @returns The lease, or `undefined` if the lock is held elsewhere
   * (including by another call on this locker).
   */
  tryLock(key: string, options?: LockOptions): Promise<Lease | undefined>;
  /**
   * Releases the lease this locker holds on `key`. Never touches a lock that
   * someone else holds.
   *
   * @param key The lock's name.
   * @throws {LockNotHeldError} This locker holds no lock on `key`.
   */
  unlock(key: string): Promise<void>;
  /**
   * Runs `fn` while holding the lock on `key`, then releases it.
   *
   * @param key The lock's name.
   * @param fn The work; its lease is passed in, so it can watch `lease.signal`.
   * @param options A signal and/or timeout for acquiring.
   * @returns What `fn` returned.
   * @throws {LockLostError} The lock was lost before `fn` finished.
   */
  withLock<T>(
    key: string,
    fn: (lease: Lease) => T | Promise<T>,
    options?: LockOptions,
  ): Promise<T>;
  /**
   * Reads who holds `key` and how many wait, without taking part.
   *
   * @param key The lock's name.
   * @returns What the server says now.
   */
  status(key: string): Promise<LockStatus>;
  /**
   * Releases every lease this locker holds, rejects its pending waits with a
   * `LockClosedError`, stops its timers and drops its client reference (the
   * last locker on a client closes it). Idempotent.
   */
  close(): Promise<void>;
}

/**
 * Who holds a lock and how many wait, as {@linkcode Locker.status} reads it
 * from the server at one moment.
 *
 * @example Print who holds a lock
 * ```ts
 * import { New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * const lease = await locker.lock("/jobs/a");
 * const status = await locker.status("/jobs/a");
 * console.log(status.holder?.token === lease.token); // true
 * await locker.close();
 * ```
 */
export interface LockStatus {
  /** The key asked about. */
  readonly key: string;
  /** The holder, or `undefined` when the lock is free. */
  readonly holder?: {
    /** The holder's fencing token. */
    readonly token: bigint;
    /** Milliseconds until the holder's lease expires if not renewed, where the server says. */
    readonly ttl?: number;
    /** etcd: the holder's key (`NAME/<lease ID in hex>`). */
    readonly owner?: string;
    /** etcd: the holder's lease ID, in decimal as `etcdctl lease list` shows it. */
    readonly lease?: string;
  };
  /** How many wait behind the holder, where the backend queues on the server (etcd). */
  readonly waiting?: number;
  /** etcd: the waiters' keys, first come first. */
  readonly queue?: readonly string[];
}

/**
 * How a backend reports that a grant was lost: once, with a reason, to the
 * lease handed out for it. Lighter than an `AbortController` per lease, which a lease
 * makes only when its caller reads `lease.signal`.
 */
export class Loss {
  #lost = false;
  #reason: unknown;
  /** The lease handed out for it: told, without a closure per lease. */
  #lease?: HeldLease;

  /** Whether the grant was lost. */
  get lost(): boolean {
    return this.#lost;
  }

  /** Why it was lost (a `LockLostError`, as a rule). */
  get reason(): unknown {
    return this.#reason;
  }

  /** Marks it lost with `reason` and tells its lease, once. */
  lose(reason: unknown): void {
    if (this.#lost) return;
    this.#lost = true;
    this.#reason = reason;
    const lease = this.#lease;
    this.#lease = undefined;
    if (lease) HeldLease.lost(lease, reason);
  }

  /** Tells `lease` when it is lost; at once if it already was. */
  hold(lease: HeldLease): void {
    if (this.#lost) return HeldLease.lost(lease, this.#reason);
    this.#lease = lease;
  }
}

/** A lock held on the server, as a backend reports it. */
export interface Grant {
  /** The fencing token. */
  readonly token: bigint;
  /** Lost, with a `LockLostError` as its reason, when the backend decides the lock is lost. */
  readonly loss: Loss;
  /**
   * Loses it now if the lease's deadline has passed. Called on every
   * read of `lease.signal`, so a process that was paused past its deadline
   * sees the loss on its first look, even before the loss timer has run.
   */
  check?(): void;
  /** Fenced release on the server. */
  release(): Promise<void>;
}

/** What a backend implements; the shared locker does the rest. */
export interface Driver {
  /**
   * Acquires `key` on the server. With `wait`, waits until acquired;
   * without, makes one attempt and resolves `undefined` if it is held.
   * When `signal` aborts, rejects with its reason and leaves nothing behind.
   * Only one call per key is in flight at a time.
   */
  acquire(key: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined>;
  /**
   * Gives back, at `close()`, every grant this driver made that is still
   * held (etcd revokes its session lease: one call for every key on it).
   * Optional: without it, each grant's `release()` runs, a bounded number at
   * a time. Tries every grant before it rejects with the first failure.
   */
  releaseAll?(grants: Grant[]): Promise<void>;
  /** Reads who holds `key` and who waits. */
  status(key: string): Promise<LockStatus>;
  /** Stops timers and gives back the client. Called once, after every release. */
  close(): Promise<void>;
}

/** How many releases `close()` keeps in flight at once: never a burst a server refuses. */
const CLOSE_CONCURRENCY = 32;

/**
 * Runs `fn` on every item, at most `limit` at a time, and resolves the
 * failures (after every item was tried).
 */
export async function settleEach<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<unknown>,
): Promise<unknown[]> {
  const failures: unknown[] = [];
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next++];
      try {
        await fn(item);
      } catch (error) {
        failures.push(error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return failures;
}

/** The callbacks waiting on each signal, behind one listener of its own. */
const watchers = new WeakMap<AbortSignal, Set<() => void>>();

/**
 * Calls `then` once `signal` aborts, and returns what stops it: the
 * `removeEventListener` of a one-shot `addEventListener`, at the cost of a
 * set entry. Every call of a locker shares its close signal, and an
 * EventTarget's add+remove costs 0.7 µs with no other listener and 2.5 µs
 * with 64 (Deno; a set's 0.2–0.3), twice a cycle. A signal that has already
 * aborted never calls `then`: check `aborted` first.
 */
export function onAbort(signal: AbortSignal, then: () => void): () => void {
  let waiting = watchers.get(signal);
  if (waiting === undefined) {
    if (signal.aborted) return () => {};
    const created = new Set<() => void>();
    watchers.set(signal, created);
    signal.addEventListener("abort", () => {
      watchers.delete(signal);
      const callbacks = [...created];
      created.clear();
      let failure: { error: unknown } | undefined;
      for (const callback of callbacks) {
        try {
          callback();
        } catch (error) {
          failure ??= { error };
        }
      }
      if (failure !== undefined) throw failure.error;
    }, { once: true });
    waiting = created;
  }
  // An entry of its own: the same function twice is two waits, as with two listeners.
  const entry = () => then();
  const set = waiting;
  set.add(entry);
  return () => void set.delete(entry);
}

/**
 * Resolves what `promise` resolves, or rejects with `signal.reason` first.
 * A `promise` given up on is still observed: its later rejection must not
 * surface as an unhandled one (Deno ends the process on those).
 */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => {});
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const stop = onAbort(signal, () => reject(signal.reason));
    promise.then(resolve, reject).finally(stop);
  });
}

/** Waits `ms`, or rejects with `signal.reason` when it aborts first. */
export function delay(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const stop = onAbort(signal, () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
    const timer = setTimeout(() => {
      stop();
      resolve();
    }, ms);
  });
}

/**
 * One call's signal: the caller's signal, its timeout and the locker's close,
 * in one. A call with neither a signal nor a timeout uses the locker's close
 * signal as it is (`of` returns undefined): no controller, no listener.
 */
class CallSignal {
  readonly #controller = new AbortController();
  readonly #cleanup: (() => void)[] = [];

  static of(
    key: string,
    options: LockOptions | undefined,
    closing: AbortSignal,
  ): CallSignal | undefined {
    const { signal, timeout } = checkLockOptions(options);
    if (signal === undefined && timeout === undefined) return undefined;
    return new CallSignal(key, signal, timeout, closing);
  }

  private constructor(
    key: string,
    signal: AbortSignal | undefined,
    timeout: number | undefined,
    closing: AbortSignal,
  ) {
    const abort = (reason: unknown) => this.#controller.abort(reason);
    this.#follow(closing, () => abort(closedError(key)));
    if (signal) this.#follow(signal, () => abort(signal.reason));
    if (timeout !== undefined && !this.signal.aborted) {
      const timer = setTimeout(() => abort(new LockTimeoutError(key, timeout)), timeout);
      this.#cleanup.push(() => clearTimeout(timer));
    }
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  #follow(source: AbortSignal, then: () => void) {
    if (source.aborted) return then();
    this.#cleanup.push(onAbort(source, then));
  }

  dispose() {
    for (const undo of this.#cleanup) undo();
  }
}

function closedError(key: string): LockClosedError {
  return new LockClosedError(`Cannot acquire lock ${JSON.stringify(key)}`);
}

function checkLockOptions(options: LockOptions | undefined): LockOptions {
  if (options === undefined) return {};
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Invalid lock options: expected an object, received ${describe(options)}`);
  }
  const { signal, timeout } = options;
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw new TypeError(
      `Invalid option "signal": expected an AbortSignal, received ${describe(signal)}`,
    );
  }
  if (timeout !== undefined) {
    if (typeof timeout !== "number") {
      throw new TypeError(
        `Invalid option "timeout": expected a number of milliseconds, received ${
          describe(timeout)
        }`,
      );
    }
    if (!Number.isInteger(timeout) || timeout < 0 || timeout > MAX_DELAY) {
      throw new RangeError(
        `Invalid option "timeout": expected a whole number of milliseconds from 0 to ${MAX_DELAY}, received ${timeout}`,
      );
    }
  }
  return { signal, timeout };
}

interface Waiter {
  resolve(): void;
  reject(reason: unknown): void;
  /** Stops waiting for the signal to abort. */
  stop(): void;
}

/** A key's place in a {@linkcode KeyQueue}: the calls waiting, and what the owner keeps there. */
interface Slot<V> {
  waiters?: Waiter[];
  value?: V;
}

/**
 * The in-process FIFO: at most one call per key goes to the server at a
 * time. Also used by backends to queue contenders from several lockers on one
 * shared client. The owner of a key can keep a value with it (the locker its
 * held lease), so a cycle costs one map entry, not two.
 */
export class KeyQueue<V = never> {
  // A key is present while some call owns it.
  readonly #keys = new Map<string, Slot<V>>();

  /** Whether some call owns `key`. */
  has(key: string): boolean {
    return this.#keys.has(key);
  }

  tryEnter(key: string): boolean {
    if (this.#keys.has(key)) return false;
    this.#keys.set(key, {});
    return true;
  }

  enter(key: string, signal: AbortSignal): Promise<void> {
    if (signal.aborted) return Promise.reject(signal.reason);
    if (this.tryEnter(key)) return Promise.resolve();
    const slot = this.#keys.get(key)!;
    const waiters = slot.waiters ??= [];
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        stop: onAbort(signal, () => {
          waiters.splice(waiters.indexOf(waiter), 1);
          reject(signal.reason);
        }),
      };
      waiters.push(waiter);
    });
  }

  /** Keeps `value` with `key`, which the caller owns, until it leaves. */
  keep(key: string, value: V): void {
    this.#keys.get(key)!.value = value;
  }

  /** The value the owner of `key` keeps with it. */
  kept(key: string): V | undefined {
    return this.#keys.get(key)?.value;
  }

  /** Every value kept. */
  values(): V[] {
    const values: V[] = [];
    for (const slot of this.#keys.values()) if (slot.value !== undefined) values.push(slot.value);
    return values;
  }

  leave(key: string) {
    const slot = this.#keys.get(key);
    if (slot === undefined) return;
    slot.value = undefined;
    const next = slot.waiters?.shift();
    if (next === undefined) {
      this.#keys.delete(key);
      return;
    }
    next.stop();
    next.resolve();
  }
}

class HeldLease implements Lease {
  readonly key: string;
  readonly token: bigint;
  readonly #grant: Grant;
  // Made on the first read of `signal`: most leases are never asked.
  #controller?: AbortController;
  #aborted = false;
  #reason: unknown;
  #ended = false;
  /** The locker's queue, which this lease leaves when it ends (no closure: see `Loss.hold`). */
  readonly #queue: KeyQueue<HeldLease>;
  #released?: Promise<void>;

  constructor(key: string, grant: Grant, queue: KeyQueue<HeldLease>) {
    this.key = key;
    this.token = grant.token;
    this.#grant = grant;
    this.#queue = queue;
    // A lost lease stops counting as held at once, so unlock() and the next
    // in-process waiter do not wait for the holder to notice.
    grant.loss.hold(this);
  }

  /** The grant was lost (called by its `Loss`). */
  static lost(lease: HeldLease, reason: unknown): void {
    lease.#lose(reason);
  }

  get signal(): AbortSignal {
    if (!this.#ended) this.#grant.check?.();
    if (this.#controller === undefined) {
      this.#controller = new AbortController();
      if (this.#aborted) this.#controller.abort(this.#reason);
    }
    return this.#controller.signal;
  }

  /** Why the lease's signal aborted, if it did (without making the signal). */
  static abortedWith(lease: HeldLease): { reason: unknown } | undefined {
    if (!lease.#ended) lease.#grant.check?.();
    return lease.#aborted ? { reason: lease.#reason } : undefined;
  }

  #abort(reason: unknown) {
    if (this.#aborted) return;
    this.#aborted = true;
    this.#reason = reason;
    this.#controller?.abort(reason);
  }

  #lose(reason: unknown) {
    this.#abort(reason);
    this.#end();
  }

  #end() {
    if (this.#ended) return;
    this.#ended = true;
    this.#queue.leave(this.key);
  }

  release(): Promise<void> {
    return this.#released ??= (async () => {
      try {
        if (!lostAlready(this.#grant)) await this.#grant.release();
      } finally {
        // Only now may the next in-process waiter go to the server: on etcd it
        // would otherwise find this lease's key still in place.
        this.#end();
      }
    })();
  }

  /**
   * For `close()`: makes the loss visible first (the signal aborts with a
   * `LockClosedError`, so work under `withLock()` cannot finish as if it
   * still held the lock), then hands the grant to `close()` to give back.
   * A later `release()` waits for that give-back. Undefined if already
   * released or lost.
   */
  surrender(given: Promise<unknown>): Grant | undefined {
    if (this.#released !== undefined || this.#ended) return undefined;
    const grant = this.#grant;
    this.#released = given.then(() => {}, () => {}).finally(() => this.#end());
    // A lease whose deadline passed unnoticed (a stall kept its timer from
    // running) was lost, not closed: it says so, and nothing is sent for it.
    if (lostAlready(grant)) return undefined;
    this.#abort(new LockClosedError(`Lost lock ${JSON.stringify(this.key)}`));
    return grant;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.release();
  }
}

/**
 * `call`, marked as observed: a call that close() rejects before its caller
 * awaits it (the caller awaits close() first, say) must not surface as an
 * unhandled rejection. The caller still sees the rejection.
 */
function observed<T>(call: Promise<T>): Promise<T> {
  call.catch(() => {});
  return call;
}

/** Whether a grant was lost before it could be handed out. */
function lostAlready(grant: Grant): boolean {
  grant.check?.();
  return grant.loss.lost;
}

/** The shared implementation of {@linkcode Locker} over a backend's {@linkcode Driver}. */
export class DriverLocker implements Locker {
  readonly #connect: (owner: object) => Promise<Driver>;
  #driver?: Promise<Driver>;
  /** The driver once connected: the hot path skips the await. */
  #ready?: Driver;
  /** The in-process FIFO, with the held lease kept at its key. */
  readonly #queue = new KeyQueue<HeldLease>();
  readonly #closing = new AbortController();
  /** Calls in flight (lock, tryLock, status), which close() waits for. */
  #inFlight = 0;
  #drained?: () => void;
  #closed?: Promise<void>;

  /**
   * @param connect Makes the driver, on first use. A rejection is not cached:
   * the next call tries again.
   */
  constructor(connect: (owner: object) => Promise<Driver>) {
    this.#connect = connect;
  }

  #getDriver(): Promise<Driver> {
    if (this.#driver === undefined) {
      const pending = this.#connect(this);
      this.#driver = pending;
      pending.then((driver) => {
        if (this.#driver === pending) this.#ready = driver;
      }, () => {
        if (this.#driver === pending) this.#driver = undefined;
      });
    }
    return this.#driver;
  }

  lock(key: string, options?: LockOptions): Promise<Lease> {
    return observed(this.#acquire(key, options, true) as Promise<Lease>);
  }

  tryLock(key: string, options?: LockOptions): Promise<Lease | undefined> {
    return observed(this.#acquire(key, options, false));
  }

  /** Counts a call as in flight, so close() can wait for it to clean up. */
  #begin(): void {
    this.#inFlight += 1;
  }

  #finish(): void {
    this.#inFlight -= 1;
    if (this.#inFlight === 0) this.#drained?.();
  }

  async #acquire(
    key: string,
    options: LockOptions | undefined,
    wait: boolean,
  ): Promise<Lease | undefined> {
    key = validateKey(key);
    const closing = this.#closing.signal;
    const call = CallSignal.of(key, options, closing);
    const signal = call?.signal ?? closing;
    this.#begin();
    try {
      return await this.#acquireWith(key, signal, wait);
    } catch (error) {
      // The locker's own close signal has no key in its reason: say which.
      if (call === undefined && closing.aborted && error === closing.reason) {
        throw closedError(key);
      }
      throw error;
    } finally {
      call?.dispose();
      this.#finish();
    }
  }

  async #acquireWith(key: string, signal: AbortSignal, wait: boolean): Promise<Lease | undefined> {
    // The key's first caller in this locker enters without an await.
    if (signal.aborted) throw signal.reason;
    if (!this.#queue.tryEnter(key)) {
      if (!wait) return undefined;
      await this.#queue.enter(key, signal);
    }
    let grant: Grant | undefined;
    try {
      const driver = this.#ready ?? await abortable(this.#getDriver(), signal);
      for (;;) {
        grant = await driver.acquire(key, wait, signal);
        if (grant === undefined || !lostAlready(grant)) break;
        // Granted, but lost before it reached the caller (the replies came
        // later than the TTL): give it back; lock() tries again.
        const reason = grant.loss.reason;
        await grant.release().catch(() => {});
        if (!wait) throw reason;
        signal.throwIfAborted();
      }
    } catch (error) {
      this.#queue.leave(key);
      throw error;
    }
    if (grant === undefined) {
      this.#queue.leave(key);
      return undefined;
    }
    const lease = new HeldLease(key, grant, this.#queue);
    this.#queue.keep(key, lease);
    if (this.#closed !== undefined) {
      // close() ran while the server granted it: give it straight back.
      await lease.release();
      throw closedError(key);
    }
    return lease;
  }

  async unlock(key: string): Promise<void> {
    key = validateKey(key);
    if (this.#closed !== undefined) {
      throw new LockClosedError(`Cannot unlock ${JSON.stringify(key)}`);
    }
    const lease = this.#queue.kept(key);
    if (lease === undefined) throw new LockNotHeldError(key);
    await lease.release();
  }

  async status(key: string): Promise<LockStatus> {
    key = validateKey(key);
    if (this.#closed !== undefined) {
      throw new LockClosedError(`Cannot read the status of lock ${JSON.stringify(key)}`);
    }
    this.#begin();
    try {
      return await (this.#ready ?? await this.#getDriver()).status(key);
    } finally {
      this.#finish();
    }
  }

  async withLock<T>(
    key: string,
    fn: (lease: Lease) => T | Promise<T>,
    options?: LockOptions,
  ): Promise<T> {
    if (typeof fn !== "function") {
      throw new TypeError(`Invalid argument "fn": expected a function, received ${describe(fn)}`);
    }
    const lease = await this.lock(key, options);
    let result: T;
    try {
      result = await fn(lease);
    } catch (error) {
      await lease.release().catch(() => {});
      throw error;
    }
    // Release first: a release that finds the lock taken away aborts the signal.
    await lease.release();
    // The work finished without the lock: its result must not pass for a locked one.
    const aborted = HeldLease.abortedWith(lease as HeldLease);
    if (aborted) throw aborted.reason;
    return result;
  }

  close(): Promise<void> {
    return this.#closed ??= (async () => {
      this.#closing.abort();
      // Aborted calls clean up on the server first (etcd deletes its waiter key).
      if (this.#inFlight > 0) await new Promise<void>((resolve) => this.#drained = resolve);
      const driver = await this.#driver?.catch(() => undefined);
      let given!: (failures: unknown[]) => void;
      const giving = new Promise<unknown[]>((resolve) => given = resolve);
      const grants = this.#queue.values()
        .map((lease) => lease.surrender(giving))
        .filter((grant): grant is Grant => grant !== undefined);
      let failures: unknown[] = [];
      try {
        if (driver?.releaseAll) {
          await driver.releaseAll(grants).catch((error) => failures.push(error));
        } else {
          failures = await settleEach(grants, CLOSE_CONCURRENCY, (grant) => grant.release());
        }
      } finally {
        given(failures);
        await driver?.close();
      }
      if (failures.length > 0) throw failures[0];
    })();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
