/**
 * The etcd backend, on npm:etcd3: a fair (FIFO), fenced lock that is
 * wire-compatible with Go's `client/v3/concurrency.Mutex`, so TypeScript
 * services, Go services and `etcdctl lock NAME` exclude each other.
 *
 * The FIFO is etcd's queue of keys, one per locker and name: a locker's
 * first waiting call for a name holds its place there, and its later calls
 * queue in process and take a new place, at the back, when the one before
 * them is done. Calls on one locker are served in arrival order; across
 * lockers, arrivals W1 (locker A), W2 (locker A), W3 (locker C) are served
 * W1, W3, W2.
 *
 * The protocol is Go's: the lock key is `NAME + "/"` plus the session lease ID
 * in lowercase hex, attached to that lease; the holder is the key with the
 * lowest create revision among such keys (`NAME/a/<lease>` belongs to the lock
 * `NAME/a`, not to `NAME`); a waiter watches only the deletion of the key just
 * before its own, then re-reads its own key (the fix for etcd-io/etcd#11456)
 * before it counts as the holder. The fencing token is the key's create
 * revision, and release deletes the key only if that revision is still ours.
 *
 * `New()` (etcd at `127.0.0.1:2379`) shares one client per connection config;
 * {@linkcode createEtcdLocker} takes a client you already own and never
 * closes it.
 *
 * @example A locker on a client you own
 * ```ts ignore
 * import { Etcd3 } from "npm:etcd3@^1.1.2";
 * import { createEtcdLocker } from "@genesis/lock/etcd";
 *
 * const client = new Etcd3({ hosts: "http://127.0.0.1:2379" });
 * const locker = createEtcdLocker(client, { ttl: 10_000 });
 * await locker.withLock("/jobs/nightly-report", async (lease) => {
 *   console.log("fencing token", lease.token);
 * });
 * await locker.close();
 * client.close();
 * ```
 *
 * @module
 */

