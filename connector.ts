/**
 * Client reuse: one client per distinct connection config, shared by every
 * locker that asks for the same config, closed when its last user lets go.
 *
 * A config is reduced to the fields that decide a connection and hashed with
 * HMAC-SHA-256 under a random per-process key, so no plaintext secret is a map
 * key and two configs that differ only in password never share a client. The
 * cache holds the in-flight creation, so concurrent callers share it, and
 * drops it if it fails, so a failed connect is retried, never reused. Created
 * clients are held only through `WeakRef`; the users' references keep them
 * alive, and a `FinalizationRegistry` gives back the reference of an owner
 * that was dropped without being closed.
 *
 * Backends plug in a {@linkcode ClientFactory}; this module knows none of them.
 *
 * @example Share one client between two users
 * ```ts
 * import { Connector } from "@genesis/lock/connector";
 *
 * let created = 0;
 * const connector = new Connector({
 *   create: () => Promise.resolve({ id: ++created }),
 *   close: () => Promise.resolve(),
 * });
 * const config = {
 *   backend: "memory" as const,
 *   endpoints: [],
 *   username: "",
 *   password: "",
 *   tls: false as const,
 *   dialTimeout: 5_000,
 * };
 * const a = await connector.acquire(config);
 * const b = await connector.acquire(config);
 * console.log(a.client === b.client, created); // true 1
 * await a.release();
 * await b.release(); // the last user: the client is closed
 * ```
 *
 * @module
 */

import type { ConnectionConfig } from "./_options.ts";
import { toHex } from "./_hex.ts";
export type { ConnectionConfig, TlsOptions } from "./_options.ts";

/**
 * How a backend makes and closes its client.
 *
 * @example A factory for a stand-in client
 * ```ts
 * import { type ClientFactory, Connector } from "@genesis/lock/connector";
 *
 * // A real factory connects in create(); a rejection there is never cached
 * const factory: ClientFactory<URL> = {
 *   create: (config) => Promise.resolve(new URL(`http://${config.endpoints[0]}`)),
 *   close: () => Promise.resolve(),
 * };
 * const connector = new Connector(factory);
 * console.log(connector.cache.size); // 0: nothing is created before acquire()
 * ```
 */
export interface ClientFactory<C> {
  /** Makes a client for `config`; rejects if it cannot connect. */
  create(config: ConnectionConfig): Promise<C>;
  /** Closes a client that no locker uses any more. */
  close(client: C): Promise<void>;
}

/**
 * One user's counted reference to a shared client.
 *
 * @example Give the reference back even when the work fails
 * ```ts
 * import type { ClientRef } from "@genesis/lock/connector";
 *
 * async function withClient<C, T>(ref: ClientRef<C>, work: (client: C) => T): Promise<T> {
 *   try {
 *     return await work(ref.client);
 *   } finally {
 *     await ref.release(); // the last reference closes the client
 *   }
 * }
 * const ref: ClientRef<string> = { client: "conn", release: () => Promise.resolve() };
 * console.log(await withClient(ref, (client) => client.length)); // 4
 * ```
 */
export interface ClientRef<C> {
  /** The shared client. */
  readonly client: C;
  /** Gives the reference back; the last one closes the client. Idempotent. */
  release(): Promise<void>;
}

/**
 * A created client and its count of users.
 *
 * @example Tell whether a client is in use
 * ```ts
 * import type { Shared } from "@genesis/lock/connector";
 *
 * // A closed client keeps its last count, so check closed first
 * function inUse<C>(shared: Shared<C>): boolean {
 *   return !shared.closed && shared.refs > 0;
 * }
 * console.log(inUse({ client: "conn", refs: 2, closed: false })); // true
 * ```
 */
export interface Shared<C> {
  /** The client. */
  readonly client: C;
  /** How many references are out. */
  refs: number;
  /** Set when the last reference was given back and the client closed. */
  closed: boolean;
}

/**
 * What the cache holds for one config hash.
 *
 * @example Describe a cache entry for diagnostics
 * ```ts
 * import type { CacheEntry, Shared } from "@genesis/lock/connector";
 *
 * // A creation in flight is a promise; a created client is held only weakly
 * function state<C>(entry: CacheEntry<C>): string {
 *   if (entry instanceof Promise) return "connecting";
 *   return entry.deref() === undefined ? "collected" : "open";
 * }
 * const shared: Shared<string> = { client: "conn", refs: 1, closed: false };
 * console.log(state(new WeakRef(shared))); // "open"
 * ```
 */
export type CacheEntry<C> = Promise<Shared<C>> | WeakRef<Shared<C>>;

let hmacKey: Promise<CryptoKey> | undefined;

