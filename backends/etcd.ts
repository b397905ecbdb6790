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
  GRPCResourceExhastedError,
  GRPCUnauthenticatedError,
  GRPCUnavailableError,
  type IEvent,
  type IKeyValue,
  type IOptions,
  type IRangeRequest,
  type IResponseHeader,
} from "etcd3";
import { type ClientRef, Connector } from "../connector.ts";
import {
  LockAuthError,
  LockClosedError,
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
  Loss,
  onAbort,
  settleEach,
} from "../_locker.ts";
import {
  type ConnectionConfig,
  type LeaseSettings,
  type Options,
  type ResolvedOptions,
  resolveOptions,
} from "../_options.ts";
import { type Alarm, Alarms, LeaseClock, type Renewal } from "../_lease_clock.ts";
import { scrub } from "../_scrub.ts";
import { endStream, type Watch, type WatchHandlers, WatchHub } from "./_etcd_watch.ts";
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
  if (error instanceof DeadlineError) {
    return new LockConnectionError(`${action}: ${cause.message}`, { cause });
  }
  // The circuit breaker of a client the caller owns (New()'s clients have none).
  const broken = (error as { isBrokenCircuitError?: boolean } | undefined)?.isBrokenCircuitError;
  if (
    error instanceof GRPCUnavailableError || error instanceof GRPCDeadlineExceededError ||
    broken || severed(error)
  ) {
    return new LockConnectionError(`${action}: etcd is unreachable: ${cause.message}`, { cause });
  }
  if (transient(error)) {
    // Still refused after backing off until the call's deadline.
    return new LockConnectionError(`${action}: etcd is overloaded: ${cause.message}`, { cause });
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

/** A request that got no answer, or no slot to be sent in, within its deadline. */
class DeadlineError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DeadlineError";
  }
}

/**
 * How many unary requests one client keeps in flight. etcd refuses requests
 * ("too many requests") once applied entries lag committed ones by 5,000: a
 * burst of thousands from one process must queue here, not there.
 */
const MAX_IN_FLIGHT = 512;

/** A counting semaphore whose waits end at a deadline. */
class Slots {
  #free: number;
  readonly #waiting: { grant(): void }[] = [];

  constructor(size: number) {
    this.#free = size;
  }

  /** Resolves a release function once a slot is free, or rejects at `deadline` (monotonic ms). */
  enter(deadline: number, within: number): Promise<() => void> {
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      const next = this.#waiting.shift();
      if (next) next.grant();
      else this.#free++;
    };
    if (this.#free > 0) {
      this.#free--;
      return Promise.resolve(release);
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        grant: () => {
          clearTimeout(timer);
          resolve(release);
        },
      };
      const timer = setTimeout(() => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1);
        reject(
          new DeadlineError(
            `etcd is busy: ${MAX_IN_FLIGHT} requests of this client were in flight for ${within} ms`,
          ),
        );
      }, Math.max(0, deadline - performance.now()));
      this.#waiting.push(waiter);
    });
  }
}

/** One in-flight bound per client, shared by every locker on it. */
const slotsOf = new WeakMap<object, Slots>();

/**
 * Whether a request failed in a way that sending it again is safe and may
 * work: etcd refused it before acting on it, or the connection to a member
 * broke mid-request (a member killed or restarting: grpc-js says INTERNAL,
 * RST_STREAM). Every request here is safe to repeat: a put-if-absent finds
 * its own key and starts again, deletes are fenced, reads and keepalives and
 * revokes repeat, and a lease granted twice expires with its TTL.
 */
function transient(error: unknown): boolean {
  if (error instanceof GRPCResourceExhastedError || error instanceof GRPCUnavailableError) {
    return true;
  }
  if (severed(error)) return true;
  // A stream's error comes raw from grpc-js: UNAVAILABLE (14), RESOURCE_EXHAUSTED (8).
  const code = (error as { code?: unknown } | undefined)?.code;
  if (code === 14 || code === 8) return true;
  return /too many requests/i.test(String((error as Error | undefined)?.message));
}

/** How often at most a waiter whose watch is in place reads its predecessor's key, in ms. */
const POLL_WATCHED = 2_000;

/** How long a held lock goes unwatched after its grant, in ms (see `Acquisition.hold`). */
const WATCH_DELAY = 100;

/** The least time one attempt of a request gets before it is sent again. */
const ATTEMPT_FLOOR = 1_000;

/** Whether a request ran out of its deadline (grpc-js: DEADLINE_EXCEEDED, code 4). */
function isDeadline(error: unknown): boolean {
  return error instanceof GRPCDeadlineExceededError ||
    (error as { code?: unknown } | undefined)?.code === 4;
}

/** A connection that broke under a request, as grpc-js reports it (code 13, INTERNAL). */
function severed(error: unknown): boolean {
  const text = String((error as Error | undefined)?.message);
  return /RST_STREAM|socket has been ended|ECONNRESET|EPIPE|Connection dropped/i.test(text) &&
    ((error as { code?: unknown } | undefined)?.code === 13 || /^13 INTERNAL/.test(text) ||
      (error as Error | undefined)?.name === "GRPCInternalError");
}

