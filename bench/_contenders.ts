// The locks the benchmarks compare, behind one small interface: the raw-client
// floors, @genesis/lock, and the peers a user would weigh it against. Shared
// by the `deno bench` files and by compare.ts (Deno and Bun).
//
// A floor is the least a safe lock must send per cycle, with no library
// layer: on Redis `SET key token NX PX ttl` and a compare-and-delete script
// called by its SHA (ioredis `defineCommand` sends EVALSHA, and EVAL only
// once, on NOSCRIPT); on etcd one put-if-absent transaction on a lease granted
// beforehand and one delete fenced by the put's revision. A floor never waits
// for a notification: under contention it retries at once, the fastest any
// polling lock could go.

import { Buffer } from "node:buffer";
import { Etcd3, EtcdLockFailedError } from "etcd3";
import { Redis } from "ioredis";
import { Mutex } from "redis-semaphore";
import { ExecutionError, Redlock } from "@sesamecare-oss/redlock";
import { type Locker, New } from "../mod.ts";
import { ACQUIRE, keysOf, RELEASE } from "../backends/redis/_scripts.ts";

/** A held lock of any contender. */
export interface Held {
  release(): Promise<void>;
}

/** One lock implementation, on one client, as the benchmarks drive it. */
export interface Contender {
  readonly name: string;
  /** Waits until `key` is held (a peer without waiting is retried at once). */
  lock(key: string): Promise<Held>;
  /** One attempt: the held lock, or undefined when someone else holds `key`. */
  tryLock(key: string): Promise<Held | undefined>;
  close(): Promise<void>;
}

/** The contenders of one backend, by short name, in table order. */
export const CONTENDERS = {
  redis: ["floor", "scripts", "ours", "redis-semaphore", "redlock", "redlock-10ms"],
  etcd: ["floor", "ours", "etcd3-lock"],
} as const;

/** The backends the benchmarks know. */
export type BenchBackend = keyof typeof CONTENDERS;

/** What each short name stands for, as the tables print it. */
export const LABELS: Record<string, string> = {
  floor: "raw-client floor",
  scripts: "our two scripts on raw ioredis (no library)",
  ours: "@genesis/lock",
  "redis-semaphore": "redis-semaphore Mutex",
  redlock: "@sesamecare-oss/redlock (defaults)",
  "redlock-10ms": "@sesamecare-oss/redlock (10 ms retry)",
  "etcd3-lock": "npm etcd3 Lock",
  "go-mutex": "Go concurrency.Mutex (reference)",
};

/** The lease every contender asks for, so no one renews more than another. */
export const TTL_MS = 10_000;

const COMPARE_AND_DELETE =
  "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

type FloorRedis = Redis & { floorRelease(key: string, token: string): Promise<number> };

function redisClient(endpoint: string): Redis {
  const [host, port] = endpoint.split(":");
  return new Redis({ host, port: Number(port) });
}

/** The Redis floor: SET NX PX, then compare-and-delete by SHA. */
function redisFloor(endpoint: string): Contender {
  const redis = redisClient(endpoint) as FloorRedis;
  redis.defineCommand("floorRelease", { numberOfKeys: 1, lua: COMPARE_AND_DELETE });
  const tryLock = async (key: string): Promise<Held | undefined> => {
    const token = crypto.randomUUID();
    if ((await redis.set(key, token, "PX", TTL_MS, "NX")) !== "OK") return undefined;
    return { release: async () => void await redis.floorRelease(key, token) };
  };
  return {
    name: "floor",
    lock: async (key) => {
      for (;;) {
        const held = await tryLock(key);
        if (held) return held;
      }
    },
    tryLock,
    close: async () => void await redis.quit(),
  };
}

type ScriptsRedis = Redis & {
  ourAcquire(lock: string, fence: string, token: string, ttl: number): Promise<number>;
  ourRelease(...args: (string | number)[]): Promise<number>;
};

/**
 * Our own acquire and release scripts on a raw ioredis client, by SHA, with
 * the arguments our uncontended path sends (a fenced grant; a release that
 * would hand the lock to the queue's first waiter): what the protocol costs
 * with no library layer, so the gap from the floor splits into the
 * protocol's share and the library's. It never waits: under contention it
 * retries at once, as the floor does.
 */
function redisScripts(endpoint: string): Contender {
  const redis = redisClient(endpoint) as ScriptsRedis;
  redis.defineCommand("ourAcquire", { numberOfKeys: 2, lua: ACQUIRE });
  redis.defineCommand("ourRelease", { numberOfKeys: 3, lua: RELEASE });
  const tryLock = async (name: string): Promise<Held | undefined> => {
    const keys = keysOf(name);
    const token = crypto.randomUUID();
    if (!(await redis.ourAcquire(keys.lock, keys.fence, token, TTL_MS) > 0)) return undefined;
    return {
      release: async () =>
        void await redis.ourRelease(
          keys.lock,
          keys.queue,
          keys.fence,
          token,
          keys.channel,
          "",
          TTL_MS,
          "q",
          "",
        ),
    };
  };
  return {
    name: "scripts",
    lock: async (key) => {
      for (;;) {
        const held = await tryLock(key);
        if (held) return held;
      }
    },
    tryLock,
    close: async () => void await redis.quit(),
  };
}