import { Buffer } from "node:buffer";
import {
  Etcd3,
  EtcdAuthenticationFailedError,
  EtcdInvalidAuthTokenError,
  EtcdLeaseInvalidError,
  EtcdPermissionDeniedError,
  GRPCDeadlineExceededError,
  GRPCUnauthenticatedError,
  GRPCUnavailableError,
  type IKeyValue,
  type IOptions,
  type IRangeRequest,
  type IResponseHeader,
} from "etcd3";
import { type ClientRef, Connector } from "../connector.ts";
import {
  LockAuthError,
  LockConnectionError,
  LockError,
  LockLostError,
  LockPermissionError,
} from "../errors.ts";
import {
  abortable,
  delay,
  type Driver,
  DriverLocker,
  type Grant,
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
import { endStream, type Watch, WatchCanceledError, WatchHub } from "./_etcd_watch.ts";
export type { Lease, Locker, LockOptions } from "../_locker.ts";
export type { Options } from "../_options.ts";

/**
 * The client {@linkcode createEtcdLocker} takes: an `Etcd3` from npm:etcd3,
 * described by the parts this backend uses, so any copy or version 1.x of the
 * package fits.
 *
 * @example Take the client from the rest of the app
 * ```ts ignore
 * import { Etcd3 } from "npm:etcd3@^1.1.2";
 * import { createEtcdLocker, type EtcdClient } from "@genesis/lock/etcd";
 *
 * // Typed structurally, so the app's own copy of npm:etcd3 fits
 * function jobLocker(client: EtcdClient) {
 *   return createEtcdLocker(client, { ttl: 15_000 });
 * }
 * const client = new Etcd3({ hosts: "http://127.0.0.1:2379" });
 * const locker = jobLocker(client);
 * await locker.withLock("/jobs/nightly-report", () => {});
 * await locker.close();
 * client.close();
 * ```
 */
export interface EtcdClient {
  /** The KV service (ranges and transactions). */
  readonly kv: object;
  /** The lease service (grant, keepalive, revoke). */
  readonly leaseClient: object;
  /** Starts a watch. */
  watch(): unknown;
}

/**
 * Options of {@linkcode createEtcdLocker}: the lease settings of `Options`.
 *
 * @example A short lease, so a crashed holder frees the lock soon
 * ```ts ignore
 * import { Etcd3 } from "npm:etcd3@^1.1.2";
 * import { createEtcdLocker, type EtcdLockerOptions } from "@genesis/lock/etcd";
 *
 * // etcd leases are whole seconds: ttl is rounded up
 * const options: EtcdLockerOptions = { ttl: 5_000 };
 * const client = new Etcd3();
 * const locker = createEtcdLocker(client, options);
 * await locker.withLock("/jobs/a", () => {});
 * await locker.close();
 * client.close();
 * ```
 */
export type EtcdLockerOptions = Pick<Options, "ttl" | "autoRenew" | "retryInterval">;

const EMPTY = Buffer.alloc(0);

/** What an etcd failure means to a caller: which error class, and why. */
function translate(error: unknown, action: string, username: string, password: string): LockError {
  if (error instanceof LockError) return error;
  const cause = scrub(error, [password]);
  if (
    error instanceof EtcdAuthenticationFailedError || error instanceof GRPCUnauthenticatedError ||
    error instanceof EtcdInvalidAuthTokenError
  ) {
    return new LockAuthError(
      `${action}: etcd rejected the credentials of user ${JSON.stringify(username)}`,
      { cause },
    );
  }
  if (error instanceof EtcdPermissionDeniedError) {
    return new LockPermissionError(`${action}: permission denied by etcd`, { cause });
  }
  if (/servername.*IP address|ServerName to an IP address/i.test(cause.message)) {
    // Deno's and Bun's TLS refuse an IP address as server name (Node only warns).
    return new LockConnectionError(
      `${action}: this runtime's TLS refuses an IP address as server name: ` +
        `set tls.serverName to a DNS name in the server's certificate`,
      { cause },
    );
  }
  // npm:etcd3's circuit breaker opens after a member failed three calls in a row.
  const broken = (error as { isBrokenCircuitError?: boolean } | undefined)?.isBrokenCircuitError;
  if (
    error instanceof GRPCUnavailableError || error instanceof GRPCDeadlineExceededError || broken
  ) {
    return new LockConnectionError(`${action}: etcd is unreachable: ${cause.message}`, { cause });
  }
  return new LockError(`${action}: ${cause.message}`, { cause });
}

/** The longest lease ID in hex: etcd's IDs are positive 64-bit integers. */
const MAX_HEX = 16;

/**
 * Whether `key` is a queue entry of the lock whose keys start with `prefix`
 * (`NAME/`): the prefix and then a lease ID in lowercase hex, as Go's Mutex
 * writes it, and nothing else. `NAME/a/<lease>` is an entry of the lock
 * `NAME/a`, not of `NAME`, though it shares the prefix.
 */
function isEntry(key: Buffer, prefix: Buffer): boolean {
  const length = key.length - prefix.length;
  if (length < 1 || length > MAX_HEX) return false;
  for (let i = prefix.length; i < key.length; i++) {
    const c = key[i];
    if (!((c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66))) return false; // 0-9, a-f
  }
  return key.subarray(0, prefix.length).equals(prefix);
}

/** The client calls the protocol makes, each with the connection's deadline. */
class Calls {
  readonly client: Etcd3;
  readonly #timeout: number;
  readonly #username: string;
  readonly #password: string;

  constructor(client: Etcd3, timeout: number, username = "", password = "") {
    this.client = client;
    this.#timeout = timeout;
    this.#username = username;
    this.#password = password;
  }

  /** Wraps a failure in a typed error that names `action` and holds no secret. */
  error(error: unknown, action: string): LockError {
    return translate(error, action, this.#username, this.#password);
  }

  get #options() {
    return { deadline: new Date(Date.now() + this.#timeout) };
  }

  txn(request: Parameters<Etcd3["kv"]["txn"]>[0]) {
    return this.client.kv.txn(request, this.#options);
  }

  range(request: IRangeRequest) {
    return this.client.kv.range(request, this.#options);
  }

  grant(ttlSeconds: number) {
    return this.client.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }, this.#options);
  }

  revoke(id: string) {
    return this.client.leaseClient.leaseRevoke({ ID: id }, this.#options);
  }

  /** One keepalive round trip; resolves the TTL the server now gives the lease (0: gone). */
  async keepalive(id: string, within: number): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let stream: Awaited<ReturnType<Etcd3["leaseClient"]["leaseKeepAlive"]>> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no keepalive reply within ${within} ms`)), within);
    });
    const reply = (async () => {
      stream = await this.client.leaseClient.leaseKeepAlive();
      const s = stream;
      return await new Promise<number>((resolve, reject) => {
        s.on("data", (response) => resolve(Number(response.TTL)));
        s.on("error", reject);
        s.on("end", () => reject(new Error("keepalive stream ended")));
        s.write({ ID: id });
      });
    })();
    reply.catch(() => {});
    try {
      return await Promise.race([reply, timeout]);
    } finally {
      clearTimeout(timer);
      endStream(stream);
    }
  }
}

/**
 * A lease that keys hang off: one per locker while `autoRenew` (Go's
 * `concurrency.Session`), one per acquisition otherwise.
 *
 * Loss is decided here, locally and early: the deadline is the send time of
 * the last acknowledged grant or keepalive plus the TTL the server granted,
 * on the monotonic clock. When it passes, `signal` aborts, before the server
 * can give the lock to anyone else. npm:etcd3's own `lost` event comes only
 * after twice the TTL on the wall clock, so it is not used.
 */
class Session {
  readonly id: string;
  /** The lease ID as Go's Mutex writes it into the key: lowercase hex. */
  readonly hex: string;
  /** The TTL the server granted, in milliseconds (etcd raises a too-short one). */
  readonly ttl: number;
  readonly #calls: Calls;
  readonly #controller = new AbortController();
  readonly #clock: LeaseClock;
  #closed = false;
  #renewing = true;
  /** Keys whose fenced delete failed; retried before each keepalive. */
  readonly #orphans = new Map<string, string>();

  private constructor(
    calls: Calls,
    id: string,
    ttl: number,
    sentAt: number,
    retryInterval: number,
  ) {
    this.#calls = calls;
    this.id = id;
    this.hex = BigInt(id).toString(16);
    this.ttl = ttl;
    this.#clock = new LeaseClock({
      deadline: sentAt + ttl,
      period: ttl / 3,
      // After a failure, try again soon: the deadline is what decides loss.
      retry: Math.min(retryInterval * 5, ttl / 6),
      renew: () => this.#renew(),
      lapse: (detail) => this.#controller.abort(detail),
      expired: `no keepalive was acknowledged within the ${ttl} ms lease`,
    });
  }

  /** Grants a lease of `ttlMs` (rounded up to whole seconds) and starts keeping it alive. */
  static async grant(calls: Calls, ttlMs: number, retryInterval: number): Promise<Session> {
    const sentAt = performance.now();
    const response = await calls.grant(Math.ceil(ttlMs / 1000));
    const granted = Number(response.TTL) * 1000;
    if (!(granted > 0)) {
      throw new LockError(`Cannot grant an etcd lease: ${response.error || "no TTL"}`);
    }
    return new Session(calls, response.ID, granted, sentAt, retryInterval);
  }

  /** Aborts when the lease is gone; its reason is why, as a phrase. */
  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  get alive(): boolean {
    return !this.#clock.check();
  }

  /**
   * Stops renewing (a lease without `autoRenew`): it lasts its TTL from now.
   * One keepalive first, so the TTL counts from the acquisition, not from the
   * grant that may have come long before, while waiting.
   */
  async stopRenewing(refresh: boolean): Promise<void> {
    this.#renewing = false;
    this.#clock.stopRenewing();
    if (refresh) await this.#clock.renewNow();
  }

  /** Remembers a key whose delete failed, to retry until the lease ends. */
  orphan(key: string, createRevision: string) {
    this.#orphans.set(key, createRevision);
  }

  /**
   * The server said the lease is gone (revoked by someone else, say): lose
   * it now, so its holders hear of it and the next call grants a new one.
   */
  lost(detail: string): void {
    this.#clock.lose(detail);
  }

  /**
   * Asks etcd now whether the lease still lives (one keepalive), because a
   * key on it was deleted behind our back: if etcd no longer knows it, every
   * holder and waiter on it hears so at once, not at the next renewal. Only
   * while renewing: a lease that runs out by itself must not be extended.
   */
  verify(): void {
    if (this.#renewing && !this.#clock.ended) void this.#clock.renewNow();
  }

  /** Aborts `signal` if the deadline has passed; whether it is aborted. */
  checkDeadline(): boolean {
    return this.#clock.check();
  }

  /** One keepalive, after retrying the deletes that failed. */
  async #renew(): Promise<Renewal> {
    await this.#cleanOrphans();
    const sentAt = performance.now();
    try {
      // A keepalive sent to a member that hangs (no leader during an election)
      // must not use up the lease: give up on it after a sixth of the TTL and
      // try again, through whichever member answers.
      const within = Math.min(this.#clock.deadline - sentAt, Math.max(this.ttl / 6, 250));
      const ttl = await this.#calls.keepalive(this.id, Math.max(1, within));
      if (ttl <= 0) return { lost: "the lease expired on the server" };
      return { ok: true, deadline: sentAt + ttl * 1000 };
    } catch {
      return { ok: false };
    }
  }

  async #cleanOrphans() {
    for (const [key, revision] of this.#orphans) {
      try {
        await fencedDelete(this.#calls, key, revision);
        this.#orphans.delete(key);
      } catch {
        return;
      }
    }
  }

  /** Stops the clock and revokes the lease, which deletes every key on it. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#clock.lose("the session was closed");
    try {
      await this.#calls.revoke(this.id);
    } catch {
      // Unreachable: the lease and its keys expire with the TTL.
    }
  }
}

/** Deletes `key` only if its create revision is still `revision`. */
async function fencedDelete(calls: Calls, key: string, revision: string): Promise<void> {
  const k = Buffer.from(key);
  await calls.txn({
    compare: [{ key: k, target: "Create", result: "Equal", create_revision: revision }],
    success: [{ request_delete_range: { key: k } }],
    failure: [],
  });
}

interface Attempt {
  /** Our key's create revision. */
  revision: string;
  /** The oldest key in the owner range, which may be another lock's. */
  first: IKeyValue | undefined;
  header: IResponseHeader;
}

/** One lock acquisition on one session, as Go's `Mutex.Lock` does it. */
class Acquisition {
  readonly #calls: Calls;
  readonly #session: Session;
  readonly #name: string;
  readonly #prefix: Buffer;
  readonly #key: string;
  readonly #retryInterval: number;
  readonly #hub: WatchHub;

  constructor(calls: Calls, hub: WatchHub, session: Session, name: string, retryInterval: number) {
    this.#calls = calls;
    this.#hub = hub;
    this.#session = session;
    this.#name = name;
    this.#prefix = Buffer.from(`${name}/`);
    this.#key = `${name}/${session.hex}`;
    this.#retryInterval = retryInterval;
  }

  /**
   * The keys that may be queue entries, the oldest first: `NAME/0` up to
   * `NAME/g`, where every lease ID in hex lies. Longer names that share the
   * prefix and start with another character fall outside; the rest are
   * skipped when read.
   */
  get #ownerRange(): IRangeRequest {
    return {
      key: Buffer.concat([this.#prefix, Buffer.from("0")]),
      range_end: Buffer.concat([this.#prefix, Buffer.from("g")]),
      sort_target: "Create",
      sort_order: "Ascend",
      limit: 1,
    };
  }

  /**
   * `first`, the oldest (or newest) key a transaction read from the owner
   * range with limit 1, if it is a queue entry. If it is another lock's key,
   * the range is read again, in pages and in create-revision `order`, for the
   * first queue entry created at or before revision `bound`. Undefined if
   * there is none.
   */
  async #entry(
    first: IKeyValue | undefined,
    order: "Ascend" | "Descend",
    bound: string,
  ): Promise<IKeyValue | undefined> {
    if (first === undefined || isEntry(first.key, this.#prefix)) return first;
    const seen = new Set<string>();
    let limit = 64;
    let from: string | undefined;
    for (;;) {
      const response = await this.#calls.range({
        ...this.#ownerRange,
        sort_order: order,
        limit,
        keys_only: true,
        max_create_revision: order === "Descend" && from !== undefined ? from : bound,
        ...(order === "Ascend" && from !== undefined ? { min_create_revision: from } : {}),
      });
      let fresh = 0;
      for (const kv of response.kvs) {
        const id = kv.key.toString("hex");
        if (seen.has(id)) continue;
        seen.add(id);
        fresh++;
        if (isEntry(kv.key, this.#prefix)) return kv;
      }
      if (!response.more) return undefined;
      // Keys one transaction made share a create revision: the next page
      // starts at the last one's (the bounds are inclusive), and is longer
      // if the whole page shared it.
      from = response.kvs[response.kvs.length - 1].create_revision;
      if (fresh === 0) limit *= 2;
    }
  }

  /**
   * Puts our key if it is absent and reads the current owner, in one
   * transaction. A key of ours already present is stale (a release that
   * failed, or a retried put): it is deleted and put again, so the token
   * still grows.
   */
  async #put(): Promise<Attempt> {
    const key = Buffer.from(this.#key);
    for (let i = 0;; i++) {
      const response = await this.#calls.txn({
        compare: [{ key, target: "Create", result: "Equal", create_revision: 0 }],
        success: [
          { request_put: { key, value: EMPTY, lease: this.#session.id } },
          { request_range: this.#ownerRange },
        ],
        failure: [{ request_range: { key } }, { request_range: this.#ownerRange }],
      });
      if (response.succeeded) {
        const revision = response.header.revision;
        return {
          revision,
          first: response.responses[1].response_range.kvs[0],
          header: response.header,
        };
      }
      const stale = response.responses[0].response_range.kvs[0];
      if (stale === undefined || i >= 2) {
        throw new LockError(
          `Cannot acquire lock ${JSON.stringify(this.#name)}: the key keeps changing`,
        );
      }
      await fencedDelete(this.#calls, this.#key, stale.create_revision);
    }
  }

  /** Runs the acquisition. Leaves nothing behind when it rejects or returns undefined. */
  async run(
    wait: boolean,
    signal: AbortSignal,
  ): Promise<{ revision: string; header: IResponseHeader } | undefined> {
    const attempt = await this.#put();
    try {
      if (signal.aborted) throw signal.reason;
      const owner = await this.#entry(attempt.first, "Ascend", attempt.revision);
      if (owner === undefined || owner.create_revision === attempt.revision) {
        return { revision: attempt.revision, header: attempt.header };
      }
      if (!wait) {
        await this.#delete(attempt.revision);
        return undefined;
      }
      const header = await this.#waitTurn(attempt.revision, signal);
      return { revision: attempt.revision, header };
    } catch (error) {
      await this.#delete(attempt.revision);
      throw error;
    }
  }

  async #delete(revision: string) {
    try {
      await fencedDelete(this.#calls, this.#key, revision);
    } catch {
      // Never leave a waiter key that would block everyone behind it.
      this.#session.orphan(this.#key, revision);
    }
  }

  /**
   * Waits until every key created before ours is gone, then checks that ours
   * is still there: a session that expired while queued must not be granted
   * (etcd-io/etcd#11456).
   */
  async #waitTurn(revision: string, signal: AbortSignal): Promise<IResponseHeader> {
    const before = String(BigInt(revision) - 1n);
    const ours = Buffer.from(this.#key);
    for (;;) {
      // The predecessor and our own key, read at one revision.
      const response = await this.#whileWaiting(signal, () =>
        this.#calls.txn({
          compare: [],
          success: [
            {
              request_range: {
                ...this.#ownerRange,
                sort_order: "Descend",
                max_create_revision: before,
              },
            },
            { request_range: { key: ours } },
          ],
          failure: [],
        }));
      const mine = response.responses[1].response_range.kvs[0];
      if (mine === undefined || mine.create_revision !== revision) {
        throw new LockLostError(
          this.#name,
          "its queued key was deleted, or its session expired, while it waited",
        );
      }
      const predecessor = await this.#whileWaiting(
        signal,
        () => this.#entry(response.responses[0].response_range.kvs[0], "Descend", before),
      );
      if (predecessor === undefined) return response.header;
      await this.#waitDelete(predecessor, signal);
    }
  }

  /**
   * A read made while waiting, tried again while etcd is unreachable (a
   * restart, a cut connection): the wait is bounded by the caller's signal
   * and the session, not by one failed round trip.
   */
  async #whileWaiting<T>(signal: AbortSignal, read: () => Promise<T>): Promise<T> {
    for (let attempt = 0;; attempt++) {
      try {
        return await read();
      } catch (error) {
        if (!(this.#calls.error(error, "") instanceof LockConnectionError)) throw error;
        if (this.#session.signal.aborted) {
          throw new LockLostError(
            this.#name,
            `the session lease ended while waiting: ${this.#session.signal.reason}`,
          );
        }
        await delay(Math.min(1_000, 50 * 2 ** attempt), signal);
      }
    }
  }

  /**
   * Waits for `kv` to be deleted. The watch starts at the current revision
   * (a watch from an older one is "unsynced" and etcd 3.4 delivers its events
   * only on a later catch-up pass, ~80 ms); a read after the watch is in
   * place catches a delete that came before it. The hub resumes the watch
   * after a stream break without losing an event; if etcd cancels it, a new
   * one is made the same way. Polling at `retryInterval` covers a lost event.
   */
  async #waitDelete(kv: IKeyValue, signal: AbortSignal): Promise<void> {
    const stop = new AbortController();
    const onLost = () =>
      stop.abort(
        new LockLostError(
          this.#name,
          `the session lease ended while waiting: ${this.#session.signal.reason}`,
        ),
      );
    const onAbort = () => stop.abort(signal.reason);
    this.#session.signal.addEventListener("abort", onLost, { once: true });
    signal.addEventListener("abort", onAbort, { once: true });
    if (signal.aborted) onAbort();
    if (this.#session.signal.aborted) onLost();
    let watch: Watch | undefined;
    try {
      const gone = new Promise<void>((resolve) => {
        const start = () => {
          if (stop.signal.aborted) return;
          const w = this.#hub.watch(kv.key, undefined, {
            onEvents: (events) => {
              if (
                events.some((e) =>
                  e.type === "Delete" || e.kv.create_revision !== kv.create_revision
                )
              ) {
                resolve();
              }
            },
            onError: start,
          });
          watch = w;
          w.created.then(() => {
            // The watch is in place: a read now sees any delete it missed.
            if (watch === w) this.#stillThere(kv).then((there) => there || resolve(), () => {});
          }, () => {}); // refused: the poll below carries on
        };
        start();
      });
      const polled = (async () => {
        for (;;) {
          await delay(this.#retryInterval, stop.signal);
          if (!(await this.#stillThere(kv).catch(() => true))) return;
        }
      })();
      await abortable(Promise.race([gone, polled]), stop.signal);
    } finally {
      stop.abort();
      this.#session.signal.removeEventListener("abort", onLost);
      signal.removeEventListener("abort", onAbort);
      watch?.cancel();
    }
  }

  async #stillThere(kv: IKeyValue): Promise<boolean> {
    const response = await this.#calls.range({ key: kv.key });
    const now = response.kvs[0];
    return now !== undefined && now.create_revision === kv.create_revision;
  }

  /**
   * The held lock: its signal aborts when the session is lost or the key is
   * deleted behind our back (watched from the revision we read it at).
   */
  hold(revision: string, header: IResponseHeader, release: () => Promise<void>): Grant {
    const controller = new AbortController();
    const key = Buffer.from(this.#key);
    let ended = false;
    let watch: Watch | undefined;
    let retry: ReturnType<typeof setTimeout> | undefined;
    const end = () => {
      ended = true;
      this.#session.signal.removeEventListener("abort", onSessionLost);
      clearTimeout(retry);
      watch?.cancel();
      watch = undefined;
    };
    const lose = (reason: LockLostError) => {
      if (ended) return;
      end();
      controller.abort(reason);
    };
    const onSessionLost = () =>
      lose(new LockLostError(this.#name, String(this.#session.signal.reason)));
    this.#session.signal.addEventListener("abort", onSessionLost, { once: true });
    if (this.#session.signal.aborted) onSessionLost();
    // From the revision after the one we last saw our key at, so nothing in
    // between is missed. The hub resumes it after a stream break; if etcd
    // cancels it or refuses it, read the key and start again.
    const watchFrom = (from: string) => {
      const w = this.#hub.watch(key, from, {
        onEvents: (events) => {
          for (const event of events) {
            if (event.type === "Delete") {
              lose(new LockLostError(this.#name, "its key was deleted"));
              // Perhaps with its whole lease (revoked): the other keys on it
              // learn of it now rather than at the next keepalive.
              this.#session.verify();
            } else if (event.kv.create_revision !== revision) {
              lose(new LockLostError(this.#name, "its key was replaced"));
            }
          }
        },
        onError: () => resync(),
      });
      watch = w;
      w.created.catch((error) => {
        // Refused by etcd; a hub closed under a held lock has nothing to redo.
        if (watch === w && error instanceof WatchCanceledError) resync();
      });
    };
    const resync = () => {
      watch = undefined;
      if (ended) return;
      retry = setTimeout(async () => {
        try {
          const response = await this.#calls.range({ key });
          const now = response.kvs[0];
          if (now === undefined) return lose(new LockLostError(this.#name, "its key was deleted"));
          if (now.create_revision !== revision) {
            return lose(new LockLostError(this.#name, "its key was replaced"));
          }
          if (!ended) watchFrom(String(BigInt(response.header.revision) + 1n));
        } catch {
          resync();
        }
      }, this.#retryInterval);
    };
    watchFrom(String(BigInt(header.revision) + 1n));
    return {
      token: BigInt(revision),
      signal: controller.signal,
      check: () => void this.#session.checkDeadline(),
      release: async () => {
        end();
        await release();
      },
    };
  }

  /** Fenced release of the key at `revision`. */
  release(revision: string): Promise<void> {
    return fencedDelete(this.#calls, this.#key, revision);
  }
}

/** The etcd driver: sessions, acquisitions, and the client reference. */
class EtcdDriver implements Driver {
  readonly #calls: Calls;
  readonly #settings: LeaseSettings;
  readonly #onClose: () => Promise<void>;
  #shared?: Promise<Session>;
  readonly #sessions = new Set<Session>();
  readonly #hub: WatchHub;

  constructor(calls: Calls, settings: LeaseSettings, onClose: () => Promise<void>) {
    this.#calls = calls;
    this.#settings = settings;
    this.#onClose = onClose;
    this.#hub = new WatchHub(calls.client);
  }

  async #grant(): Promise<Session> {
    const session = await Session.grant(
      this.#calls,
      this.#settings.ttl,
      this.#settings.retryInterval,
    );
    this.#sessions.add(session);
    session.signal.addEventListener("abort", () => this.#sessions.delete(session), { once: true });
    return session;
  }

  /** The locker's session: granted on first use, granted anew once lost. */
  async #sharedSession(): Promise<Session> {
    const current = this.#shared;
    if (current !== undefined) {
      const session = await current.catch(() => undefined);
      if (session?.alive) return session;
      if (this.#shared !== current) return this.#sharedSession();
    }
    const next = this.#grant();
    this.#shared = next;
    next.catch(() => {
      if (this.#shared === next) this.#shared = undefined;
    });
    return next;
  }

  async acquire(key: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined> {
    const action = `Cannot acquire lock ${JSON.stringify(key)}`;
    const shared = this.#settings.autoRenew;
    let session: Session | undefined;
    try {
      const granting = shared ? this.#sharedSession() : this.#grant();
      session = await abortable(granting, signal).catch((error) => {
        // An own lease granted after this call gave up must not live on.
        if (!shared) granting.then((late) => late.close(), () => {});
        throw error;
      });
      let acquisition: Acquisition;
      let won: Awaited<ReturnType<Acquisition["run"]>>;
      const started = performance.now();
      for (let attempt = 0;; attempt++) {
        acquisition = new Acquisition(
          this.#calls,
          this.#hub,
          session,
          key,
          this.#settings.retryInterval,
        );
        try {
          won = await acquisition.run(wait, signal);
          break;
        } catch (error) {
          // etcd no longer knows the lease (revoked behind our back): that is
          // the session lost, not this call. Once more on a new session.
          if (!(error instanceof EtcdLeaseInvalidError) || attempt > 0) throw error;
          session.lost("the lease was revoked on the server");
          if (!shared) await session.close();
          session = await abortable(shared ? this.#sharedSession() : this.#grant(), signal);
        }
      }
      if (won === undefined) {
        if (!shared) await session.close();
        return undefined;
      }
      const own = session;
      if (!shared) {
        // Without autoRenew the lease lasts ttl from the acquisition: refresh it
        // once if waiting took a while, then let it run out.
        await own.stopRenewing(performance.now() - started > 50);
      }
      return acquisition.hold(won.revision, won.header, async () => {
        if (shared) {
          try {
            await acquisition.release(won.revision);
          } catch (error) {
            own.orphan(`${key}/${own.hex}`, won.revision);
            throw this.#calls.error(error, `Cannot release lock ${JSON.stringify(key)}`);
          }
        } else {
          await own.close();
        }
      });
    } catch (error) {
      if (!shared) await session?.close();
      if (signal.aborted && error === signal.reason) throw error;
      throw this.#calls.error(error, action);
    }
  }

  status(key: string): Promise<LockStatus> {
    return readStatus(this.#calls, key);
  }

  async close(): Promise<void> {
    await Promise.all([...this.#sessions].map((session) => session.close()));
    await this.#hub.close();
    await this.#onClose();
  }
}

/** Who holds the lock `name` (the oldest queue key), its lease's time left, and the queue. */
async function readStatus(calls: Calls, name: string): Promise<LockStatus> {
  try {
    const prefix = Buffer.from(`${name}/`);
    // Every queue entry lies in NAME/0 .. NAME/g (see Acquisition's owner range).
    const response = await calls.range({
      key: Buffer.concat([prefix, Buffer.from("0")]),
      range_end: Buffer.concat([prefix, Buffer.from("g")]),
      sort_target: "Create",
      sort_order: "Ascend",
    });
    const entries = response.kvs.filter((kv) => isEntry(kv.key, prefix));
    const [owner, ...queue] = entries;
    if (owner === undefined) return { key: name, waiting: 0, queue: [] };
    let ttl: number | undefined;
    if (owner.lease !== "0") {
      const lease = await calls.client.leaseClient.leaseTimeToLive(
        { ID: owner.lease, keys: false },
        { deadline: new Date(Date.now() + 5_000) },
      );
      ttl = Math.max(0, Number(lease.TTL)) * 1000;
    }
    return {
      key: name,
      holder: {
        token: BigInt(owner.create_revision),
        ttl,
        owner: owner.key.toString(),
        lease: owner.lease,
      },
      waiting: queue.length,
      queue: queue.map((kv) => kv.key.toString()),
    };
  } catch (error) {
    throw calls.error(error, `Cannot read the status of lock ${JSON.stringify(name)}`);
  }
}

/** The npm:etcd3 options for a connection config. */
function clientOptions(config: ConnectionConfig): IOptions {
  const scheme = config.tls === false ? "http" : "https";
  const options: IOptions = {
    hosts: config.endpoints.map((endpoint) =>
      /^https?:\/\//.test(endpoint) ? endpoint : `${scheme}://${endpoint}`
    ),
    dialTimeout: config.dialTimeout,
  };
  if (config.username !== "" || config.password !== "") {
    options.auth = { username: config.username, password: config.password };
  }
  if (config.tls !== false && config.tls.ca !== undefined) {
    options.credentials = {
      rootCertificate: Buffer.from(config.tls.ca),
      privateKey: config.tls.key === undefined ? undefined : Buffer.from(config.tls.key),
      certChain: config.tls.cert === undefined ? undefined : Buffer.from(config.tls.cert),
    };
  }
  if (config.tls !== false && config.tls.serverName !== undefined) {
    options.grpcOptions = { "grpc.ssl_target_name_override": config.tls.serverName };
  }
  return options;
}

/**
 * Connects a client and proves it works (and, with credentials, that they
 * are accepted) within `dialTimeout`: a failure is thrown, so the connector
 * does not cache it.
 */
async function connect(config: ConnectionConfig): Promise<Etcd3> {
  const client = new Etcd3(clientOptions(config));
  const where = config.endpoints.join(", ");
  const calls = new Calls(client, config.dialTimeout, config.username, config.password);
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new LockConnectionError(
              `Cannot connect to etcd at ${where}: no answer within ${config.dialTimeout} ms`,
            ),
          ),
        config.dialTimeout,
      );
    });
    // The cheapest call that goes through authentication.
    await Promise.race([
      client.maintenance.status({ deadline: new Date(Date.now() + config.dialTimeout) }),
      timeout,
    ]);
    return client;
  } catch (error) {
    closeClient(client);
    throw calls.error(error, `Cannot connect to etcd at ${where}`);
  } finally {
    clearTimeout(timer);
  }
}

function closeClient(client: Etcd3): Promise<void> {
  client.close();
  return Promise.resolve();
}

const clients = new Connector<Etcd3>({ create: connect, close: closeClient });

/**
 * The driver behind `New({ backend: "etcd" })`: a client shared by every
 * locker with the same connection config.
 *
 * @ignore
 */
export async function openSharedDriver(options: ResolvedOptions, owner: object): Promise<Driver> {
  const ref: ClientRef<Etcd3> = await clients.acquire(options, owner);
  const calls = new Calls(ref.client, options.dialTimeout, options.username, options.password);
  return new EtcdDriver(calls, options, ref.release);
}

/**
 * Creates an etcd locker on a client you already own (the Go design's
 * per-backend API). The locker never closes your client.
 *
 * @param client An npm:etcd3 `Etcd3` client.
 * @param options The lease settings.
 * @returns A locker.
 * @throws {TypeError} A client that is not an `Etcd3`, or a bad option.
 * @throws {RangeError} An option out of range.
 *
 * @example Share your client
 * ```ts ignore
 * import { Etcd3 } from "npm:etcd3@^1.1.2";
 * import { createEtcdLocker } from "@genesis/lock/etcd";
 *
 * const client = new Etcd3();
 * const locker = createEtcdLocker(client);
 * const lease = await locker.tryLock("/jobs/a");
 * await lease?.release();
 * await locker.close();
 * client.close();
 * ```
 */
export function createEtcdLocker(client: EtcdClient, options?: EtcdLockerOptions): Locker {
  // Structural, not instanceof: the caller's npm:etcd3 may be another copy.
  const c = client as Partial<Etcd3> | undefined;
  if (typeof c?.watch !== "function" || typeof c.kv?.txn !== "function" || !c.leaseClient) {
    throw new TypeError(`Invalid argument "client": expected an Etcd3 client from npm:etcd3`);
  }
  const settings = resolveOptions({ ...options, backend: "etcd" });
  const calls = new Calls(client as Etcd3, settings.dialTimeout);
  return new DriverLocker(() =>
    Promise.resolve(new EtcdDriver(calls, settings, () => Promise.resolve()))
  );
}