/**
 * The client calls the protocol makes. Each request is bounded by
 * `dialTimeout` (a caller with an earlier deadline stops waiting at its own,
 * and what it gave up on is compensated: see `Acquisition.#put`), waits for
 * one of the client's slots within that bound, and is retried, with backoff
 * and only within it, when etcd refused it without acting on it (overload, a
 * member down): npm:etcd3's own retry and circuit breaker are off.
 */
class Calls {
  readonly client: Etcd3;
  /** The bound of every request, in ms: the connection's `dialTimeout`. */
  readonly #timeout: number;
  readonly #username: string;
  readonly #password: string;
  readonly #slots: Slots;
  /** Aborted by the driver's close(): no request is retried after it. */
  readonly #stopped = new AbortController();
  /** The keepalive stream kept open for each renewing session's lease. */
  readonly #kept = new Map<string, KeptStream>();

  constructor(client: Etcd3, timeout: number, username = "", password = "") {
    this.client = client;
    this.#timeout = timeout;
    this.#username = username;
    this.#password = password;
    let slots = slotsOf.get(client);
    if (slots === undefined) slotsOf.set(client, slots = new Slots(MAX_IN_FLIGHT));
    this.#slots = slots;
  }

  /** Retries nothing from now on (the driver closed): a retry would outlive close(). */
  stop(): void {
    this.#stopped.abort();
    for (const id of [...this.#kept.keys()]) this.forgetStream(id);
  }

  /** Wraps a failure in a typed error that names `action` and holds no secret. */
  error(error: unknown, action: string): LockError {
    return translate(error, action, this.#username, this.#password);
  }

  async #send<T>(send: (options: { deadline: Date }) => Promise<T>, within: number): Promise<T> {
    const deadline = performance.now() + within;
    const release = await this.#slots.enter(deadline, within);
    try {
      for (let attempt = 0;; attempt++) {
        const left = Math.max(0, deadline - performance.now());
        // One attempt gets a third of the call's time: a request a member
        // holds through a leader election (etcd answers it only after its own
        // request timeout, 5 s or more) is sent again, and lands on the new
        // leader, rather than holding up the call and every waiter behind it.
        const bound = Math.min(left, Math.max(ATTEMPT_FLOOR, within / 3));
        try {
          return await send({ deadline: new Date(Date.now() + bound) });
        } catch (error) {
          const cutShort = bound < left && isDeadline(error);
          // Full jitter, so a refused burst does not come back as one burst.
          const pause = Math.random() * Math.min(1_000, 25 * 2 ** attempt);
          if (!(transient(error) || cutShort) || performance.now() + pause >= deadline) throw error;
          await delay(pause, this.#stopped.signal).catch(() => {});
          if (this.#stopped.signal.aborted) throw error;
        }
      }
    } finally {
      release();
    }
  }

  txn(request: Parameters<Etcd3["kv"]["txn"]>[0]) {
    return this.#send((options) => this.client.kv.txn(request, options), this.#timeout);
  }

  range(request: IRangeRequest) {
    return this.#send((options) => this.client.kv.range(request, options), this.#timeout);
  }

  grant(ttlSeconds: number) {
    return this.#send(
      (options) => this.client.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }, options),
      this.#timeout,
    );
  }

  /** Revokes a lease; one that is already gone counts as revoked. */
  async revoke(id: string): Promise<void> {
    try {
      await this.#send(
        (options) => this.client.leaseClient.leaseRevoke({ ID: id }, options),
        this.#timeout,
      );
    } catch (error) {
      if (error instanceof EtcdLeaseInvalidError) return;
      throw error;
    }
  }

