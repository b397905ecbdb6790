/**
 * The memory backend: the full `Locker` contract inside one process, for
 * tests, demos and single-instance apps. Waiters are served first come, first
 * served, and a release hands the lock straight to the next one.
 *
 * `New({ backend: "memory" })` gives lockers that share one process-wide
 * {@linkcode MemoryStore}; {@linkcode createMemoryLocker} takes a store of
 * your own, to keep separate lock spaces (one per test, say).
 *
 * @example Two lockers on one store exclude each other
 * ```ts
 * import { createMemoryLocker, MemoryStore } from "@genesis/lock/memory";
 *
 * const store = new MemoryStore();
 * const a = createMemoryLocker(store);
 * const b = createMemoryLocker(store);
 * const lease = await a.lock("/jobs/a");
 * console.log(await b.tryLock("/jobs/a")); // undefined
 * await lease.release();
 * await a.close();
 * await b.close();
 * ```
 *
 * @module
 */

import { Connector } from "../connector.ts";
import { LockLostError } from "../errors.ts";
import {
  type Driver,
  DriverLocker,
  type Grant,
  type Locker,
  type LockStatus,
  Loss,
  onAbort,
} from "../_locker.ts";
import { LeaseClock } from "../_lease_clock.ts";
import { type LeaseSettings, type Options, resolveOptions } from "../_options.ts";
export type { Lease, Locker, LockOptions } from "../_locker.ts";
export type { Options } from "../_options.ts";

interface Holder {
  readonly grant: Grant;
  /** The expiry of a lease with a TTL; none for one that lasts until released. */
  readonly clock?: LeaseClock;
}

interface Waiter {
  readonly ttl: number | undefined;
  resolve(grant: Grant): void;
  reject(reason: unknown): void;
  /** Stops waiting for the signal to abort. */
  stop(): void;
}

interface Slot {
  holder?: Holder;
  readonly waiters: Waiter[];
}

/**
 * An in-process lock space: the memory backend's "server". Every locker on
 * one store excludes every other.
 *
 * Tokens come from one counter per store, so they strictly increase for
 * every key while the store lives, and the store keeps no state for a key
 * that nobody holds or waits for.
 *
 * @example A store of your own
 * ```ts
 * import { createMemoryLocker, MemoryStore } from "@genesis/lock/memory";
 *
 * const locker = createMemoryLocker(new MemoryStore(), { ttl: 1_000 });
 * await locker.withLock("/a", () => {});
 * await locker.close();
 * ```
 */
export class MemoryStore {
  readonly #slots = new Map<string, Slot>();
  #counter = 0n;

  /**
   * Acquires `key`: at once if it is free, else (with `wait`) when every
   * earlier waiter has had it.
   *
   * @param key The lock's name.
   * @param wait Whether to wait; without it, resolves `undefined` if held.
   * @param signal Stops waiting, rejecting with its reason.
   * @param ttl If given, the lock expires this many milliseconds after it is
   * granted; if not, it lasts until released (in one process a renewing
   * holder cannot fall silent, so no renewal timer is needed).
   * @returns The grant, or `undefined`.
   * @ignore
   */
  acquire(
    key: string,
    wait: boolean,
    signal: AbortSignal,
    ttl?: number,
  ): Promise<Grant | undefined> {
    if (signal.aborted) return Promise.reject(signal.reason);
    let slot = this.#slots.get(key);
    if (slot === undefined) {
      slot = { waiters: [] };
      this.#slots.set(key, slot);
    }
    if (slot.holder === undefined) return Promise.resolve(this.#grant(key, slot, ttl));
    if (!wait) return Promise.resolve(undefined);
    const waiters = slot.waiters;
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        ttl,
        resolve,
        reject,
        stop: onAbort(signal, () => {
          waiters.splice(waiters.indexOf(waiter), 1);
          this.#prune(key);
          reject(signal.reason);
        }),
      };
      waiters.push(waiter);
    });
  }

  /**
   * Counts the holders and waiters on keys that start with `keyPrefix`:
   * 0 once everything under it is released and no one waits.
   *
   * @param keyPrefix The start of the keys to count; `""` for all.
   * @returns Held keys plus queued waiters.
   */
  records(keyPrefix = ""): number {
    let count = 0;
    for (const [key, slot] of this.#slots) {
      if (key.startsWith(keyPrefix)) count += (slot.holder ? 1 : 0) + slot.waiters.length;
    }
    return count;
  }

  /**
   * Who holds `key`, and how many wait for it.
   *
   * @param key The lock's name.
   * @returns The holder's token and time left (for a lease with a TTL), and the number waiting.
   * @ignore
   */
  status(key: string): LockStatus {
    const slot = this.#slots.get(key);
    const holder = slot?.holder;
    if (holder === undefined) return { key, waiting: 0 };
    const ttl = holder.clock === undefined
      ? undefined
      : Math.max(0, Math.round(holder.clock.deadline - performance.now()));
    return { key, holder: { token: holder.grant.token, ttl }, waiting: slot!.waiters.length };
  }

  #grant(key: string, slot: Slot, ttl: number | undefined): Grant {
    const loss = new Loss();
    const clock = ttl === undefined ? undefined : new LeaseClock({
      deadline: performance.now() + ttl,
      period: ttl,
      retry: ttl,
      lapse: (detail) => {
        // The holder hears of the loss before the next holder is granted.
        loss.lose(new LockLostError(key, detail));
        if (slot.holder === holder) this.#handOff(key, slot);
      },
      expired: `lease expired after ${ttl} ms`,
    });
    const grant: Grant = {
      token: ++this.#counter,
      loss,
      check: () => void clock?.check(),
      release: () => {
        // Fenced: only the current holder's release frees the key.
        if (slot.holder === holder) this.#handOff(key, slot);
        return Promise.resolve();
      },
    };
    const holder: Holder = { grant, clock };
    slot.holder = holder;
    return grant;
  }

  #handOff(key: string, slot: Slot) {
    slot.holder?.clock?.stop();
    slot.holder = undefined;
    const next = slot.waiters.shift();
    if (next === undefined) return this.#prune(key);
    next.stop();
    next.resolve(this.#grant(key, slot, next.ttl));
  }

  #prune(key: string) {
    const slot = this.#slots.get(key);
    if (slot && slot.holder === undefined && slot.waiters.length === 0) this.#slots.delete(key);
  }
}

