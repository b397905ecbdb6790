/**
 * The errors of `@genesis/lock`. Every error the library raises on purpose is
 * a {@linkcode LockError}; callers branch on the subclasses. Bad options and
 * bad keys are the standard `TypeError` or `RangeError`, raised at once.
 *
 * @example Branch on a lost lock
 * ```ts
 * import { LockLostError } from "@genesis/lock";
 *
 * function explain(reason: unknown): string {
 *   return reason instanceof LockLostError ? "lost" : "other";
 * }
 * explain(new LockLostError("/jobs/a", "expired"));
 * ```
 *
 * @module
 */

/**
 * The base of every error this library raises on purpose. Its `name` is the
 * name of the concrete class, so logs say `LockLostError`, not `Error`.
 *
 * @example Catch any lock error
 * ```ts
 * import { LockError, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * try {
 *   await locker.unlock("/never/locked");
 * } catch (error) {
 *   if (!(error instanceof LockError)) throw error;
 * }
 * await locker.close();
 * ```
 */
export class LockError extends Error {
  /**
   * Creates a lock error.
   *
   * @param message The message, in sentence case with no trailing period.
   * @param options The standard error options; `cause` keeps the client's error.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * The reason a held lease's `signal` aborts: the lease expired before it
 * could be renewed, or its key was deleted or taken over behind its back.
 * Work guarded by the lock must stop; storage that checks fencing tokens will
 * already reject this holder's writes.
 *
 * @example React to a lost lock
 * ```ts
 * import { LockLostError, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory", ttl: 50, autoRenew: false });
 * const lease = await locker.lock("/jobs/a");
 * await new Promise((resolve) => setTimeout(resolve, 80));
 * console.log(lease.signal.reason instanceof LockLostError); // true
 * await locker.close();
 * ```
 */
export class LockLostError extends LockError {
  /** The key whose lock was lost. */
  readonly key: string;

  /**
   * Creates a lock-lost error.
   *
   * @param key The key whose lock was lost.
   * @param detail Why it was lost, such as `"lease expired"`.
   * @param options The standard error options; `cause` keeps the client's error.
   */
  constructor(key: string, detail: string, options?: ErrorOptions) {
    super(`Lost lock ${JSON.stringify(key)}: ${detail}`, options);
    this.key = key;
  }
}

/**
 * Raised by `Locker.unlock(key)` when this locker holds no lock on `key`.
 * The lock of any other holder is never touched.
 *
 * @example Unlock a key that is not held
 * ```ts
 * import { LockNotHeldError, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * const error = await locker.unlock("/jobs/a").catch((e) => e);
 * console.log(error instanceof LockNotHeldError); // true
 * await locker.close();
 * ```
 */
export class LockNotHeldError extends LockError {
  /** The key this locker holds no lock on. */
  readonly key: string;

  /**
   * Creates a not-held error.
   *
   * @param key The key this locker holds no lock on.
   */
  constructor(key: string) {
    super(`Cannot unlock ${JSON.stringify(key)}: this locker holds no lock on it`);
    this.key = key;
  }
}

/**
 * The reason `lock()` rejects when its `timeout` option runs out before the
 * lock is acquired. Nothing is left behind on the server.
 *
 * @example Give up after a while
 * ```ts
 * import { LockTimeoutError, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * const held = await locker.lock("/jobs/a");
 * const error = await locker.lock("/jobs/a", { timeout: 10 }).catch((e) => e);
 * console.log(error instanceof LockTimeoutError); // true
 * await held.release();
 * await locker.close();
 * ```
 */
export class LockTimeoutError extends LockError {
  /** The key that could not be acquired in time. */
  readonly key: string;
  /** The timeout that ran out, in milliseconds. */
  readonly timeout: number;

  /**
   * Creates a timeout error.
   *
   * @param key The key that could not be acquired in time.
   * @param timeout The timeout that ran out, in milliseconds.
   */
  constructor(key: string, timeout: number) {
    super(`Cannot acquire lock ${JSON.stringify(key)}: timed out after ${timeout} ms`);
    this.key = key;
    this.timeout = timeout;
  }
}

/**
 * Raised by any call on a locker after its `close()`, and the reason a wait
 * still pending when `close()` is called rejects.
 *
 * @example Use after close
 * ```ts
 * import { LockClosedError, New } from "@genesis/lock";
 *
 * const locker = New({ backend: "memory" });
 * await locker.close();
 * const error = await locker.lock("/jobs/a").catch((e) => e);
 * console.log(error instanceof LockClosedError); // true
 * ```
 */
export class LockClosedError extends LockError {
  /**
   * Creates a closed error.
   *
   * @param action What was attempted, such as `Cannot acquire lock "/jobs/a"`.
   */
  constructor(action: string) {
    super(`${action}: the locker is closed`);
  }
}

/**
 * The server could not be reached within `dialTimeout`, or the connection
 * failed. The client's error is kept as `cause`, scrubbed of secrets.
 *
 * @example Report an unreachable server
 * ```ts
 * import { LockConnectionError } from "@genesis/lock";
 *
 * const error = new LockConnectionError("Cannot connect to etcd at 127.0.0.1:1");
 * console.log(error.name); // "LockConnectionError"
 * ```
 */
export class LockConnectionError extends LockError {}

/**
 * The server rejected the credentials. Fatal: the library never retries it.
 *
 * @example Report bad credentials
 * ```ts
 * import { LockAuthError } from "@genesis/lock";
 *
 * const error = new LockAuthError("Cannot authenticate to etcd as \"app\"");
 * console.log(error.name); // "LockAuthError"
 * ```
 */
export class LockAuthError extends LockError {}

/**
 * The server accepted the credentials but denied access to the lock's keys.
 *
 * @example Report a denied key
 * ```ts
 * import { LockPermissionError } from "@genesis/lock";
 *
 * const error = new LockPermissionError("Cannot acquire lock \"/a\": permission denied");
 * console.log(error.name); // "LockPermissionError"
 * ```
 */
export class LockPermissionError extends LockError {}

/**
 * Redis with `waitReplicas`: the server granted the lock, but fewer replicas
 * than asked acknowledged it within the call's deadline, so it was given back
 * and never held. A failover then could have lost it. `tryLock()` rejects
 * with it; `lock()` tries again until its signal or timeout.
 *
 * @example Tell an unreplicated grant from a busy lock
 * ```ts
 * import { LockReplicationError } from "@genesis/lock";
 *
 * const error = new LockReplicationError(
 *   'Cannot acquire lock "/a": 0 of 1 replicas acknowledged it within 50 ms',
 *   { acknowledged: 0, required: 1 },
 * );
 * console.log(error.acknowledged, error.required); // 0 1
 * ```
 */
export class LockReplicationError extends LockError {
  /** How many replicas acknowledged the grant (the fewest, over several instances). */
  readonly acknowledged: number;
  /** How many were required (`waitReplicas`). */
  readonly required: number;

  /**
   * Creates a replication error.
   *
   * @param message The message, in sentence case with no trailing period.
   * @param counts How many replicas acknowledged, and how many were required.
   * @param options The standard error options.
   */
  constructor(
    message: string,
    counts: { acknowledged: number; required: number },
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.acknowledged = counts.acknowledged;
    this.required = counts.required;
  }
}
