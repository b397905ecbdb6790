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

import type { Redis } from "ioredis";
import { type ClientRef, Connector } from "../connector.ts";
import { type Driver, DriverLocker, type Locker } from "../_locker.ts";
import { type Options, type ResolvedOptions, resolveOptions } from "../_options.ts";
import { subscriberOf } from "./redis/_connection.ts";
import { RedisDriver } from "./redis/_driver.ts";
import { Instances } from "./redis/_instances.ts";
import { Subscriptions } from "./redis/_subscriptions.ts";
import { connect, disconnect } from "./redis/_topologies.ts";
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
