/**
 * A distributed lock for TypeScript: mutual exclusion per key across
 * processes and machines, on etcd (the default), Redis, or in memory, with
 * fencing tokens and leases that renew themselves and say when they are lost.
 *
 * {@linkcode New} is the one-line set-up: it validates its options at once and
 * connects on first use, loading only the backend you chose.
 *
 * @example Hold a lock for a block
 * ```ts
 * import { New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * {
 *   await using lease = await locker.lock("/jobs/a", { timeout: 2_000 });
 *   console.log(lease.token); // a bigint that grows with every holder
 * }
 * await locker.close();
 * ```
 *
 * @module
 */

import { DriverLocker, type Locker } from "./_locker.ts";
import { type Options, resolveOptions } from "./_options.ts";

export type { Lease, Locker, LockOptions, LockStatus } from "./_locker.ts";
export type { Backend, Options, RedisMode, TlsOptions } from "./_options.ts";
export {
  LockAuthError,
  LockClosedError,
  LockConnectionError,
  LockError,
  LockLostError,
  LockNotHeldError,
  LockPermissionError,
  LockReplicationError,
  LockTimeoutError,
} from "./errors.ts";

/**
 * Creates a {@linkcode Locker}. A deliberate Go-style constructor, kept for
 * users of the Go design's `lock.New(nil)`: with no options it gives etcd at
 * `127.0.0.1:2379`, a 10 s lease and automatic renewal.
 *
 * It is synchronous and never touches the network: options are checked at
 * once, and the connection is made on first use (an unreachable server
 * rejects that first call within `dialTimeout`). Lockers with equal
 * connection settings share one client.
 *
 * @param options The settings; every field is optional.
 * @returns A locker. Close it when done.
 * @throws {TypeError} An unknown option, or one of the wrong type; the message
 * names the field and what was received.
 * @throws {RangeError} A number out of range.
 *
 * @example etcd at 127.0.0.1:2379, as the Go design's lock.New(nil)
 * ```ts ignore
 * import { New } from "@genesis/lock";
 *
 * const locker = New(); // nothing is connected until the first call
 * await using lease = await locker.lock("/jobs/nightly-report");
 * ```
 *
 * @example A memory locker with a 30 s lease
 * ```ts
 * import { New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory", ttl: 30_000 });
 * await locker.withLock("/jobs/nightly-report", async (lease) => {
 *   console.log(`holding ${lease.key} with token ${lease.token}`);
 * });
 * await locker.close();
 * ```
 */
export function New(options?: Options): Locker {
  const resolved = resolveOptions(options);
  // Literal dynamic imports: a user pays only for the backend in use.
  switch (resolved.backend) {
    case "memory":
      return new DriverLocker(async (owner) =>
        (await import("./backends/memory.ts")).openSharedDriver(resolved, owner)
      );
    case "etcd":
      return new DriverLocker(async (owner) =>
        (await import("./backends/etcd.ts")).openSharedDriver(resolved, owner)
      );
    case "redis":
      return new DriverLocker(async (owner) =>
        (await import("./backends/redis.ts")).openSharedDriver(resolved, owner)
      );
  }
}