function processKey(): Promise<CryptoKey> {
  // One random key per process: hashes cannot be compared across processes
  // or precomputed for a guessed password.
  return hmacKey ??= crypto.subtle.importKey(
    "raw",
    crypto.getRandomValues(new Uint8Array(32)),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
}

/**
 * The keyed hash of the fields of `config` that decide a connection, as hex.
 *
 * @param config The connection config.
 * @returns 64 hex digits; equal for equal configs within this process.
 *
 * @example A new password is a new connection
 * ```ts
 * import { type ConnectionConfig, hashConfig } from "@genesis/lock/connector";
 *
 * const config: ConnectionConfig = {
 *   backend: "redis",
 *   endpoints: ["127.0.0.1:6379"],
 *   username: "app",
 *   password: "old-secret",
 *   tls: false,
 *   dialTimeout: 5_000,
 * };
 * const before = await hashConfig(config); // safe to log: it reveals no secret
 * const after = await hashConfig({ ...config, password: "new-secret" });
 * console.log(before === after); // false
 * ```
 */
export async function hashConfig(config: ConnectionConfig): Promise<string> {
  const tls = config.tls === false ? false : [
    config.tls.ca ?? "",
    config.tls.cert ?? "",
    config.tls.key ?? "",
    config.tls.serverName ?? "",
  ];
  const canonical = JSON.stringify([
    config.backend,
    config.endpoints,
    config.username,
    config.password,
    tls,
    config.dialTimeout,
    // Redis: one endpoint is a server, a seed node or a Sentinel by mode.
    config.mode ?? "",
    config.masterName ?? "",
    config.sentinelUsername ?? "",
    config.sentinelPassword ?? "",
  ]);
  const mac = await crypto.subtle.sign(
    "HMAC",
    await processKey(),
    new TextEncoder().encode(canonical),
  );
  return toHex(mac);
}

/**
 * A reference-counted cache of clients, one per distinct connection config.
 *
 * @typeParam C The client type.
 *
 * @example The last release closes the client and empties the cache
 * ```ts
 * import { type ConnectionConfig, Connector } from "@genesis/lock/connector";
 *
 * const connector = new Connector({
 *   create: (config: ConnectionConfig) => Promise.resolve(config.endpoints),
 *   close: () => Promise.resolve(),
 * });
 * const config: ConnectionConfig = {
 *   backend: "memory",
 *   endpoints: [],
 *   username: "",
 *   password: "",
 *   tls: false,
 *   dialTimeout: 5_000,
 * };
 * const ref = await connector.acquire(config);
 * await ref.release(); // the last user: the client is closed
 * console.log(connector.cache.size); // 0
 * ```
 */
export class Connector<C> {
  #factory: ClientFactory<C>;
  #cache = new Map<string, CacheEntry<C>>();
  #registry = new FinalizationRegistry<ClientRef<C>>((ref) => {
    // A dropped owner can no longer be closed by anyone: give its reference back.
    ref.release().catch(() => {});
  });

  /**
   * Creates an empty cache.
   *
   * @param factory How clients are made and closed.
   */
  constructor(factory: ClientFactory<C>) {
    this.#factory = factory;
  }

  /**
   * The cache itself, keyed by config hash, for inspection in tests and
   * diagnostics. Holds no config and no secret.
   */
  get cache(): ReadonlyMap<string, CacheEntry<C>> {
    return this.#cache;
  }

  /**
   * Takes a reference to the client for `config`, creating the client if no
   * one holds it. Concurrent calls with one config share one creation.
   *
   * @param config The connection config.
   * @param owner If given, the reference is given back when `owner` is
   * garbage-collected without having released it.
   * @returns A reference; call `release()` when done.
   * @throws Whatever the factory's `create` rejects with; nothing is cached then.
   */
  async acquire(config: ConnectionConfig, owner?: object): Promise<ClientRef<C>> {
    const id = await hashConfig(config);
    for (;;) {
      const entry = this.#cache.get(id);
      const shared = entry instanceof Promise
        ? await entry
        : entry?.deref() ?? await this.#create(id, config);
      // Another user may have released the last reference while this call waited.
      if (shared.closed) continue;
      shared.refs++;
      const ref = this.#ref(id, shared);
      if (owner !== undefined) this.#registry.register(owner, ref, ref);
      return ref;
    }
  }

  #create(id: string, config: ConnectionConfig): Promise<Shared<C>> {
    const pending = this.#factory.create(config).then(
      (client) => {
        const shared: Shared<C> = { client, refs: 0, closed: false };
        this.#cache.set(id, new WeakRef(shared));
        return shared;
      },
      (error) => {
        if (this.#cache.get(id) === pending) this.#cache.delete(id);
        throw error;
      },
    );
    this.#cache.set(id, pending);
    return pending;
  }

  #ref(id: string, shared: Shared<C>): ClientRef<C> {
    let released: Promise<void> | undefined;
    const ref: ClientRef<C> = {
      client: shared.client,
      release: () => {
        return released ??= (async () => {
          this.#registry.unregister(ref);
          if (--shared.refs > 0) return;
          shared.closed = true;
          const entry = this.#cache.get(id);
          if (entry instanceof WeakRef && entry.deref() === shared) this.#cache.delete(id);
          await this.#factory.close(shared.client);
        })();
      },
    };
    return ref;
  }
}