  /**
   * One keepalive round trip within `within` ms; resolves the TTL the server
   * now gives the lease (0: gone). A member that refused the stream (down,
   * overloaded) is tried again at once, through whichever member comes up,
   * within the same `within`: npm:etcd3 no longer keeps it out for us.
   */
  async keepalive(id: string, within: number): Promise<number> {
    const deadline = performance.now() + within;
    for (let attempt = 0;; attempt++) {
      try {
        return await this.#keepaliveKept(id, Math.max(1, deadline - performance.now()));
      } catch (error) {
        const pause = Math.random() * Math.min(250, 10 * 2 ** attempt);
        if (!transient(error) || performance.now() + pause >= deadline) throw error;
        await delay(pause, this.#stopped.signal).catch(() => {});
        if (this.#stopped.signal.aborted) throw error;
      }
    }
  }

  /**
   * One keepalive round trip on the stream kept open for lease `id` (opened
   * by the first round): a session sends every keepalive on one stream, not
   * a stream each, and ends it once it renews no more (`forgetStream`). Replies come in the order of the writes. A
   * round left unanswered within `within` ms gives the stream up (etcd may
   * be holding it on a member without a leader); the next round opens
   * another, through whichever member answers.
   */
  async #keepaliveKept(id: string, within: number): Promise<number> {
    const kept = this.#keptStream(id);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const error = new DeadlineError(`etcd is unreachable: no answer within ${within} ms`);
        this.#dropStream(id, kept, error);
        reject(error);
      }, within);
    });
    const reply = kept.opening.then((stream) =>
      new Promise<number>((resolve, reject) => {
        if (this.#kept.get(id) !== kept) return reject(new Error("keepalive stream closed"));
        kept.waiting.push({ resolve, reject });
        stream.write({ ID: id });
      })
    );
    reply.catch(() => {});
    try {
      return await Promise.race([reply, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** The stream kept open for lease `id`, opened now if there is none. */
  #keptStream(id: string): KeptStream {
    const open = this.#kept.get(id);
    if (open !== undefined) return open;
    const kept: KeptStream = { opening: undefined!, waiting: [] };
    this.#kept.set(id, kept);
    kept.opening = this.client.leaseClient.leaseKeepAlive().then((stream) => {
      if (this.#kept.get(id) !== kept) {
        // Given up on (or forgotten) while it opened: nothing may keep it open.
        endStream(stream);
        throw new Error("keepalive stream closed");
      }
      kept.stream = stream;
      stream.on("data", (response) => kept.waiting.shift()?.resolve(Number(response.TTL)));
      stream.on("error", (error: unknown) => this.#dropStream(id, kept, error));
      stream.on("end", () => this.#dropStream(id, kept, new Error("keepalive stream ended")));
      return stream;
    });
    kept.opening.catch((error) => this.#dropStream(id, kept, error));
    return kept;
  }

  /** Ends `kept` and fails the rounds waiting on it; the next round opens another. */
  #dropStream(id: string, kept: KeptStream, error: unknown): void {
    if (this.#kept.get(id) === kept) this.#kept.delete(id);
    endStream(kept.stream);
    kept.stream = undefined;
    for (const waiter of kept.waiting.splice(0)) waiter.reject(error);
  }

  /** Ends the stream kept for lease `id`, if any: the lease is gone or renewed no more. */
  forgetStream(id: string): void {
    const kept = this.#kept.get(id);
    if (kept !== undefined) this.#dropStream(id, kept, new Error("keepalive stream closed"));
  }
}

/** npm:etcd3's keepalive stream. */
type KeepaliveStream = Awaited<ReturnType<Etcd3["leaseClient"]["leaseKeepAlive"]>>;

/** A keepalive stream kept open between one lease's rounds, and the rounds waiting on it, oldest first. */
interface KeptStream {
  opening: Promise<KeepaliveStream>;
  stream?: KeepaliveStream;
  waiting: { resolve(ttl: number): void; reject(error: unknown): void }[];
}

/** A key a session must still delete (see `Session.orphan`). */
interface Orphan {
  revision?: string;
  unknown: boolean;
  misses: number;
  used: boolean;
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
/** A held lock on a session: told once its lease is gone. */
interface SessionHolder {
  sessionLost(): void;
}

class Session {
  readonly id: string;
  /** The lease ID as Go's Mutex writes it into the key: lowercase hex. */
  readonly hex: string;
  /** The TTL the server granted, in milliseconds (etcd raises a too-short one). */
  readonly ttl: number;
  readonly #calls: Calls;
  readonly #controller = new AbortController();
  /**
   * Who hears of the lease's loss (held locks, waiters, the driver): a set,
   * not a listener each on `signal`, whose removal scans every listener
   * (10,000 held locks made close() quadratic) and costs more memory.
   */
  readonly #holders = new Set<SessionHolder>();
  readonly #clock: LeaseClock;
  #renewing = true;
  #revoked?: Promise<void>;
  /**
   * Keys to delete, retried before each keepalive: a fenced delete that
   * failed (`revision`), and/or a put given up on that etcd may still apply
   * (`unknown`: whatever key of ours is there once no acquisition uses it;
   * `misses` counts answered reads that found none; `used` tells a cleanup
   * that an acquisition began while it read).
   */
  readonly #orphans = new Map<string, Orphan>();
  /** Keys an acquisition or a held lock of this session uses now. */
  readonly #busy = new Set<string>();

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
      lapse: (detail) => this.#lose(detail),
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

  #lose(detail: unknown) {
    this.#calls.forgetStream(this.id);
    this.#controller.abort(detail);
    const holders = [...this.#holders];
    this.#holders.clear();
    for (const holder of holders) holder.sessionLost();
  }

  /** Calls `lost` once the lease is gone (at once if it is); the result stops that. */
  whenLost(lost: () => void): () => void {
    const holder = { sessionLost: lost };
    this.hold(holder);
    return () => this.forget(holder);
  }

  /** Tells `holder` once the lease is gone (at once if it is), until `forget(holder)`. */
  hold(holder: SessionHolder): void {
    if (this.#controller.signal.aborted) return holder.sessionLost();
    this.#holders.add(holder);
  }

  forget(holder: SessionHolder): void {
    this.#holders.delete(holder);
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
    this.#calls.forgetStream(this.id);
  }

  /**
   * Remembers a key to delete until the lease ends: the key at
   * `createRevision`, or, without it, a put whose fate is unknown.
   */
  orphan(key: string, createRevision?: string) {
    const orphan = this.#orphans.get(key);
    if (orphan === undefined) {
      const unknown = createRevision === undefined;
      this.#orphans.set(key, { revision: createRevision, unknown, misses: 0, used: false });
      return;
    }
    // Two to take back on one key: the fenced delete goes first, then the
    // read-and-delete pass takes whichever is left.
    orphan.revision ??= createRevision;
    if (createRevision !== orphan.revision) orphan.unknown = true;
    orphan.misses = 0;
  }

  /** Marks `key` as used by an acquisition or a held lock; returns the undo. */
  use(key: string): () => void {
    this.#busy.add(key);
    const orphan = this.#orphans.get(key);
    if (orphan) orphan.used = true;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#busy.delete(key);
    };
  }

  /** A held lock is done with `key` (see `use`). */
  unuse(key: string): void {
    this.#busy.delete(key);
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
    for (;;) {
      const sentAt = performance.now();
      const left = this.#clock.deadline - sentAt;
      if (left <= 0 || this.#clock.ended) {
        return { ok: false, why: "the last keepalives were not answered in time" };
      }
      try {
        // A keepalive sent to a member that hangs (no leader during an
        // election) must not use up the lease: give up on it after a sixth of
        // the TTL and send it again at once, through whichever member
        // answers, for as long as the lease lasts. Waiting the clock's retry
        // between such tries left a 3 s lease two tries in a 1.5 s election.
        const within = Math.min(left, Math.max(this.ttl / 6, 250));
        const ttl = await this.#calls.keepalive(this.id, Math.max(1, within));
        if (ttl <= 0) return { lost: "the lease expired on the server" };
        return { ok: true, deadline: sentAt + ttl * 1000 };
      } catch (error) {
        // Anything but a keepalive left unanswered: the clock's retry.
        if (!(error instanceof DeadlineError)) {
          // (A keepalive's error carries no credential.)
          return { ok: false, why: `the last keepalive failed: ${scrub(error, []).message}` };
        }
      }
    }
  }

  async #cleanOrphans() {
    for (const [key, orphan] of this.#orphans) {
      try {
        if (orphan.revision !== undefined) {
          await fencedDelete(this.#calls, key, orphan.revision);
          orphan.revision = undefined;
          if (!orphan.unknown) {
            this.#orphans.delete(key);
            continue;
          }
        }
        if (this.#busy.has(key)) continue; // that acquisition deals with a stale key itself
        orphan.used = false;
        const response = await this.#calls.range({ key: Buffer.from(key) });
        const kv = response.kvs[0];
        // An acquisition that began during the read may have put the key read.
        if (this.#busy.has(key) || orphan.used) continue;
        if (kv === undefined) {
          // Three answered reads that found nothing: the put was not applied.
          if (++orphan.misses >= 3) this.#orphans.delete(key);
          continue;
        }
        await fencedDelete(this.#calls, key, kv.create_revision);
        this.#orphans.delete(key);
      } catch {
        return;
      }
    }
  }

  /**
   * Stops the clock and revokes the lease, which deletes every key on it, in
   * one request bounded by `dialTimeout`. Rejects if etcd did not confirm it.
   * Idempotent: later calls share the first one's outcome.
   */
  revoke(): Promise<void> {
    return this.#revoked ??= (async () => {
      this.#clock.lose("the session was closed");
      await this.#calls.revoke(this.id);
    })();
  }

  /** Like {@linkcode revoke}, but never rejects: an unconfirmed lease expires with its TTL. */
  async close(): Promise<void> {
    await this.revoke().catch(() => {});
  }
}

/**
 * The keys that may be queue entries of the lock whose keys start with
 * `prefix` (`NAME/`), the oldest first: `NAME/0` up to `NAME/g`, where every
 * lease ID in hex lies. Longer names that share the prefix and start with
 * another character fall outside; the rest are skipped when read
 * ({@linkcode isEntry}).
 */
function queueRange(prefix: Buffer): IRangeRequest {
  return {
    key: Buffer.concat([prefix, Buffer.from("0")]),
    range_end: Buffer.concat([prefix, Buffer.from("g")]),
    sort_target: "Create",
    sort_order: "Ascend",
  };
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
  /**
   * A key of the owner range that decides the owner: a queue entry before
   * ours (the owner is not us), ours (no key before it: we own the lock), or
   * another lock's key (the owner range must be read).
   */
  first: IKeyValue | undefined;
  /** The newest key in the owner range created before ours (keys only), which may be another lock's. */
  before: IKeyValue | undefined;
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
  readonly #alarms: Alarms;
  /** The oldest key that may be a queue entry (see {@linkcode queueRange}). */
  readonly #ownerRange: IRangeRequest;
  /**
   * The two newest keys that may be queue entries, keys only: read in the
   * put's own transaction, the first is ours and the second the candidate
   * predecessor a waiter watches, without a read of its own.
   */
  readonly #newestRange: IRangeRequest;

  constructor(
    calls: Calls,
    hub: WatchHub,
    alarms: Alarms,
    session: Session,
    name: string,
    retryInterval: number,
  ) {
    this.#calls = calls;
    this.#hub = hub;
    this.#alarms = alarms;
    this.#session = session;
    this.#name = name;
    this.#prefix = Buffer.from(`${name}/`);
    this.#key = `${name}/${session.hex}`;
    this.#retryInterval = retryInterval;
    this.#ownerRange = { ...queueRange(this.#prefix), limit: 1 };
    this.#newestRange = {
      ...queueRange(this.#prefix),
      sort_order: "Descend",
      limit: 2,
      keys_only: true,
    };
  }

  /**
   * `first`, a key a transaction read from the owner range (the owner, or
   * an entry before ours, or the predecessor), if it is a queue entry. If it is another lock's key,
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
  async #put(signal: AbortSignal): Promise<Attempt> {
    const key = Buffer.from(this.#key);
    for (let i = 0;; i++) {
      const sending = this.#calls.txn({
        compare: [{ key, target: "Create", result: "Equal", create_revision: 0 }],
        // One range, not an owner range beside it: the key before ours says
        // whether we own the lock (none before ours) and, if not, whom to wait
        // for. Another lock's key there (a lock named NAME/x) sends run() to
        // read the owner range in pages. Uncontended, a cycle cost ~120 µs of
        // client CPU less (a range less to encode, a key and its value less to
        // decode: ~1,310 against ~1,430 µs per put and delete, measured).
        success: [
          { request_put: { key, value: EMPTY, lease: this.#session.id } },
          { request_range: this.#newestRange },
        ],
        failure: [{ request_range: { key } }],
      });
      let response: Awaited<typeof sending>;
      try {
        // The caller's deadline decides when it gives up; the put itself runs
        // on to its own bound, so its answer says what to take back.
        response = await abortable(sending, signal);
      } catch (error) {
        this.#compensate(sending);
        throw error;
      }
      if (response.succeeded) {
        const revision = response.header.revision;
        const [ours, before] = response.responses[1].response_range.kvs;
        // Ours is the newest key (it was created in this transaction).
        return { revision, first: before ?? ours, before, header: response.header };
      }
      const stale = response.responses[0].response_range.kvs[0];
      if (stale === undefined || i >= 2) {
        throw new LockError(
          `Cannot acquire lock ${JSON.stringify(this.#name)}: the key keeps changing`,
        );
      }
      const deleting = fencedDelete(this.#calls, this.#key, stale.create_revision);
      deleting.catch(() => this.#session.orphan(this.#key, stale.create_revision));
      await abortable(deleting, signal);
    }
  }

  /**
   * Takes back a put that was given up on: at its revision once its answer
   * comes, or, if none comes (etcd may still apply it), by the session's
   * cleanup of whatever key of ours is left once no acquisition uses it.
   */
  #compensate(sending: Promise<{ succeeded: boolean; header: IResponseHeader }>) {
    sending.then(
      (response) => {
        if (response.succeeded) void this.#delete(response.header.revision);
      },
      () => this.#session.orphan(this.#key),
    );
  }

  /** Runs the acquisition. Leaves nothing behind when it rejects or returns undefined. */
  async run(
    wait: boolean,
    signal: AbortSignal,
  ): Promise<{ revision: string; header: IResponseHeader } | undefined> {
    const attempt = await this.#put(signal);
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
      const header = await this.#waitTurn(
        attempt.revision,
        signal,
        attempt.before,
        attempt.header.revision,
      );
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
  async #waitTurn(
    revision: string,
    signal: AbortSignal,
    candidate: IKeyValue | undefined,
    readAt: string,
  ): Promise<IResponseHeader> {
    const before = String(BigInt(revision) - 1n);
    const ours = Buffer.from(this.#key);
    // First, the predecessor the put's transaction read (our key was there
    // then): no read of its own before the first wait.
    const first = await this.#whileWaiting(signal, () => this.#entry(candidate, "Descend", before));
    if (first !== undefined) await this.#waitDelete(first, signal, readAt);
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
      await this.#waitDelete(predecessor, signal, response.header.revision);
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
   * `readAt` is the store revision `kv` was seen at: a first watch that etcd
   * creates at that same revision has missed nothing, and needs no read.
   */
  async #waitDelete(kv: IKeyValue, signal: AbortSignal, readAt?: string): Promise<void> {
    const stop = new AbortController();
    const onLost = () =>
      stop.abort(
        new LockLostError(
          this.#name,
          `the session lease ended while waiting: ${this.#session.signal.reason}`,
        ),
      );
    const aborted = () => stop.abort(signal.reason);
    const unfollow = onAbort(signal, aborted);
    if (signal.aborted) aborted();
    const forget = this.#session.whenLost(onLost);
    let watch: Watch | undefined;
    // Whether the current watch is in place (etcd confirmed it): the poll
    // then only covers a stream that went silent, and backs off.
    let watching = false;
    try {
      const gone = new Promise<void>((resolve) => {
        const start = () => {
          watching = false;
          if (stop.signal.aborted) return;
          const seenAt = readAt;
          readAt = undefined;
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
          w.created.then((revision) => {
            // The watch is in place: a read now sees any delete it missed,
            // unless nothing has changed in the store since `kv` was seen.
            if (watch !== w) return;
            watching = true;
            if (revision === seenAt) return;
            this.#stillThere(kv).then((there) => there || resolve(), () => {});
          }, () => {}); // refused: the poll below carries on
        };
        start();
      });
      const polled = (async () => {
        // Every retryInterval while no watch is in place; with one, twice as
        // long each time, up to POLL_WATCHED: a hundred waiting processes
        // must not read etcd ten times a second each (a poll cost a waiting
        // Deno process 2.6 ms of CPU; 26 ms a second at 100 ms).
        let interval = this.#retryInterval;
        for (;;) {
          interval = watching
            ? Math.min(interval * 2, Math.max(this.#retryInterval, POLL_WATCHED))
            : this.#retryInterval;
          await delay(interval, stop.signal);
          if (!(await this.#stillThere(kv).catch(() => true))) return;
        }
      })();
      await abortable(Promise.race([gone, polled]), stop.signal);
    } finally {
      stop.abort();
      forget();
      unfollow();
      watch?.cancel();
    }
  }

  async #stillThere(kv: IKeyValue): Promise<boolean> {
    const response = await this.#calls.range({ key: kv.key });
    const now = response.kvs[0];
    return now !== undefined && now.create_revision === kv.create_revision;
  }
}

/** What a held lock keeps of its driver. */
interface HoldContext {
  calls: Calls;
  hub: WatchHub;
  alarms: Alarms;
  retryInterval: number;
  /** Whether the session is the locker's shared one (else the lock's own, closed on release). */
  shared: boolean;
}

/**
 * A held etcd lock: its signal aborts when the session is lost or the key is
 * deleted behind our back (watched from the revision after the grant's). A
 * class with fields, not closures: it is what each held lock costs in
 * memory, and it is the watch's handlers and the session's holder itself.
 */
class EtcdHold implements Grant, WatchHandlers, SessionHolder {
  readonly token: bigint;
  readonly loss = new Loss();
  readonly session: Session;
  /** The lock's name, for messages. */
  readonly #name: string;
  /** Our queue key, `name/leaseHex`. */
  readonly key: string;
  /** The create revision of our key: it is ours while it has this one. */
  readonly revision: string;
  readonly #context: HoldContext;
  /** The revision to watch from next. */
  #from: string;
  #ended = false;
  /** Whether the session still counts our key as in use. */
  #using = true;
  #watch?: Watch;
  #retry?: ReturnType<typeof setTimeout>;
  #start?: Alarm;

  constructor(
    context: HoldContext,
    session: Session,
    name: string,
    key: string,
    revision: string,
    header: IResponseHeader,
  ) {
    this.token = BigInt(revision);
    this.session = session;
    this.#name = name;
    this.key = key;
    this.revision = revision;
    this.#context = context;
    this.#from = String(BigInt(header.revision) + 1n);
    session.hold(this);
    // The watch starts WATCH_DELAY after the grant, from the revision after
    // it, so it still sees every event since: a lock released before then
    // (most are, uncontended) costs no watch create and cancel on the
    // stream, nor etcd's work for them. A deletion in the first moments
    // aborts the signal that much later.
    this.#start = context.alarms.add(performance.now() + WATCH_DELAY, () => {
      this.#start = undefined;
      if (!this.#ended) this.#watchFrom();
    });
  }

  check(): void {
    this.session.checkDeadline();
  }

  /** The session's lease is gone. */
  sessionLost(): void {
    this.#lose(new LockLostError(this.#name, String(this.session.signal.reason)));
  }

  onEvents(events: IEvent[]): void {
    for (const event of events) {
      if (event.type === "Delete") {
        this.#lose(new LockLostError(this.#name, "its key was deleted"));
        // Perhaps with its whole lease (revoked): the other keys on it
        // learn of it now rather than at the next keepalive.
        this.session.verify();
      } else if (event.kv.create_revision !== this.revision) {
        this.#lose(new LockLostError(this.#name, "its key was replaced"));
      }
    }
  }

  /** etcd cancelled the watch (compacted history): read the key, watch again. */
  onError(): void {
    this.#resync();
  }

  /** etcd refused the watch: the same. (A hub closed under a held lock rejects nothing here.) */
  onRefused(): void {
    this.#resync();
  }

  async release(): Promise<void> {
    this.#end();
    const { calls, shared } = this.#context;
    try {
      if (shared) {
        try {
          await fencedDelete(calls, this.key, this.revision);
        } catch (error) {
          this.session.orphan(this.key, this.revision);
          throw calls.error(error, `Cannot release lock ${JSON.stringify(this.#name)}`);
        }
      } else {
        await this.session.close();
      }
    } finally {
      this.#unuse();
    }
  }

  #unuse() {
    if (!this.#using) return;
    this.#using = false;
    this.session.unuse(this.key);
  }

  #end() {
    this.#ended = true;
    this.#context.alarms.cancel(this.#start);
    this.session.forget(this);
    clearTimeout(this.#retry);
    this.#watch?.cancel();
    this.#watch = undefined;
  }

  #lose(reason: LockLostError) {
    if (this.#ended) return;
    this.#end();
    this.#unuse();
    this.loss.lose(reason);
  }

  /**
   * Watches our key from `#from`, the revision after the one we last saw it
   * at, so nothing in between is missed. The hub resumes it after a stream
   * break; if etcd cancels or refuses it, read the key and start again.
   */
  #watchFrom() {
    this.#watch = this.#context.hub.watch(Buffer.from(this.key), this.#from, this);
  }

  #resync() {
    this.#watch = undefined;
    if (this.#ended) return;
    this.#retry = setTimeout(async () => {
      try {
        const response = await this.#context.calls.range({ key: Buffer.from(this.key) });
        const now = response.kvs[0];
        if (now === undefined) {
          return this.#lose(new LockLostError(this.#name, "its key was deleted"));
        }
        if (now.create_revision !== this.revision) {
          return this.#lose(new LockLostError(this.#name, "its key was replaced"));
        }
        if (this.#ended) return;
        this.#from = String(BigInt(response.header.revision) + 1n);
        this.#watchFrom();
      } catch {
        this.#resync();
      }
    }, this.#context.retryInterval);
  }
}

/** The etcd driver: sessions, acquisitions, and the client reference. */
class EtcdDriver implements Driver {
  readonly #calls: Calls;
  readonly #settings: LeaseSettings;
  readonly #onClose: () => Promise<void>;
  #shared?: Promise<Session>;
  /** The shared session once granted (check `alive` before use). */
  #live?: Session;
  readonly #sessions = new Set<Session>();
  /** Grants in flight, each settled once a late one is revoked: close() waits for them. */
  readonly #granting = new Set<Promise<unknown>>();
  #closed = false;
  readonly #hub: WatchHub;
  /** The delayed watch starts of the held locks, on one timer. */
  readonly #alarms = new Alarms();
  /** What every held lock keeps of this driver: one object for all of them. */
  readonly #holdContext: HoldContext;

  constructor(calls: Calls, settings: LeaseSettings, onClose: () => Promise<void>) {
    this.#calls = calls;
    this.#settings = settings;
    this.#onClose = onClose;
    this.#hub = new WatchHub(calls.client);
    this.#holdContext = {
      calls,
      hub: this.#hub,
      alarms: this.#alarms,
      retryInterval: settings.retryInterval,
      // With autoRenew every lock is on the locker's shared session.
      shared: settings.autoRenew,
    };
  }

  #grant(): Promise<Session> {
    const granting = (async () => {
      const session = await Session.grant(
        this.#calls,
        this.#settings.ttl,
        this.#settings.retryInterval,
      );
      if (this.#closed) {
        // close() came while etcd granted it: it must not live on, renewed.
        await session.close();
        throw new LockClosedError("Cannot grant an etcd lease");
      }
      this.#sessions.add(session);
      session.whenLost(() => this.#sessions.delete(session));
      return session;
    })();
    const settled = granting.catch(() => {});
    this.#granting.add(settled);
    settled.then(() => this.#granting.delete(settled));
    return granting;
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
    next.then((session) => {
      if (this.#shared === next) this.#live = session;
    }, () => {
      if (this.#shared === next) this.#shared = undefined;
    });
    return next;
  }

  async acquire(key: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined> {
    const action = `Cannot acquire lock ${JSON.stringify(key)}`;
    const shared = this.#settings.autoRenew;
    let session: Session | undefined;
    let done: (() => void) | undefined;
    try {
      // The hot path: the shared session, alive, without an await.
      session = shared && this.#live?.alive ? this.#live : undefined;
      if (session === undefined) {
        const granting = shared ? this.#sharedSession() : this.#grant();
        session = await abortable(granting, signal).catch((error) => {
          // An own lease granted after this call gave up must not live on.
          if (!shared) granting.then((late) => late.close(), () => {});
          throw error;
        });
      }
      let acquisition!: Acquisition;
      let won: Awaited<ReturnType<Acquisition["run"]>>;
      let full = `${key}/${session.hex}`;
      done = session.use(full);
      const started = performance.now();
      for (let attempt = 0;; attempt++) {
        acquisition = new Acquisition(
          this.#calls,
          this.#hub,
          this.#alarms,
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
          done();
          if (!shared) await session.close();
          session = await abortable(shared ? this.#sharedSession() : this.#grant(), signal);
          full = `${key}/${session.hex}`;
          done = session.use(full);
        }
      }
      if (won === undefined) {
        done();
        if (!shared) await session.close();
        return undefined;
      }
      const own = session;
      if (!shared) {
        // Without autoRenew the lease lasts ttl from the acquisition: refresh it
        // once if waiting took a while, then let it run out.
        await own.stopRenewing(performance.now() - started > 50);
      }
      // The held lock keeps what it needs, not the acquisition: a held lock's
      // memory is what 10,000 of them cost. It takes over the key's use.
      done = undefined;
      return new EtcdHold(this.#holdContext, own, key, full, won.revision, won.header);
    } catch (error) {
      done?.();
      if (!shared) await session?.close();
      if (signal.aborted && error === signal.reason) throw error;
      throw this.#calls.error(error, action);
    }
  }

  status(key: string): Promise<LockStatus> {
    return readStatus(this.#calls, key);
  }

  /**
   * Gives back every grant at `close()`: revokes each session lease that
   * holds keys (one request deletes every key on it); the grants of a session
   * whose revoke etcd did not confirm are released one by one, fenced, so one
   * failure does not keep the rest. Rejects with the first release that failed.
   */
  async releaseAll(grants: Grant[]): Promise<void> {
    const bySession = new Map<Session, EtcdHold[]>();
    for (const held of grants) {
      if (!(held instanceof EtcdHold)) continue;
      const same = bySession.get(held.session);
      if (same) same.push(held);
      else bySession.set(held.session, [held]);
    }
    const alone: EtcdHold[] = [];
    await settleEach([...bySession], CLOSE_CONCURRENCY, async ([session, held]) => {
      try {
        await session.revoke();
      } catch {
        alone.push(...held);
      }
    });
    const failures = await settleEach(
      alone,
      CLOSE_CONCURRENCY,
      (held) => fencedDelete(this.#calls, held.key, held.revision),
    );
    if (failures.length > 0) {
      throw this.#calls.error(
        failures[0],
        `Cannot release ${failures.length} of ${grants.length} locks`,
      );
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    // A grant in flight is answered (or gives up at its deadline) and revoked first.
    await Promise.all(this.#granting);
    await settleEach([...this.#sessions], CLOSE_CONCURRENCY, (session) => session.close());
    this.#alarms.stop();
    await this.#hub.close();
    this.#calls.stop();
    await this.#onClose();
  }
}

/** Who holds the lock `name` (the oldest queue key), its lease's time left, and the queue. */
async function readStatus(calls: Calls, name: string): Promise<LockStatus> {
  try {
    const prefix = Buffer.from(`${name}/`);
    const response = await calls.range(queueRange(prefix));
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

/** How many revokes or deletes `close()` keeps in flight at once. */
const CLOSE_CONCURRENCY = 32;

type Policy = NonNullable<NonNullable<IOptions["faultHandling"]>["global"]>;

/** A cockatiel policy that runs the call once, as it is: no retry, no breaker. */
const NO_POLICY = {
  execute: async <T>(
    fn: (context: { signal: AbortSignal }) => PromiseLike<T> | T,
    signal: AbortSignal = new AbortController().signal,
  ): Promise<T> => await fn({ signal }),
  onSuccess: () => ({ dispose() {} }),
  onFailure: () => ({ dispose() {} }),
} as unknown as Policy;

/** The npm:etcd3 options for a connection config. */
function clientOptions(config: ConnectionConfig): IOptions {
  const scheme = config.tls === false ? "http" : "https";
  const options: IOptions = {
    hosts: config.endpoints.map((endpoint) =>
      /^https?:\/\//.test(endpoint) ? endpoint : `${scheme}://${endpoint}`
    ),
    dialTimeout: config.dialTimeout,
    // Retries are this library's decision, made under each call's deadline
    // (see Calls): npm:etcd3's global retry resends what a caller gave up on,
    // and its per-member circuit breaker shuts a member out for 5 s after
    // three failures (a 1 s restart then loses every lock with a ttl under
    // about 8 s) and, with auth, waits on itself when it retries a forgotten
    // token inside its half-open trial.
    faultHandling: { host: () => NO_POLICY, global: NO_POLICY },
  };
  if (config.username !== "" || config.password !== "") {
    options.auth = {
      username: config.username,
      password: config.password,
      // The password-for-token exchange is bounded like a connect.
      callOptions: () => ({ deadline: new Date(Date.now() + config.dialTimeout) }),
    };
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
      // A little after the timer, so the timer's plain message decides.
      client.maintenance.status({ deadline: new Date(Date.now() + config.dialTimeout + 250) }),
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