/** The etcd floor: put-if-absent on a pre-granted lease, delete fenced by its revision. */
async function etcdFloor(endpoint: string): Promise<Contender> {
  const etcd = new Etcd3({ hosts: `http://${endpoint}` });
  const { ID: lease } = await etcd.leaseClient.leaseGrant({ TTL: TTL_MS / 1000, ID: 0 });
  const tryLock = async (name: string): Promise<Held | undefined> => {
    const key = Buffer.from(name);
    const put = await etcd.kv.txn({
      compare: [{ key, target: "Create", result: "Equal", create_revision: 0 }],
      success: [{ request_put: { key, value: Buffer.alloc(0), lease } }],
      failure: [],
    });
    if (!put.succeeded) return undefined;
    const revision = put.header.revision;
    return {
      release: async () =>
        void await etcd.kv.txn({
          compare: [{ key, target: "Mod", result: "Equal", mod_revision: revision }],
          success: [{ request_delete_range: { key } }],
          failure: [],
        }),
    };
  };
  return {
    name: "floor",
    lock: async (key) => {
      for (;;) {
        const held = await tryLock(key);
        if (held) return held;
      }
    },
    tryLock,
    close: async () => {
      await etcd.leaseClient.leaseRevoke({ ID: lease });
      etcd.close();
    },
  };
}

/** @genesis/lock through `New()`, as a user sets it up. */
function ours(backend: BenchBackend, endpoint: string, options: { dialTimeout?: number } = {}) {
  const locker: Locker = New({ backend, endpoints: [endpoint], ttl: TTL_MS, ...options });
  return {
    name: "ours",
    locker,
    lock: (key: string) => locker.lock(key),
    tryLock: (key: string) => locker.tryLock(key),
    close: () => locker.close(),
  };
}

/** redis-semaphore's Mutex: one object per acquisition, its own refresh timer each. */
function semaphore(endpoint: string): Contender {
  const redis = redisClient(endpoint);
  // Its tryAcquire() retries until acquireTimeout: one attempt is a limit of 1.
  const make = (key: string, acquireAttemptsLimit = Infinity) =>
    new Mutex(redis, key, { lockTimeout: TTL_MS, acquireTimeout: 600_000, acquireAttemptsLimit });
  return {
    name: "redis-semaphore",
    lock: async (key) => {
      const mutex = make(key);
      await mutex.acquire();
      return { release: () => mutex.release() };
    },
    tryLock: async (key) => {
      const mutex = make(key, 1);
      return (await mutex.tryAcquire()) ? { release: () => mutex.release() } : undefined;
    },
    close: async () => void await redis.quit(),
  };
}

/**
 * Redlock on one instance. With its defaults (200 ms retry, 10 retries) a
 * contended acquire can fail; the benchmark then asks again, as a caller
 * that must have the lock would.
 */
function redlock(endpoint: string, retryDelay?: number): Contender {
  const redis = redisClient(endpoint);
  const settings = retryDelay === undefined ? {} : { retryDelay, retryJitter: retryDelay / 2 };
  const quorum = new Redlock([redis], settings);
  const once = new Redlock([redis], { retryCount: 0 });
  return {
    name: retryDelay === undefined ? "redlock" : "redlock-10ms",
    lock: async (key) => {
      for (;;) {
        try {
          const lock = await quorum.acquire([key], TTL_MS);
          return { release: async () => void await lock.release() };
        } catch (error) {
          if (!(error instanceof ExecutionError)) throw error;
        }
      }
    },
    tryLock: async (key) => {
      try {
        const lock = await once.acquire([key], TTL_MS);
        return { release: async () => void await lock.release() };
      } catch (error) {
        if (!(error instanceof ExecutionError)) throw error;
        return undefined;
      }
    },
    close: async () => void await redis.quit(),
  };
}

/** npm etcd3's own Lock: a lease grant, a put and a revoke per acquisition; it never waits. */
function etcd3Lock(endpoint: string): Contender {
  const etcd = new Etcd3({ hosts: `http://${endpoint}` });
  const tryLock = async (key: string): Promise<Held | undefined> => {
    const lock = etcd.lock(key).ttl(TTL_MS / 1000);
    try {
      await lock.acquire();
    } catch (error) {
      if (!(error instanceof EtcdLockFailedError)) throw error;
      return undefined;
    }
    return { release: () => lock.release() };
  };
  return {
    name: "etcd3-lock",
    lock: async (key) => {
      for (;;) {
        const held = await tryLock(key);
        if (held) return held;
      }
    },
    tryLock,
    close: () => Promise.resolve(etcd.close()),
  };
}

/**
 * Opens the contender `name` of `backend` against `endpoint`. `options`
 * reaches our locker only (a different `dialTimeout` gives it a client of its
 * own, so a holder in the same process is a real remote holder).
 */
export function open(
  backend: BenchBackend,
  name: string,
  endpoint: string,
  options: { dialTimeout?: number } = {},
): Promise<Contender> {
  switch (`${backend}/${name}`) {
    case "redis/floor":
      return Promise.resolve(redisFloor(endpoint));
    case "redis/scripts":
      return Promise.resolve(redisScripts(endpoint));
    case "etcd/floor":
      return etcdFloor(endpoint);
    case "redis/ours":
    case "etcd/ours":
      return Promise.resolve(ours(backend, endpoint, options));
    case "redis/redis-semaphore":
      return Promise.resolve(semaphore(endpoint));
    case "redis/redlock":
      return Promise.resolve(redlock(endpoint));
    case "redis/redlock-10ms":
      return Promise.resolve(redlock(endpoint, 10));
    case "etcd/etcd3-lock":
      return Promise.resolve(etcd3Lock(endpoint));
  }
  throw new RangeError(`Unknown contender "${name}" for backend "${backend}"`);
}

/** The key a contender uses for lock `name`, so contenders never share a key. */
export function keyOf(contender: string, name: string): string {
  return `/bench/${contender}/${name}`;
}