/**
 * Options of {@linkcode createMemoryLocker}: the lease settings of `Options`.
 *
 * @example Leases that expire, to test how the work handles a lost lock
 * ```ts
 * import { createMemoryLocker, type MemoryLockerOptions } from "@genesis/lock/memory";
 *
 * // Without renewal a lease lasts ttl, even in one process
 * const options: MemoryLockerOptions = { ttl: 50, autoRenew: false };
 * const locker = createMemoryLocker(undefined, options);
 * const lease = await locker.lock("/jobs/a");
 * await lease.release(); // before the ttl: nothing is lost
 * await locker.close();
 * ```
 */
export type MemoryLockerOptions = Pick<Options, "ttl" | "autoRenew" | "retryInterval">;

function driverFor(
  store: MemoryStore,
  settings: LeaseSettings,
  onClose: () => Promise<void>,
): Driver {
  const ttl = settings.autoRenew ? undefined : settings.ttl;
  return {
    acquire: (key, wait, signal) => store.acquire(key, wait, signal, ttl),
    status: (key) => Promise.resolve(store.status(key)),
    close: onClose,
  };
}

const stores = new Connector<MemoryStore>({
  create: () => Promise.resolve(new MemoryStore()),
  close: () => Promise.resolve(),
});

/**
 * The driver behind `New({ backend: "memory" })`: the process-wide store,
 * shared by every such locker.
 *
 * @ignore
 */
export async function openSharedDriver(settings: LeaseSettings, owner: object): Promise<Driver> {
  // Credentials and endpoints mean nothing in one process: every memory
  // locker shares one store.
  const ref = await stores.acquire({
    backend: "memory",
    endpoints: [],
    username: "",
    password: "",
    tls: false,
    dialTimeout: 1,
  }, owner);
  return driverFor(ref.client, settings, ref.release);
}

/**
 * Creates a memory locker on a store you own. Closing the locker leaves the
 * store usable by others.
 *
 * @param store The lock space; a new private one if omitted.
 * @param options The lease settings.
 * @returns A locker.
 * @throws {TypeError} An option of the wrong type.
 * @throws {RangeError} An option out of range.
 *
 * @example Expiring leases
 * ```ts
 * import { createMemoryLocker } from "@genesis/lock/memory";
 *
 * const locker = createMemoryLocker(undefined, { ttl: 20, autoRenew: false });
 * const lease = await locker.lock("/a");
 * await new Promise((resolve) => setTimeout(resolve, 40));
 * console.log(lease.signal.aborted); // true
 * await locker.close();
 * ```
 */
export function createMemoryLocker(
  store: MemoryStore = new MemoryStore(),
  options?: MemoryLockerOptions,
): Locker {
  if (!(store instanceof MemoryStore)) {
    throw new TypeError(`Invalid argument "store": expected a MemoryStore`);
  }
  const settings = resolveOptions({ ...options, backend: "memory" });
  const driver = driverFor(store, settings, () => Promise.resolve());
  return new DriverLocker(() => Promise.resolve(driver));
}
