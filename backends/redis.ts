/**
 * The Redis backend, on npm:ioredis: a fenced lock whose release is
 * published, so waiters in any process try again at once instead of polling.
 * `mode` picks the topology: one Redis, a Redis Cluster (sharded pub/sub
 * where the servers have it), a Sentinel-managed primary, or several
 * independent instances for the Redlock quorum. With `waitReplicas`, a grant
 * and each renewal count only once that many replicas acknowledged them.
 *
 * Keys of the lock `NAME` (all share the hash tag `{NAME}`, so the layout
 * works on Redis Cluster):
 *
 * | key                   | holds                                                  |
 * | --------------------- | ------------------------------------------------------ |
 * | `lock:{NAME}`         | the holder's random token, with a PX expiry of `ttl`   |
 * | `lock:{NAME}:fence`   | the fencing counter, incremented by every acquisition  |
 * | `lock:{NAME}:released`| (a channel) the token of each release, for waiters     |
 *
 * Fencing tokens are monotonic only while Redis keeps the counter: use AOF
 * with `appendfsync always`, and `waitReplicas` wherever a replica can be
 * promoted, or a restart or a failover can hand out a token again. A lock key deleted or evicted behind the holder's
 * back is seen at the next renewal (up to `ttl / 3` later) or at the release,
 * which then aborts `lease.signal`: use `maxmemory-policy noeviction`.
 *
 * @example A locker on a client you own
 * ```ts ignore
 * import { Redis } from "npm:ioredis@^6.0.0";
 * import { createRedisLocker } from "@genesis/lock/redis";
 *
 * const redis = new Redis({ host: "127.0.0.1", port: 6379 });
 * const locker = createRedisLocker(redis, { ttl: 10_000 });
 * await locker.withLock("/jobs/nightly-report", async (lease) => {
 *   console.log("fencing token", lease.token);
 * });
 * await locker.close();
 * redis.disconnect();
 * ```
 *
 * @module
 */

import { Cluster, type ClusterOptions, Redis, type RedisOptions } from "ioredis";
import { type ClientRef, Connector } from "../connector.ts";
import {
  LockAuthError,
  LockConnectionError,
  LockError,
  LockLostError,
  LockPermissionError,
  LockReplicationError,
} from "../errors.ts";
import {
  abortable,
  type Driver,
  DriverLocker,
  type Grant,
  KeyQueue,
  type Locker,
  type LockStatus,
} from "../_locker.ts";
import {
  type ConnectionConfig,
  type LeaseSettings,
  type Options,
  type ResolvedOptions,
  resolveOptions,
} from "../_options.ts";
import { LeaseClock, type Renewal } from "../_lease_clock.ts";
import { scrub } from "../_scrub.ts";
import { toHex } from "../_hex.ts";
export type { Lease, Locker, LockOptions } from "../_locker.ts";
export type { Options } from "../_options.ts";

/**
 * The client {@linkcode createRedisLocker} takes: an ioredis `Redis` or
 * `Cluster`, described by the parts this backend uses.
 *
 * @example Three independent servers for the Redlock quorum
 * ```ts ignore
 * import { Redis } from "npm:ioredis@^6.0.0";
 * import { createRedisLocker, type RedisClient } from "@genesis/lock/redis";
 *
 * const servers = ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map((host) => new Redis({ host }));
 * const clients: RedisClient[] = servers; // a lock needs a majority of them
 * const locker = createRedisLocker(clients);
 * await locker.withLock("/jobs/a", () => {});
 * await locker.close();
 * for (const redis of servers) redis.disconnect();
 * ```
 */
export interface RedisClient {
  /** Runs a cached script. */
  evalsha(...args: never[]): unknown;
  /** Runs a script. */
  eval(...args: never[]): unknown;
  /** A new connection with the same options, for the subscriber. */
  duplicate(...args: never[]): unknown;
}

/**
 * Options of {@linkcode createRedisLocker}: the lease settings of `Options`.
 *
 * @example A fixed lease with no renewal
 * ```ts ignore
 * import { Redis } from "npm:ioredis@^6.0.0";
 * import { createRedisLocker, type RedisLockerOptions } from "@genesis/lock/redis";
 *
 * // The lease lasts 30 s from acquisition, however long the work runs
 * const options: RedisLockerOptions = { ttl: 30_000, autoRenew: false };
 * const redis = new Redis();
 * const locker = createRedisLocker(redis, options);
 * await locker.withLock("/jobs/a", () => {});
 * await locker.close();
 * redis.disconnect();
 * ```
 */
export type RedisLockerOptions = Pick<
  Options,
  "ttl" | "autoRenew" | "retryInterval" | "waitReplicas"
>;

// KEYS: lock, fence. ARGV: token, ttl ms. Acquires and counts, or reports the wait.
const ACQUIRE = `
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}`;

// KEYS: lock. ARGV: token, channel, "s" for sharded pub/sub. Fenced delete,
// then wake the waiters. Without a channel (a partial acquisition given
// back) it wakes nobody: waiters would only find the lock still held on a
// majority. pcall: a user without rights on the channel still releases (a
// script is not undone by a later error); its waiters then wake by polling.
// SPUBLISH keeps the message in the lock's slot, on a Cluster.
const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.pcall(ARGV[3] == 's' and 'SPUBLISH' or 'PUBLISH', ARGV[2], ARGV[1])
  end
  return 1
end
return 0`;

// KEYS: lock. ARGV: token, ttl ms. Fenced extend: 1, or 0 if the key is
// someone else's, or -1 if it is missing.
const RENEW = `
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if holder == false then return -1 end
return 0`;

// KEYS: lock, fence. ARGV: token, ttl ms, fencing token. Redlock: puts a
// held lease's key back on an instance that lost it (down at the
// acquisition, flushed, evicted), only where it is absent, and raises the
// counter there to the token: the same lease, so nothing is counted.
const RESTORE = `
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if current < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
  return 1
end
return 0`;

// KEYS: fence. ARGV: token value. Raises the counter to at least the value
// (Redlock: a later majority then counts past every earlier holder's token).
const RAISE = `
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1`;

/** The keys and channel of one lock. */
function keysOf(name: string) {
  const base = `lock:{${name}}`;
  return { name, lock: base, fence: `${base}:fence`, channel: `${base}:released` };
}

/** CRC16-CCITT (XModem) of `bytes`, as Redis Cluster hashes keys. */
function crc16(bytes: Uint8Array): number {
  let crc = 0;
  for (const byte of bytes) {
    crc ^= byte << 8;
    for (let bit = 0; bit < 8; bit++) crc = crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1;
    crc &= 0xffff;
  }
  return crc;
}

/**
 * The Cluster slot of `key`: the hash of its first non-empty `{...}` tag,
 * or of the whole key, as Redis and ioredis compute it.
 */
function slotOf(key: string): number {
  const open = key.indexOf("{");
  const close = open < 0 ? -1 : key.indexOf("}", open + 1);
  const tagged = close > open + 1 ? key.slice(open + 1, close) : key;
  return crc16(new TextEncoder().encode(tagged)) % 16384;
}

/** A random token: 128 bits from Web Crypto, as hex. */
function randomToken(): string {
  return toHex(crypto.getRandomValues(new Uint8Array(16)));
}

const shas = new Map<string, string>();

/** The SHA-1 of a script, as EVALSHA wants it; computed once per script. */
async function sha1(script: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-1", new TextEncoder().encode(script));
  const sha = toHex(digest);
  shas.set(script, sha);
  return sha;
}

/** What kind of failure a client's error message reports. */
type Kind = "auth" | "permission" | "connection" | "other";

function kindOf(text: string): Kind {
  // A Sentinel's refusal comes as the last error of ioredis's "All sentinels are unreachable".
  if (
    /^(WRONGPASS|NOAUTH)|^ERR (AUTH|invalid password|.*without any password)|sentinels are unreachable.*Last error: (WRONGPASS|NOAUTH)/i
      .test(text)
  ) {
    return "auth";
  }
  if (/^NOPERM|can't run this command|user executing the script can't/.test(text)) {
    return "permission";
  }
  // Whole words only: a server's CROSSSLOT is no SSL error, and it never
  // heals by waiting.
  if (
    /ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|EHOSTUNREACH|ENETUNREACH|ENOTFOUND|EAI_AGAIN|Connection is closed|Stream isn't writeable|\bconnect|MaxRetriesPerRequest|Reached the max retries|Cluster isn't ready|Cluster is ended|None of startup nodes|Failed to refresh slots|sentinels are unreachable|\bsocket\b|\bTLS\b|\bSSL\b|certificate|max number of clients reached/i
      .test(text)
  ) {
    return "connection";
  }
  return "other";
}

/**
 * Replies that mean "not now": a server loading its data, busy with a
 * script, or a cluster between masters.
 */
const NOT_NOW =
  /^(LOADING|BUSY|TRYAGAIN|CLUSTERDOWN|MASTERDOWN|READONLY)\b|^Too many Cluster redirections/;

/** Whether a failed attempt may succeed later without anything changing on our side. */
function transient(error: unknown): boolean {
  // A replica that did not acknowledge in time may catch up.
  if (error instanceof LockConnectionError || error instanceof LockReplicationError) return true;
  if (error instanceof LockAuthError || error instanceof LockPermissionError) return false;
  const cause = (error as Error)?.cause;
  return NOT_NOW.test(String((cause as Error)?.message ?? ""));
}

/** A typed error of `kind` with `message`. */
function errorOf(kind: Kind, message: string, options: ErrorOptions): LockError {
  if (kind === "auth") return new LockAuthError(message, options);
  if (kind === "permission") return new LockPermissionError(message, options);
  if (kind === "connection") return new LockConnectionError(message, options);
  return new LockError(message, options);
}

/** How a failure of each kind reads, for the instance at `where`. */
const PHRASES: Record<Kind, (where: string) => string> = {
  auth: (where) => `Redis at ${where} rejected the credentials`,
  permission: (where) => `permission denied by Redis at ${where}`,
  connection: (where) => `Redis at ${where} is unreachable`,
  other: (where) => `Redis at ${where} answered`,
};

/** What a client's failure means to a caller. */
function translate(
  error: unknown,
  action: string,
  where: string,
  secrets: readonly string[],
): LockError {
  if (error instanceof LockError) return error;
  const cause = scrub(error, secrets);
  const kind = kindOf(cause.message);
  if (kind === "other" && /^(MOVED|ASK) /.test(cause.message)) {
    // Only a client that is not a Cluster client sees a redirection.
    return new LockError(
      `${action}: Redis at ${where} is a Redis Cluster node that does not serve this key (use mode "cluster"): ${cause.message}`,
      { cause },
    );
  }
  return errorOf(kind, `${action}: ${PHRASES[kind](where)}: ${cause.message}`, { cause });
}

type Listener = () => void;

/** How long a channel stays subscribed after its last waiter left. */
const SUBSCRIPTION_LINGER = 1_000;

/** A deferred: a promise and the function that resolves it. */
interface Pending {
  promise: Promise<void>;
  resolve(): void;
}

/**
 * One subscriber connection's channels, shared by every waiter on one
 * instance. A channel counts as subscribed only once the server confirmed it
 * on the current connection; every reconnect subscribes every wanted channel
 * again and then wakes its waiters, since a release may have gone unheard.
 */
class Subscriptions {
  readonly #make: () => Client;
  /** Sharded pub/sub (SSUBSCRIBE, "smessage"): a Cluster whose servers have it. */
  readonly sharded: boolean;
  #subscriber?: Client;
  readonly #listeners = new Map<string, Set<Listener>>();
  /** Channels nobody listens to any more, unsubscribed after a moment unless wanted again. */
  readonly #idle = new Map<string, ReturnType<typeof setTimeout>>();
  /** Channels the server confirmed on the current connection. */
  readonly #confirmed = new Set<string>();
  /** Channels whose SUBSCRIBE is in flight on the current connection. */
  readonly #sent = new Set<string>();
  /** One confirmation to wait for per channel, however many waiters ask. */
  readonly #pending = new Map<string, Pending>();
  /** Counts connections, so an answer from an old one is not taken for the current one. */
  #generation = 0;

  constructor(make: () => Client, sharded = false) {
    this.#make = make;
    this.sharded = sharded;
  }

  #connection(): Client {
    if (this.#subscriber === undefined) {
      const subscriber = this.#make();
      subscriber.on("error", () => {}); // waiters fall back to polling; commands report errors
      subscriber.on(
        this.sharded ? "smessage" : "message",
        (channel: string) => this.#wake(channel),
      );
      subscriber.on("ready", () => {
        for (const channel of this.#wanted()) this.#send(channel, true);
      });
      subscriber.on("close", () => {
        // The server forgets a connection's subscriptions with it.
        this.#generation++;
        this.#confirmed.clear();
        this.#sent.clear();
        this.#settleAll();
      });
      this.#subscriber = subscriber;
    }
    return this.#subscriber;
  }

  #wanted(): string[] {
    return [...this.#listeners.keys(), ...this.#idle.keys()];
  }

  #wake(channel: string) {
    for (const listener of this.#listeners.get(channel) ?? []) listener();
  }

  /**
   * Sends SUBSCRIBE if the connection is ready and none is in flight; a
   * connection not ready yet subscribes on its "ready". After a reconnect
   * (`again`) the confirmation wakes the channel's waiters to try at once.
   */
  #send(channel: string, again = false) {
    const subscriber = this.#connection();
    if (subscriber.status !== "ready" || this.#sent.has(channel)) return;
    this.#sent.add(channel);
    const generation = this.#generation;
    (this.sharded ? subscriber.ssubscribe(channel) : subscriber.subscribe(channel)).then(
      () => {
        if (generation !== this.#generation) return;
        this.#sent.delete(channel);
        if (!this.#listeners.has(channel) && !this.#idle.has(channel)) return;
        this.#confirmed.add(channel);
        this.#settle(channel);
        if (again) this.#wake(channel);
      },
      () => {
        // Refused (no channel permission, say) or dropped with its
        // connection: the waiters poll; the next reconnect tries again.
        if (generation === this.#generation) this.#sent.delete(channel);
        this.#settle(channel);
      },
    );
  }

  #settle(channel: string) {
    this.#pending.get(channel)?.resolve();
    this.#pending.delete(channel);
  }

  #settleAll() {
    for (const pending of this.#pending.values()) pending.resolve();
    this.#pending.clear();
  }

  /**
   * Calls `listener` on every message on `channel` until `remove()`.
   * `ready` resolves once Redis has confirmed the subscription (or failed
   * to: the waiter then relies on polling).
   */
  add(channel: string, listener: Listener): { remove(): void; ready: Promise<void> } {
    let listeners = this.#listeners.get(channel);
    if (listeners === undefined) {
      listeners = new Set();
      this.#listeners.set(channel, listeners);
      // Still subscribed: under steady contention, no SUBSCRIBE per wait.
      clearTimeout(this.#idle.get(channel));
      this.#idle.delete(channel);
    }
    listeners.add(listener);
    let ready = Promise.resolve();
    if (!this.#confirmed.has(channel)) {
      let pending = this.#pending.get(channel);
      if (pending === undefined) {
        let resolve!: () => void;
        const promise = new Promise<void>((r) => resolve = r);
        pending = { promise, resolve };
        this.#pending.set(channel, pending);
      }
      ready = pending.promise;
      this.#send(channel);
    }
    const remove = () => {
      const set = this.#listeners.get(channel);
      if (set === undefined || !set.delete(listener) || set.size > 0) return;
      this.#listeners.delete(channel);
      this.#idle.set(
        channel,
        setTimeout(() => {
          this.#idle.delete(channel);
          this.#settle(channel);
          const subscribed = this.#confirmed.delete(channel) || this.#sent.has(channel);
          const subscriber = this.#subscriber;
          if (subscribed && subscriber?.status === "ready") {
            const left = this.sharded
              ? subscriber.sunsubscribe(channel)
              : subscriber.unsubscribe(channel);
            left.catch(() => {});
          }
        }, SUBSCRIPTION_LINGER),
      );
    };
    return { remove, ready };
  }

  async close(): Promise<void> {
    this.#listeners.clear();
    for (const timer of this.#idle.values()) clearTimeout(timer);
    this.#idle.clear();
    this.#settleAll();
    const subscriber = this.#subscriber;
    this.#subscriber = undefined;
    if (subscriber) await hangUp(subscriber);
  }
}

/** An ioredis connection to one server (or a Sentinel's primary), or to a Redis Cluster. */
type Client = Redis | Cluster;

/** One Redis (a server, a Sentinel's primary, a Cluster): its client, its subscriber, and how to name it in messages. */
interface Instance {
  readonly name: string;
  readonly client: Client;
  readonly subscriptions: Subscriptions;
}

/** The instances of one connection config: one Redis, or the Redlock set. */
class Instances {
  readonly list: Instance[];
  /**
   * Contenders for a key among all lockers on these clients: one at a time
   * goes to Redis, the rest queue here in order. A release then wakes one
   * waiter per process, not one per locker.
   */
  readonly contenders = new KeyQueue();
  readonly #secrets: string[];
  /** Give-backs waiting for the answer to an acquisition abandoned in flight, with their bounds. */
  readonly #late = new Set<{ done: Promise<void>; until: number }>();

  constructor(list: Instance[], secrets: string[]) {
    this.list = list;
    this.#secrets = secrets;
  }

  /** How many instances must agree. */
  get quorum(): number {
    return Math.floor(this.list.length / 2) + 1;
  }

  error(error: unknown, action: string, where: string, token?: string): LockError {
    return translate(error, action, where, token ? [...this.#secrets, token] : this.#secrets);
  }

  /** A copy of a client's error that holds no secret and no `token`. */
  scrub(error: unknown, token: string): Error {
    return scrub(error, [...this.#secrets, token]);
  }

  /** What a client's error says, without secrets. */
  detail(error: unknown, token: string): string {
    return this.scrub(error, token).message;
  }

  kind(error: unknown): Kind {
    return kindOf(String((error as Error)?.message ?? error));
  }

  /**
   * How many replicas acknowledged the writes made so far on the connection
   * that wrote `key` (Redis `WAIT`), waiting `ms` at most. WAIT counts the
   * writes of its own connection, so on a Cluster it goes to the connection
   * of the master that serves the key's slot, the one the script ran on.
   * WAIT holds that connection's later commands until it returns.
   */
  async replicated(instance: Instance, key: string, replicas: number, ms: number): Promise<number> {
    const client = instance.client;
    let server: Redis | undefined;
    if (client instanceof Cluster) {
      const owner = client.slots[slotOf(key)]?.[0];
      // "all": a replica promoted since the last slot refresh may still be listed as one.
      server = client.nodes("all").find((node) =>
        `${node.options.host}:${node.options.port}` === owner
      );
    } else {
      server = client;
    }
    if (server === undefined) return 0;
    // WAIT 0 would wait forever.
    const timeout = Math.max(1, Math.floor(ms));
    return Number(await server.call("WAIT", replicas, timeout));
  }

  /** Runs a script by SHA, loading it on NOSCRIPT. */
  async run(instance: Instance, script: string, keys: string[], args: (string | number)[]) {
    const sha = shas.get(script) ?? await sha1(script);
    try {
      return await instance.client.evalsha(sha, keys.length, ...keys, ...args);
    } catch (error) {
      if (!String((error as Error)?.message).startsWith("NOSCRIPT")) throw error;
      return await instance.client.eval(script, keys.length, ...keys, ...args);
    }
  }

  /**
   * Runs a script on every instance at once; each call gets its own
   * deadline, since ioredis has none per command. `answers` resolves as soon
   * as `decided` holds for the answers so far, every instance answered, or
   * `bound` ms passed, so a stalled or partitioned instance holds up nobody:
   * one that did not answer in time is `undefined` there. Its call goes on in
   * `calls` (which never reject), for the caller to undo a late effect.
   * `answers` rejects with `signal.reason` if it aborts first. With
   * `where`, only the instances it picks are called; the others answer
   * `failed(undefined)` at once. With `then`, each reply goes through it
   * before `read` (for a WAIT after the script, within the same deadline).
   */
  each<T>(
    script: string,
    keys: string[],
    args: (string | number)[],
    options: {
      read: (reply: unknown) => T;
      failed: (error: unknown) => T;
      bound: number;
      decided: (answers: (T | undefined)[]) => boolean;
      signal?: AbortSignal;
      where?: (i: number) => boolean;
      then?: (instance: Instance, reply: unknown) => Promise<unknown>;
    },
  ): { calls: Promise<T>[]; answers: Promise<(T | undefined)[]> } {
    const { read, failed, bound, decided, signal, where, then } = options;
    const calls = this.list.map((instance, i) =>
      where === undefined || where(i)
        ? this.run(instance, script, keys, args)
          .then((reply) => then === undefined ? reply : then(instance, reply))
          .then(read).catch(failed)
        : Promise.resolve(failed(undefined))
    );
    const answers = new Promise<(T | undefined)[]>((resolve, reject) => {
      const soFar: (T | undefined)[] = calls.map(() => undefined);
      let pending = calls.length;
      let done = false;
      const finish = (settle: () => void) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        settle();
      };
      const onAbort = () => finish(() => reject(signal!.reason));
      const timer = setTimeout(() => finish(() => resolve([...soFar])), Math.max(0, bound));
      if (signal?.aborted) return onAbort();
      signal?.addEventListener("abort", onAbort, { once: true });
      calls.forEach((call, i) =>
        call.then((answer) => {
          if (done) return;
          soFar[i] = answer;
          pending -= 1;
          if (pending === 0 || decided(soFar)) finish(() => resolve([...soFar]));
        })
      );
    });
    return { calls, answers };
  }

  /**
   * Keeps track of `giveBack`, the release of an acquisition given up while
   * its SET was in flight, so that closing waits for it: it needs this
   * connection when the late answer comes. Past `until` (monotonic ms: when
   * the key would expire anyway) nothing is left to give back.
   */
  giveBackLate(giveBack: Promise<unknown>, until: number): void {
    const entry = { done: giveBack.then(() => {}, () => {}), until };
    this.#late.add(entry);
    entry.done.then(() => this.#late.delete(entry));
  }

  /**
   * Waits for the late give-backs, each until its key would expire but at
   * most `CLOSE_GIVE_BACK_BOUND`: a server that stays stalled keeps such a
   * key until its TTL, and close() must end.
   */
  async #settleLate(): Promise<void> {
    const bound = performance.now() + CLOSE_GIVE_BACK_BOUND;
    await Promise.all([...this.#late].map(async ({ done, until }) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const ms = Math.min(until, bound) - performance.now();
      await Promise.race([done, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
      clearTimeout(timer);
    }));
  }

  async close(): Promise<void> {
    await this.#settleLate();
    await Promise.all(this.list.map((instance) => instance.subscriptions.close()));
  }
}

/** An instance that did not answer a call within its deadline. */
class Silence extends Error {
  constructor(readonly bound: number) {
    super(`no answer within ${Math.round(bound)} ms`);
  }

  /** The caller's error: a connection failure, said as such. */
  fail(action: string, where: string): LockConnectionError {
    return new LockConnectionError(
      `${action}: Redis at ${where} did not answer within ${Math.round(this.bound)} ms`,
    );
  }
}

/** How long closing waits at most for Redis to answer an acquisition abandoned in flight. */
const CLOSE_GIVE_BACK_BOUND = 5_000;

/** What one instance answered to an acquisition attempt. */
type Answer =
  | { kind: "acquired"; fence: number }
  | { kind: "unreplicated"; fence: number; acked: number; waited: number }
  | { kind: "held"; pttl: number }
  | { kind: "failed"; error: unknown };

/** Whether an answer took the key on its instance (replicated or not): it must be given back unless held. */
function took(answer: Answer | undefined): boolean {
  return answer?.kind === "acquired" || answer?.kind === "unreplicated";
}

/**
 * How long a WAIT may take so that its answer still arrives before
 * `deadline` (monotonic ms): three quarters of the time left, the rest for
 * the reply and for commands queued behind it on the connection.
 */
function waitWithin(deadline: number): number {
  return (deadline - performance.now()) * 0.75;
}

/** The clock drift allowed for, as Redlock does: 1% of the TTL plus 2 ms. */
function drift(ttl: number): number {
  return Math.floor(ttl * 0.01) + 2;
}

/** The Redis driver: acquisitions, renewals and releases on one or several instances. */
class RedisDriver implements Driver {
  readonly #instances: Instances;
  readonly #settings: LeaseSettings;
  readonly #onClose: () => Promise<void>;

  constructor(
    instances: Instances,
    settings: LeaseSettings,
    onClose: () => Promise<void>,
  ) {
    this.#instances = instances;
    this.#settings = settings;
    this.#onClose = onClose;
  }

  async acquire(name: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined> {
    const contenders = this.#instances.contenders;
    if (wait) await contenders.enter(name, signal);
    else if (!contenders.tryEnter(name)) return undefined;
    try {
      return await this.#contend(name, wait, signal);
    } finally {
      contenders.leave(name);
    }
  }

  async #contend(name: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined> {
    const keys = keysOf(name);
    const action = `Cannot acquire lock ${JSON.stringify(name)}`;
    const token = randomToken();
    let woken: Listener = () => {};
    const wake = () => woken();
    const unsubscribe: (() => void)[] = [];
    try {
      for (;;) {
        const woke = new Promise<void>((resolve) => woken = resolve);
        let attempt: { grant?: Grant; pttl: number };
        try {
          attempt = await this.#attempt(keys, token, signal, action);
        } catch (error) {
          // A waiter outlives a transient loss of connection (a restart, a
          // failover): only its own signal, or what no retry cures (auth,
          // permission), ends it. The first connect already proved the server.
          if (!wait || signal.aborted || !transient(error)) throw error;
          await this.#sleep(this.#settings.retryInterval, woke, signal);
          continue;
        }
        if (attempt.grant) return attempt.grant;
        if (!wait) return undefined;
        if (unsubscribe.length === 0) {
          // Held: subscribe, then try once more before waiting, so a release
          // between the failed attempt and the subscription still counts.
          // The uncontended path pays no SUBSCRIBE round trip.
          await this.#subscribe(keys.channel, wake, unsubscribe, signal);
          continue;
        }
        // Wait for a release, or poll: never past the holder's expiry.
        const poll = Math.max(1, Math.min(this.#settings.retryInterval, attempt.pttl + 1));
        await this.#sleep(poll, woke, signal);
      }
    } finally {
      for (const remove of unsubscribe) remove();
    }
  }

  /**
   * Subscribes to `channel` on every instance. An instance slow to confirm
   * (down, say) holds this up for one poll interval at most: the poll covers
   * a message missed meanwhile.
   */
  async #subscribe(
    channel: string,
    wake: Listener,
    unsubscribe: (() => void)[],
    signal: AbortSignal,
  ): Promise<void> {
    const ready = this.#instances.list.map((instance) => {
      const subscription = instance.subscriptions.add(channel, wake);
      unsubscribe.push(subscription.remove);
      return subscription.ready;
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const bound = new Promise((resolve) =>
      timer = setTimeout(resolve, this.#settings.retryInterval)
    );
    try {
      await abortable(Promise.race([Promise.all(ready), bound]), signal);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Resolves after `ms`, or when woken; rejects with the signal's reason. */
  async #sleep(ms: number, woke: Promise<void>, signal: AbortSignal): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const elapsed = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
    try {
      await abortable(Promise.race([elapsed, woke]), signal);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * One attempt on every instance at once. Acquired on a quorum within the
   * validity time: a grant. Otherwise whatever was acquired is given back,
   * and the shortest remaining PTTL tells how long to wait at most. A quorum
   * of answers decides: an instance that has not answered by then (stalled,
   * partitioned) holds nobody up, and what its SET does when it runs late is
   * given back unless it joined a lease that is still held.
   */
  async #attempt(
    keys: ReturnType<typeof keysOf>,
    token: string,
    signal: AbortSignal,
    action: string,
  ): Promise<{ grant?: Grant; pttl: number }> {
    const { ttl, waitReplicas } = this.#settings;
    const instances = this.#instances;
    const { list, quorum } = instances;
    const sentAt = performance.now();
    // Past the validity time no answer can make a grant: each call's deadline.
    const bound = ttl - drift(ttl);
    const { calls, answers } = instances.each<Answer>(
      ACQUIRE,
      [keys.lock, keys.fence],
      [token, ttl],
      {
        // A grant counts once `waitReplicas` replicas have it, or a failover
        // could hand the lock out again with a fencing token gone back.
        then: async (instance, reply) => {
          const [ok, value] = reply as [number, number];
          if (ok !== 1 || waitReplicas === 0) return reply;
          const waited = waitWithin(sentAt + bound);
          const acked = await instances.replicated(instance, keys.lock, waitReplicas, waited)
            .catch(() => 0);
          return [ok, value, acked, waited];
        },
        read: (reply) => {
          const [ok, value, acked, waited] = reply as [number, number, number?, number?];
          if (ok !== 1) return { kind: "held", pttl: value };
          if (acked !== undefined && acked < waitReplicas) {
            return { kind: "unreplicated", fence: value, acked, waited: waited! };
          }
          return { kind: "acquired", fence: value };
        },
        failed: (error) => ({ kind: "failed", error }),
        bound,
        // A grant, or a lock held elsewhere, needs no more answers. An
        // outcome that will be an error waits for them all (within the
        // bound), so the error says what each instance answered.
        decided: (so) => {
          const acquired = so.filter((a) => a?.kind === "acquired").length;
          const not = so.filter((a) => a !== undefined && a.kind !== "acquired").length;
          const failed = so.filter((a) => a?.kind === "failed").length;
          return acquired >= quorum ||
            (list.length - not < quorum && list.length - failed >= quorum);
        },
        signal,
      },
    );
    let answered: (Answer | undefined)[];
    try {
      answered = await answers;
    } catch (reason) {
      // Given up while a SET was in flight (a stalled server, say): when the
      // answer comes, give back whatever it acquired. No ghost lock.
      // It may have been a whole acquisition that waiters saw: wake them.
      this.#giveBackLate(calls, undefined, keys, token, () => true, true);
      throw reason;
    }
    const results = answered.map((a): Answer => a ?? { kind: "failed", error: new Silence(bound) });
    const acquired = results.filter((a) => a.kind === "acquired");
    const validity = ttl - (performance.now() - sentAt) - drift(ttl);
    if (acquired.length >= quorum && validity > 0) {
      let fence = Math.max(...acquired.map((a) => a.fence));
      if (list.length > 1) {
        try {
          fence = await this.#raise(results, keys, fence, sentAt + bound, action);
        } catch (error) {
          await this.#releaseWhere(results, keys, token, bound, true);
          this.#giveBackLate(calls, answered, keys, token, () => true);
          throw error;
        }
      }
      const held = this.#hold(keys, token, BigInt(fence), sentAt);
      // A late SET that took the key joined this lease: renewals extend it and
      // the release, sent after it on the same connection, deletes it. Once
      // the lease has ended, nothing will: give it back.
      this.#giveBackLate(calls, answered, keys, token, held.ended);
      return { grant: held.grant, pttl: 0 };
    }
    // Taken on a quorum, too late to hold or not replicated: waiters saw it
    // held, so wake them.
    await this.#releaseWhere(results, keys, token, bound, results.filter(took).length >= quorum);
    this.#giveBackLate(calls, answered, keys, token, () => true);
    const failed = results.filter((a): a is Extract<Answer, { kind: "failed" }> =>
      a.kind === "failed"
    );
    const fatal = failed.find((f) => ["auth", "permission"].includes(instances.kind(f.error)));
    if (fatal) throw this.#describe(fatal.error, results, action, token);
    const unreplicated = results.filter((a): a is Extract<Answer, { kind: "unreplicated" }> =>
      a.kind === "unreplicated"
    );
    if (unreplicated.length > 0 && acquired.length + unreplicated.length >= quorum) {
      // Granted, but not safe across a failover: given back above, and said so.
      const fewest = unreplicated.reduce((a, b) => b.acked < a.acked ? b : a);
      const where = list[results.indexOf(fewest)].name;
      throw new LockReplicationError(
        `${action}: ${fewest.acked} of ${waitReplicas} replicas acknowledged the grant on Redis at ${where} within ${
          Math.max(0, Math.round(fewest.waited))
        } ms, so it was given back`,
        { acknowledged: fewest.acked, required: waitReplicas },
      );
    }
    if (list.length - failed.length < quorum) {
      throw this.#describe(undefined, results, action, token);
    }
    const waits = results.filter((a) => a.kind === "held").map((a) => a.pttl).filter((p) => p > 0);
    return { pttl: waits.length > 0 ? Math.min(...waits) : this.#settings.retryInterval };
  }

  /**
   * Gives back, when it comes, each acquisition in `calls` that had not
   * answered in `answered` (all of them without it), if `unwanted()` says so
   * by then; `wake` as for `#giveBack`.
   */
  #giveBackLate(
    calls: Promise<Answer>[],
    answered: (Answer | undefined)[] | undefined,
    keys: ReturnType<typeof keysOf>,
    token: string,
    unwanted: () => boolean,
    wake = false,
  ): void {
    calls.forEach((call, i) => {
      if (answered?.[i] !== undefined) return;
      // close() waits for it (bounded): the give-back needs the connection.
      this.#instances.giveBackLate(
        call.then((answer) =>
          took(answer) && unwanted() ? this.#giveBack(i, keys, token, wake) : undefined
        ),
        performance.now() + this.#settings.ttl,
      );
    });
  }

  /**
   * Gives back an acquisition on instance `i` (fenced: only if the key is
   * still `token`'s). With `wake`, waiters are told; a partial acquisition
   * given back must not wake them, or each wakes the others and itself,
   * takes the key there again, and they spin.
   */
  #giveBack(
    i: number,
    keys: ReturnType<typeof keysOf>,
    token: string,
    wake = false,
  ): Promise<void> {
    const instance = this.#instances.list[i];
    const channel = wake ? keys.channel : "";
    const sharded = instance.subscriptions.sharded ? "s" : "";
    return this.#instances.run(instance, RELEASE, [keys.lock], [token, channel, sharded]).then(
      () => {},
      () => {},
    );
  }

  /** An error that says what each instance answered. */
  #describe(
    fatal: unknown,
    results: Answer[],
    action: string,
    token: string,
  ): LockError {
    const list = this.#instances.list;
    const parts = results.map((answer, i) => {
      const where = list[i].name;
      if (answer.kind === "acquired") return `${where} granted it`;
      if (answer.kind === "unreplicated") {
        return `${where} granted it, but only ${answer.acked} replicas acknowledged`;
      }
      if (answer.kind === "held") return `${where} has it held by another holder`;
      return `${where}: ${this.#instances.detail(answer.error, token)}`;
    });
    const reached = results.filter((a) => a.kind !== "failed").length;
    if (list.length === 1) {
      const only = results[0];
      if (only.kind === "failed") {
        if (only.error instanceof Silence) return only.error.fail(action, list[0].name);
        return this.#instances.error(only.error, action, list[0].name, token);
      }
    }
    const summary =
      `${action}: ${reached} of ${list.length} Redis instances answered (${this.#instances.quorum} needed): ${
        parts.join("; ")
      }`;
    if (fatal === undefined) return new LockConnectionError(summary);
    const instances = this.#instances;
    return errorOf(instances.kind(fatal), summary, { cause: instances.scrub(fatal, token) });
  }

  /**
   * Redlock: raises the fencing counter on the acquired instances to the
   * token, so a later majority, which shares one of them, counts past it.
   * A quorum of them by `deadline` is enough.
   */
  async #raise(
    results: Answer[],
    keys: ReturnType<typeof keysOf>,
    fence: number,
    deadline: number,
    action: string,
  ): Promise<number> {
    const instances = this.#instances;
    const { answers } = instances.each<boolean>(RAISE, [keys.fence], [fence], {
      where: (i) => results[i].kind === "acquired",
      read: () => true,
      failed: () => false,
      bound: deadline - performance.now(),
      decided: (so) => so.filter(Boolean).length >= instances.quorum,
    });
    if ((await answers).filter(Boolean).length < instances.quorum) {
      throw new LockConnectionError(`${action}: could not record the fencing token on a quorum`);
    }
    return fence;
  }

  /** Gives back every acquisition in `results`, waiting `bound` ms at most; `wake` as for `#giveBack`. */
  async #releaseWhere(
    results: Answer[],
    keys: ReturnType<typeof keysOf>,
    token: string,
    bound: number,
    wake = false,
  ): Promise<void> {
    const given = Promise.all(
      results.map((answer, i) => took(answer) ? this.#giveBack(i, keys, token, wake) : undefined),
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      // A give-back not answered in time still runs; the key expires anyway.
      await Promise.race([given, new Promise((resolve) => timer = setTimeout(resolve, bound))]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * The held lock. Loss is decided locally (see `LeaseClock`): the deadline
   * is the send time of the last acquisition or renewal that a quorum
   * confirmed, plus the TTL, less the drift allowance. A renewal that Redis
   * refuses (the key is gone or someone else's) loses the lock at once. A
   * quorum of answers decides each renewal and the release; no call waits
   * past the lease's deadline. `ended` says whether it was released or lost.
   */
  #hold(
    keys: ReturnType<typeof keysOf>,
    token: string,
    fence: bigint,
    sentAt: number,
  ): { grant: Grant; ended: () => boolean } {
    const { ttl, autoRenew, waitReplicas } = this.#settings;
    const instances = this.#instances;
    const { list, quorum } = instances;
    const name = keys.name;
    const controller = new AbortController();
    let released = false;
    const renew = async (): Promise<Renewal> => {
      const sent = performance.now();
      type Reply = "renewed" | "refused" | "missing" | "failed";
      const count = (replies: (Reply | undefined)[], ...which: Reply[]) =>
        replies.filter((r) => r !== undefined && which.includes(r)).length;
      const { calls, answers } = instances.each<Reply>(RENEW, [keys.lock], [token, ttl], {
        // A renewal that the replicas do not have would not survive a
        // failover: not confirmed, and the deadline decides.
        then: async (instance, reply) => {
          if (reply !== 1 || waitReplicas === 0) return reply;
          const acked = await instances.replicated(
            instance,
            keys.lock,
            waitReplicas,
            waitWithin(clock.deadline),
          );
          return acked >= waitReplicas ? reply : "unacknowledged";
        },
        read: (reply) =>
          reply === 1 ? "renewed" : reply === -1 ? "missing" : reply === 0 ? "refused" : "failed",
        failed: () => "failed",
        // Past the lease's deadline no answer can save it.
        bound: clock.deadline - sent,
        decided: (so) =>
          count(so, "renewed") >= quorum ||
          list.length - count(so, "refused", "missing") < quorum,
      });
      const replies = await answers;
      if (list.length - count(replies, "refused", "missing") < quorum) {
        return { lost: "its key was deleted or taken over" };
      }
      if (count(replies, "renewed") < quorum) return { ok: false };
      // Held on a quorum: put the key back on the minority that lost it, or
      // every waiter's attempt would take it there and give it back. Such an
      // instance may answer after the quorum did: wait for each answer.
      calls.forEach((call, i) =>
        void call.then((reply) => {
          if (reply !== "missing" || released || controller.signal.aborted) return;
          return instances.run(list[i], RESTORE, [keys.lock, keys.fence], [
            token,
            ttl,
            String(fence),
          ]).catch(() => {}); // the next renewal tries again
        })
      );
      return { ok: true, deadline: sent + ttl - drift(ttl) };
    };
    const clock = new LeaseClock({
      deadline: sentAt + ttl - drift(ttl),
      period: ttl / 3,
      // After a failure try again soon; the deadline is what decides loss.
      retry: Math.min(ttl / 6, 500),
      renew: autoRenew ? renew : undefined,
      lapse: (detail) => controller.abort(new LockLostError(name, detail)),
      expired: `its ${ttl} ms lease ran out before a renewal was confirmed`,
    });
    const release = async () => {
      released = true;
      clock.stop();
      type Reply = "deleted" | "not ours" | { error: unknown };
      const count = (replies: (Reply | undefined)[], which: (r: Reply) => boolean) =>
        replies.filter((r) => r !== undefined && which(r)).length;
      const notOurs = (r: Reply) => r === "not ours";
      const failed = (r: Reply) => typeof r === "object";
      // Past the lease's deadline (and the drift allowed) the key has expired anyway.
      const bound = clock.deadline - performance.now() + drift(ttl);
      const sharded = list.every((instance) => instance.subscriptions.sharded) ? "s" : "";
      const args = [token, keys.channel, sharded];
      const { answers } = instances.each<Reply>(RELEASE, [keys.lock], args, {
        read: (reply) => reply === 1 ? "deleted" : "not ours",
        failed: (error) => ({ error }),
        bound,
        decided: (so) =>
          count(so, (r) => r === "deleted") >= quorum ||
          list.length - count(so, notOurs) < quorum ||
          list.length - count(so, failed) < quorum,
      });
      const replies = (await answers).map((r): Reply => r ?? { error: new Silence(bound) });
      if (list.length - count(replies, notOurs) < quorum) {
        // The key was deleted, evicted or overwritten while this holder
        // believed it held the lock: the work did not run under it.
        controller.abort(new LockLostError(name, "it was taken away before the release"));
        return;
      }
      if (list.length - count(replies, failed) < quorum) {
        const i = replies.findIndex(failed);
        const { error } = replies[i] as { error: unknown };
        const action = `Cannot release lock ${JSON.stringify(name)}`;
        throw error instanceof Silence
          ? error.fail(action, list[i].name)
          : instances.error(error, action, list[i].name, token);
      }
    };
    return {
      grant: { token: fence, signal: controller.signal, check: () => void clock.check(), release },
      ended: () => released || controller.signal.aborted,
    };
  }

  status(name: string): Promise<LockStatus> {
    return readStatus(this.#instances, name);
  }

  async close(): Promise<void> {
    await this.#onClose();
  }
}

// KEYS: lock, fence. The lock's remaining PTTL (-2: none) and the fencing counter.
const STATUS = `return {redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]) or '0'}`;

/**
 * Who holds the lock `name`: held where a quorum has its key; the token is
 * the fencing counter (the holder's, since each grant increments it), the
 * time left the shortest PTTL among the instances that hold it.
 */
async function readStatus(instances: Instances, name: string): Promise<LockStatus> {
  const keys = keysOf(name);
  const action = `Cannot read the status of lock ${JSON.stringify(name)}`;
  const answers = await Promise.all(instances.list.map(async (instance) => {
    try {
      const [pttl, fence] = await instance.client.eval(STATUS, 2, keys.lock, keys.fence) as [
        number,
        string,
      ];
      return { pttl, fence: BigInt(fence) };
    } catch (error) {
      return { error: instances.error(error, action, instance.name) };
    }
  }));
  const reached = answers.filter((a) => !("error" in a)) as { pttl: number; fence: bigint }[];
  if (reached.length < instances.quorum) {
    throw (answers.find((a) => "error" in a) as { error: LockError }).error;
  }
  const holding = reached.filter((a) => a.pttl !== -2);
  if (holding.length < instances.quorum) return { key: name };
  const ttls = holding.map((a) => a.pttl).filter((p) => p >= 0);
  return {
    key: name,
    holder: {
      token: holding.reduce((max, a) => a.fence > max ? a.fence : max, 0n),
      ttl: ttls.length > 0 ? Math.min(...ttls) : undefined,
    },
  };
}

/** The secrets of `config`, scrubbed from every error. */
function secretsOf(config: ConnectionConfig): string[] {
  return [config.password, config.sentinelPassword ?? ""].filter((secret) => secret !== "");
}

/** host and port of an endpoint. */
function hostPort(endpoint: string): { host: string; port: number } {
  const match = /^(?:rediss?:\/\/)?(.+):(\d+)\/?$/.exec(endpoint);
  return { host: match![1].replace(/^\[|\]$/g, ""), port: Number(match![2]) };
}

/**
 * ioredis options that never queue or re-send a command: an acquisition that
 * timed out during an outage must not run later and leave a ghost lock.
 */
function clientOptions(
  config: ConnectionConfig,
  endpoint: string,
  connected: () => boolean,
): RedisOptions {
  const { host, port } = hostPort(endpoint);
  const options: RedisOptions = {
    host,
    port,
    lazyConnect: true,
    connectTimeout: config.dialTimeout,
    enableOfflineQueue: false,
    autoResendUnfulfilledCommands: false,
    disconnectTimeout: DISCONNECT_TIMEOUT,
    maxRetriesPerRequest: 0,
    // No retries before the first connection (a wrong password or a dead
    // endpoint fails at once, no retry storm), backoff to 2 s after it.
    retryStrategy: (times) => connected() ? Math.min(50 * 2 ** times, 2_000) : null,
  };
  if (config.username !== "") options.username = config.username;
  if (config.password !== "") options.password = config.password;
  if (config.tls !== false) {
    options.tls = {
      ca: config.tls.ca,
      cert: config.tls.cert,
      key: config.tls.key,
      servername: config.tls.serverName,
    };
  }
  return options;
}

/** Connects one instance and proves the credentials, within `dialTimeout`. */
function connectOne(config: ConnectionConfig, endpoint: string): Promise<Redis> {
  return dial(
    config,
    endpoint,
    (connected) => new Redis(clientOptions(config, endpoint, connected)),
    (client) => [client],
    endpoint,
  );
}

/**
 * Connects `make`'s client and proves the credentials on every server it
 * reaches (`servers`), within `dialTimeout`. With `probe`, a server that hung
 * up at once is asked why.
 */
async function dial<C extends Client>(
  config: ConnectionConfig,
  where: string,
  make: (connected: () => boolean) => C,
  servers: (client: C) => Redis[],
  probe?: string,
): Promise<C> {
  let connected = false;
  const client = make(() => connected);
  const errors: unknown[] = [];
  client.on("error", (error) => errors.push(error));
  const action = `Cannot connect to Redis at ${where}`;
  const started = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(new LockConnectionError(`${action}: no answer within ${config.dialTimeout} ms`)),
        config.dialTimeout,
      );
    });
    await Promise.race([
      (async () => {
        await client.connect().catch((error) => {
          // ioredis reports a refused AUTH as an error event, then a closed connection.
          throw errors.find((e) => /WRONGPASS|NOAUTH|NOPERM/.test(String((e as Error)?.message))) ??
            error;
        });
        if (config.password !== "") {
          // Redis lets a connection go on as "default" after a failed AUTH, and
          // ioredis only warns when the server wants no password: ask again
          // and treat any refusal as fatal.
          const args = config.username !== ""
            ? [config.username, config.password]
            : [config.password];
          await Promise.all(servers(client).map((server) => server.call("AUTH", ...args)));
        }
      })(),
      timeout,
    ]);
    connected = true;
    return client;
  } catch (error) {
    await hangUp(client);
    const left = config.dialTimeout - (performance.now() - started);
    const hungUp = /Connection is closed|EPIPE|ECONNRESET/.test(String((error as Error)?.message));
    // Redis writes its reason as soon as it accepts: a second is plenty to read it.
    const probeFor = Math.min(left, 1_000);
    const reason = probe !== undefined && hungUp && left > 0
      ? await hangUpReason(config, probe, probeFor)
      : undefined;
    throw translate(reason ?? error, action, where, secretsOf(config));
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A Redis Cluster client with the single server's policy: nothing queued
 * while the cluster is not ready, nothing re-sent after its connection
 * closed (it may have run). Redirections (MOVED, ASK) and replies that say
 * the command did not run (TRYAGAIN, CLUSTERDOWN) are retried by ioredis;
 * each call's own deadline still bounds them.
 */
function clusterClient(config: ConnectionConfig, connected: () => boolean): Cluster {
  const {
    host: _host,
    port: _port,
    retryStrategy: _retry,
    lazyConnect: _lazy,
    enableOfflineQueue: _queue,
    ...redisOptions
  } = clientOptions(config, "127.0.0.1:0", connected);
  const options: ClusterOptions = {
    lazyConnect: true,
    enableOfflineQueue: false,
    // 0: a command whose connection closed is failed, not sent again.
    retryDelayOnFailover: 0,
    retryDelayOnClusterDown: 100,
    retryDelayOnTryAgain: 100,
    slotsRefreshTimeout: Math.min(config.dialTimeout, 2_000),
    clusterRetryStrategy: (times) => connected() ? Math.min(50 * 2 ** times, 2_000) : null,
    // The cluster decides reconnections (clusterRetryStrategy); a node never retries alone.
    redisOptions,
  };
  return new Cluster(config.endpoints.map(hostPort), options);
}

/**
 * A client of the primary that the Sentinels at `config.endpoints` name for
 * `config.masterName`. A primary demoted to a replica answers writes with
 * READONLY: the client then reconnects and asks the Sentinels again.
 */
function sentinelClient(config: ConnectionConfig, connected: () => boolean): Redis {
  const { host: _host, port: _port, ...options } = clientOptions(config, "127.0.0.1:0", connected);
  return new Redis({
    ...options,
    sentinels: config.endpoints.map(hostPort),
    name: config.masterName,
    ...(config.sentinelUsername ? { sentinelUsername: config.sentinelUsername } : {}),
    ...(config.sentinelPassword ? { sentinelPassword: config.sentinelPassword } : {}),
    role: "master",
    enableTLSForSentinelMode: config.tls !== false,
    sentinelRetryStrategy: (times) => connected() ? Math.min(50 * 2 ** times, 2_000) : null,
    // 1: reconnect, and send nothing again.
    reconnectOnError: (error) => /^READONLY/.test(error.message) ? 1 : false,
  });
}

/**
 * What a server that hung up at once said first, if anything: Redis writes
 * its reason ("max number of clients reached", protected mode) and closes
 * without reading, and ioredis, which writes its handshake on connect, loses
 * that reply to the EPIPE. A connection that writes nothing (no HELLO, AUTH,
 * client info or ready check) reads it; ioredis reports a reply that answers
 * no command as an error ending in `Last error: <reply>`.
 */
async function hangUpReason(
  config: ConnectionConfig,
  endpoint: string,
  ms: number,
): Promise<Error | undefined> {
  const { tls, host, port } = clientOptions(config, endpoint, () => false);
  const probe = new Redis({
    host,
    port,
    tls,
    lazyConnect: true,
    connectTimeout: ms,
    protocol: 2,
    enableReadyCheck: false,
    disableClientInfo: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  let reason: Error | undefined;
  probe.on("error", (error: Error) => {
    const said = /Last error: (.+)$/.exec(error.message)?.[1];
    if (said !== undefined) reason ??= new Error(said);
  });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const ended = new Promise((resolve) => probe.once("end", resolve));
  probe.connect().catch(() => {});
  await Promise.race([ended, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
  clearTimeout(timer);
  await hangUp(probe);
  return reason;
}

/** Connects as `config.mode` says: one Redis, a Cluster, a Sentinel's primary, or the Redlock set. */
async function connect(config: ConnectionConfig): Promise<Instances> {
  if (config.mode === "cluster") {
    const where = `${config.endpoints.join(", ")} (cluster)`;
    const cluster = await dial(
      config,
      where,
      (connected) => clusterClient(config, connected),
      (client) => client.nodes("master"),
    );
    // Sharded pub/sub where every master has it (Redis 7): a release then
    // reaches its waiters through the lock's own slot, not every node.
    const sharded = await hasShardedPubSub(cluster, config.dialTimeout);
    const subscriber = sharded
      ? { ...CLUSTER_SUBSCRIBER, shardedSubscribers: true }
      : CLUSTER_SUBSCRIBER;
    return new Instances([{
      name: where,
      client: cluster,
      subscriptions: new Subscriptions(() => cluster.duplicate([], subscriber), sharded),
    }], secretsOf(config));
  }
  if (config.mode === "sentinel") {
    const where = `master ${JSON.stringify(config.masterName)} via Sentinels ${
      config.endpoints.join(", ")
    }`;
    const primary = await dial(
      config,
      where,
      (connected) => sentinelClient(config, connected),
      (client) => [client],
    );
    return new Instances([{
      name: where,
      client: primary,
      subscriptions: new Subscriptions(() => primary.duplicate(SUBSCRIBER)),
    }], secretsOf(config));
  }
  const settled = await Promise.allSettled(config.endpoints.map((e) => connectOne(config, e)));
  const clients = settled.map((s) => s.status === "fulfilled" ? s.value : undefined);
  const failures = settled.filter((s): s is PromiseRejectedResult => s.status === "rejected");
  const quorum = Math.floor(config.endpoints.length / 2) + 1;
  const fatal = failures.find((f) =>
    f.reason instanceof LockAuthError || f.reason instanceof LockPermissionError
  );
  if (fatal || clients.filter(Boolean).length < quorum) {
    await Promise.all(clients.map((client) => client && hangUp(client)));
    if (fatal) throw fatal.reason;
    if (config.endpoints.length === 1) throw failures[0].reason;
    throw new LockConnectionError(
      `Cannot connect to a quorum of Redis instances (${quorum} of ${config.endpoints.length}): ${
        failures.map((f) => (f.reason as Error).message).join("; ")
      }`,
    );
  }
  // An instance that is down now joins when it comes back: its client
  // reconnects on its own, and until then its answers count as failures.
  const list = config.endpoints.map((endpoint, i): Instance => {
    const client = clients[i] ?? standby(config, endpoint);
    return {
      name: endpoint,
      client,
      subscriptions: new Subscriptions(() => client.duplicate(SUBSCRIBER)),
    };
  });
  return new Instances(list, secretsOf(config));
}

/** A client for an instance that was down at connect time: it keeps trying in the background. */
function standby(config: ConnectionConfig, endpoint: string): Redis {
  const client = new Redis({ ...clientOptions(config, endpoint, () => true), lazyConnect: false });
  client.on("error", () => {});
  return client;
}

/**
 * Closes a connection and waits until it is closed. ioredis arms a timer
 * when it ends a socket and clears it on the socket's close: waiting for the
 * end leaves no timer behind, and not disconnecting an ended client avoids
 * arming one that no close will clear.
 */
async function hangUp(client: Client): Promise<void> {
  if (client.status === "end") return;
  // Without a live socket, no close event will clear that timer: let it run out.
  const live = client.status === "ready" || client.status === "connect";
  const ended = new Promise((resolve) => client.once("end", resolve));
  client.disconnect();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const bound = live ? 1_000 : DISCONNECT_TIMEOUT + 10;
  await Promise.race([
    live ? ended : new Promise(() => {}),
    new Promise((resolve) => timer = setTimeout(resolve, bound)),
  ]);
  clearTimeout(timer);
}

/** How long ioredis waits for a socket it ended to close before destroying it. */
const DISCONNECT_TIMEOUT = 50;

/**
 * Options of a subscriber connection, whatever the client it is made from
 * says: no offline queue (SUBSCRIBE goes out only on a ready connection, so
 * nothing piles up while Redis is away), no resubscription or re-sending by
 * ioredis (`Subscriptions` does it, from what the server confirmed), an
 * in-flight SUBSCRIBE rejected when its connection drops, and reconnection
 * for as long as the subscriber lives.
 */
const SUBSCRIBER: RedisOptions = {
  lazyConnect: false,
  enableOfflineQueue: false,
  autoResubscribe: false,
  autoResendUnfulfilledCommands: false,
  maxRetriesPerRequest: 0,
  retryStrategy: (times) => Math.min(50 * 2 ** times, 2_000),
  // hangUp() counts on it.
  disconnectTimeout: DISCONNECT_TIMEOUT,
};

/** Whether every master of `cluster` knows SPUBLISH (Redis 7 and later). */
async function hasShardedPubSub(cluster: Cluster, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const masters = cluster.nodes("master");
  if (masters.length === 0) return false;
  try {
    const answers = Promise.all(
      masters.map((node) => node.call("COMMAND", "INFO", "SPUBLISH")),
    );
    // A node that does not answer in time, or a user without COMMAND: plain pub/sub.
    const late = new Promise<undefined>((resolve) =>
      timer = setTimeout(() => resolve(undefined), ms)
    );
    const infos = await Promise.race([answers, late]);
    return infos?.every((info) => Array.isArray(info) && info[0] !== null) ?? false;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Options of a Cluster's subscriber: as `SUBSCRIBER`, reconnecting for as
 * long as it lives. ioredis picks the node and subscribes again after a node
 * change; a reconnect of the whole cluster is seen by `Subscriptions`.
 */
const CLUSTER_SUBSCRIBER: ClusterOptions = {
  lazyConnect: false,
  enableOfflineQueue: false,
  clusterRetryStrategy: (times) => Math.min(50 * 2 ** times, 2_000),
};

async function disconnect(instances: Instances): Promise<void> {
  await instances.close();
  await Promise.all(instances.list.map(async (instance) => {
    // QUIT lets the server finish what was sent; a server that does not
    // answer within 500 ms is cut off.
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        instance.client.quit(),
        new Promise((resolve) => timer = setTimeout(resolve, 500)),
      ]);
    } catch {
      // Already gone.
    } finally {
      clearTimeout(timer);
      await hangUp(instance.client);
    }
  }));
}

const clients = new Connector<Instances>({ create: connect, close: disconnect });

/**
 * The driver behind `New({ backend: "redis" })`: clients shared by every
 * locker with the same connection config.
 *
 * @ignore
 */
export async function openSharedDriver(options: ResolvedOptions, owner: object): Promise<Driver> {
  const ref: ClientRef<Instances> = await clients.acquire(options, owner);
  return new RedisDriver(ref.client, options, ref.release);
}

/**
 * A subscriber connection for a client the caller owns, with options of its
 * own: a `Redis` made with `enableOfflineQueue: false` (as the README advises) would
 * otherwise pass that on, and its SUBSCRIBE would be refused while it
 * connects. A `Cluster` keeps its own subscriber handling, and plain pub/sub:
 * whether its servers have sharded pub/sub is not known before it connects.
 */
function subscriberOf(client: Redis): Redis {
  if ((client as { isCluster?: boolean }).isCluster === true) return client.duplicate();
  return client.duplicate(SUBSCRIBER);
}

/**
 * Creates a Redis locker on a client you already own (the Go design's
 * per-backend API): an ioredis `Redis` or `Cluster`, or several independent
 * `Redis` clients for Redlock. The locker never closes your clients; it
 * opens one subscriber connection per client (with `duplicate()`) and closes
 * that.
 *
 * @param client An ioredis client, or an array of them for Redlock.
 * @param options The lease settings.
 * @returns A locker.
 * @throws {TypeError} Something that is not an ioredis client, or a bad option.
 * @throws {RangeError} An option out of range.
 *
 * @example Share your client
 * ```ts ignore
 * import { Redis } from "npm:ioredis@^6.0.0";
 * import { createRedisLocker } from "@genesis/lock/redis";
 *
 * const redis = new Redis();
 * const locker = createRedisLocker(redis);
 * const lease = await locker.tryLock("/jobs/a");
 * await lease?.release();
 * await locker.close();
 * redis.disconnect();
 * ```
 */
export function createRedisLocker(
  client: RedisClient | RedisClient[],
  options?: RedisLockerOptions,
): Locker {
  const list = Array.isArray(client) ? client : [client];
  if (list.length === 0) {
    throw new TypeError(
      `Invalid argument "client": expected an ioredis client, received an empty array`,
    );
  }
  for (const c of list) {
    const candidate = c as Partial<Redis> | undefined;
    if (typeof candidate?.evalsha !== "function" || typeof candidate.duplicate !== "function") {
      throw new TypeError(`Invalid argument "client": expected an ioredis Redis or Cluster client`);
    }
  }
  const settings = resolveOptions({ ...options, backend: "redis" });
  return new DriverLocker(() => {
    const instances = new Instances(
      (list as unknown as Redis[]).map((c, i) => ({
        name: list.length === 1 ? "the given client" : `client ${i + 1}`,
        client: c,
        subscriptions: new Subscriptions(() => subscriberOf(c)),
      })),
      [],
    );
    return Promise.resolve(
      new RedisDriver(instances, settings, () => instances.close()),
    );
  });
}
