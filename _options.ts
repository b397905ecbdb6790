// Option and key validation: everything a caller passes is checked here, at
// once and before any I/O, so a mistake surfaces as a TypeError or RangeError
// naming the field instead of as a client error much later.

/**
 * TLS settings for the connection to the server. PEM strings.
 *
 * @example Verify the server by name when the endpoints are IPs
 * ```ts
 * import { New, type TlsOptions } from "@genesis/lock";
 *
 * // The certificate names the cluster, not the address it is reached at
 * const tls: TlsOptions = { serverName: "etcd.internal" };
 * const locker = New({ endpoints: ["https://10.0.0.1:2379"], tls });
 * await locker.close(); // nothing was connected: New() connects on first use
 * ```
 */
export interface TlsOptions {
  /** The CA certificate(s) that sign the server's certificate. */
  ca?: string;
  /** The client certificate, for servers that require one. */
  cert?: string;
  /** The private key of `cert`. */
  key?: string;
  /** The name to verify the server's certificate against. */
  serverName?: string;
}

/**
 * The backends `New()` can use.
 *
 * @example Pick the backend per environment
 * ```ts
 * import { type Backend, New } from "@genesis/lock";
 *
 * // Tests need no server; production shares the etcd cluster
 * function backendFor(environment: string): Backend {
 *   return environment === "production" ? "etcd" : "memory";
 * }
 * const locker = New({ backend: backendFor("test") });
 * await locker.close();
 * ```
 */
export type Backend = "etcd" | "redis" | "memory";

/**
 * How `New()` reaches Redis: one server, a Redis Cluster, a primary that
 * Sentinels watch over, or independent servers for the Redlock quorum.
 *
 * @example A Sentinel-managed primary
 * ```ts
 * import { New, type RedisMode } from "@genesis/lock";
 *
 * // endpoints are the Sentinels; they say where the primary of "locks" is
 * const mode: RedisMode = "sentinel";
 * const locker = New({
 *   backend: "redis",
 *   mode,
 *   masterName: "locks",
 *   endpoints: ["10.0.0.1:26379", "10.0.0.2:26379", "10.0.0.3:26379"],
 * });
 * await locker.close(); // nothing was connected: New() connects on first use
 * ```
 */
export type RedisMode = "single" | "cluster" | "sentinel" | "redlock";

/**
 * Options of {@linkcode New}. Every field is optional; as in the Go design,
 * a field left out (or given its zero value: `0`, `""` or `[]`) takes its
 * default. Durations are in milliseconds.
 *
 * @example A Redlock quorum of three Redis servers
 * ```ts
 * import { New, type Options } from "@genesis/lock";
 *
 * const options: Options = {
 *   backend: "redis",
 *   endpoints: ["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"], // independent, not replicas
 *   ttl: 30_000,
 * };
 * const locker = New(options); // checked here; nothing connects until the first call
 * await locker.close();
 * ```
 */
export interface Options {
  /**
   * Where locks live.
   *
   * @default {"etcd"}
   */
  backend?: Backend;
  /**
   * The servers, as `host:port` (or `http://` / `https://` URLs for etcd).
   * For etcd, members of one cluster; for Redis, one instance, or several
   * independent instances for the Redlock quorum. Ignored by `"memory"`.
   *
   * @default {["127.0.0.1:2379"] for etcd, ["127.0.0.1:6379"] for Redis}
   */
  endpoints?: string[];
  /** The user to authenticate as. */
  username?: string;
  /** The password of `username`. Never appears in an error or a log. */
  password?: string;
  /**
   * `true` for TLS with the system's CAs, or the certificates to use.
   *
   * @default {false}
   */
  tls?: boolean | TlsOptions;
  /**
   * How long the first call may wait for a connection before it rejects
   * with a `LockConnectionError`.
   *
   * @default {5000}
   */
  dialTimeout?: number;
  /**
   * How long a lease lasts after its last successful renewal.
   *
   * @default {10000}
   */
  ttl?: number;
  /**
   * The fallback poll while waiting, for a release notification that was lost.
   *
   * @default {100}
   */
  retryInterval?: number;
  /**
   * Renew held leases in the background (at about a third of `ttl`) for as
   * long as they are held. When `false`, a lease lasts `ttl` after it was
   * acquired.
   *
   * @default {true}
   */
  autoRenew?: boolean;
  /**
   * Redis only: the topology behind `endpoints`. `"single"` is one server;
   * `"cluster"` takes `endpoints` as seed nodes of one Redis Cluster;
   * `"sentinel"` takes them as the Sentinels of `masterName`; `"redlock"`
   * takes them as independent servers, a majority of which must grant a lock.
   *
   * @default {"sentinel" with masterName, else "redlock" for several endpoints, else "single"}
   */
  mode?: RedisMode;
  /**
   * Redis only: the Sentinel master group name (ioredis `name`, go-redis
   * `MasterName`). Implies `mode: "sentinel"`.
   */
  masterName?: string;
  /** Redis `"sentinel"` only: the user to authenticate to the Sentinels as. */
  sentinelUsername?: string;
  /**
   * Redis `"sentinel"` only: the password of the Sentinels (their
   * `requirepass`); `password` is the primary's. Never appears in an error
   * or a log.
   */
  sentinelPassword?: string;
  /**
   * Redis only: how many replicas must have acknowledged a grant, and every
   * renewal, before it counts (Redis `WAIT`, within the call's own deadline).
   * An acquisition fewer replicas acknowledged in time is given back:
   * `lock()` tries again, `tryLock()` rejects with a
   * `LockReplicationError`; such a renewal counts as not confirmed. This is
   * what keeps a lock and its fencing counter across a failover.
   *
   * @default {0}
   */
  waitReplicas?: number;
}

/**
 * The fields that decide a connection: equal configs share one client.
 *
 * @example The config New() makes for etcd with no options
 * ```ts
 * import type { ConnectionConfig } from "@genesis/lock/connector";
 *
 * // Every field is required: these are Options with the defaults filled in
 * const config: ConnectionConfig = {
 *   backend: "etcd",
 *   endpoints: ["127.0.0.1:2379"],
 *   username: "",
 *   password: "",
 *   tls: false,
 *   dialTimeout: 5_000,
 * };
 * console.log(config.endpoints); // ["127.0.0.1:2379"]
 * ```
 */
export interface ConnectionConfig {
  /** The backend. */
  backend: Backend;
  /** The servers, in the order given. */
  endpoints: string[];
  /** The user, or `""` for none. */
  username: string;
  /** The password, or `""` for none. */
  password: string;
  /** `false` for plain TCP, else the TLS settings. */
  tls: false | TlsOptions;
  /** How long connecting may take, in milliseconds. */
  dialTimeout: number;
  /** Redis only: the topology; absent for the other backends. */
  mode?: RedisMode;
  /** Redis only: the Sentinel master group name, or `""` for none. */
  masterName?: string;
  /** Redis `"sentinel"` only: the Sentinels' user, or `""` for none. */
  sentinelUsername?: string;
  /** Redis `"sentinel"` only: the Sentinels' password, or `""` for none. */
  sentinelPassword?: string;
}

/** How a locker behaves, whatever the connection. */
export interface LeaseSettings {
  ttl: number;
  retryInterval: number;
  autoRenew: boolean;
  /** Redis only: replicas that must acknowledge a grant or renewal; 0 for none. */
  waitReplicas: number;
}

/** Options with every default filled in. */
export interface ResolvedOptions extends ConnectionConfig, LeaseSettings {}

/** The largest delay a timer takes without overflowing (about 24.8 days). */
export const MAX_DELAY = 2 ** 31 - 1;

/** The longest key accepted, in UTF-8 bytes. */
export const MAX_KEY_BYTES = 1024;

const DEFAULT_ENDPOINTS: Record<Backend, string[]> = {
  etcd: ["127.0.0.1:2379"],
  redis: ["127.0.0.1:6379"],
  memory: [],
};
const BACKENDS = Object.keys(DEFAULT_ENDPOINTS) as Backend[];
const OPTION_NAMES = new Set<string>([
  "backend",
  "endpoints",
  "username",
  "password",
  "tls",
  "dialTimeout",
  "ttl",
  "retryInterval",
  "autoRenew",
  "mode",
  "masterName",
  "waitReplicas",
  "sentinelUsername",
  "sentinelPassword",
]);
const MODES: RedisMode[] = ["single", "cluster", "sentinel", "redlock"];
/** The most replicas WAIT is asked for: more than any deployment has. */
const MAX_REPLICAS = 1_000;
const TLS_NAMES = new Set<string>(["ca", "cert", "key", "serverName"]);

/** A short, safe description of a received value for an error message. */
export function describe(value: unknown): string {
  if (typeof value === "string") {
    return value.length > 40 ? `${JSON.stringify(value.slice(0, 40))}...` : JSON.stringify(value);
  }
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") {
    return String(value);
  }
  if (value === null || value === undefined) return String(value);
  return Array.isArray(value) ? "an array" : `a ${typeof value}`;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function rejectUnknown(record: Record<string, unknown>, known: Set<string>, where: string) {
  for (const name of Object.keys(record)) {
    if (!known.has(name)) {
      throw new TypeError(
        `Unknown option "${where}${name}": expected one of ${[...known].join(", ")}`,
      );
    }
  }
}

function duration(name: string, value: unknown, fallback: number): number {
  if (value === undefined || value === 0) return fallback;
  if (typeof value !== "number") {
    throw new TypeError(
      `Invalid option "${name}": expected a number of milliseconds, received ${describe(value)}`,
    );
  }
  if (!Number.isInteger(value) || value < 1 || value > MAX_DELAY) {
    throw new RangeError(
      `Invalid option "${name}": expected a whole number of milliseconds from 1 to ${MAX_DELAY}, received ${value}`,
    );
  }
  return value;
}

function text(name: string, value: unknown, secret = false): string {
  if (value === undefined) return "";
  if (typeof value !== "string") {
    // A secret's value is never echoed, not even a mistyped one.
    const received = secret ? `a ${value === null ? "null" : typeof value}` : describe(value);
    throw new TypeError(`Invalid option "${name}": expected a string, received ${received}`);
  }
  return value;
}

function tlsOption(value: unknown): false | TlsOptions {
  if (value === undefined || value === false) return false;
  if (value === true) return {};
  if (!isRecord(value)) {
    throw new TypeError(
      `Invalid option "tls": expected a boolean or an object of PEM strings, received ${
        describe(value)
      }`,
    );
  }
  rejectUnknown(value, TLS_NAMES, "tls.");
  const tls: TlsOptions = {};
  for (const name of TLS_NAMES) {
    const field = text(`tls.${name}`, value[name], name === "key");
    if (field !== "") tls[name as keyof TlsOptions] = field;
  }
  return tls;
}

function endpointsOption(value: unknown, backend: Backend): string[] {
  if (value === undefined) return [...DEFAULT_ENDPOINTS[backend]];
  if (!Array.isArray(value)) {
    throw new TypeError(
      `Invalid option "endpoints": expected an array of "host:port" strings, received ${
        describe(value)
      }`,
    );
  }
  if (value.length === 0) return [...DEFAULT_ENDPOINTS[backend]];
  return value.map((endpoint, i) => {
    if (typeof endpoint !== "string" || !/^(https?:\/\/)?[^\s/]+:\d{1,5}\/?$/.test(endpoint)) {
      throw new TypeError(
        `Invalid option "endpoints[${i}]": expected "host:port", received ${describe(endpoint)}`,
      );
    }
    return endpoint;
  });
}

/**
 * Validates `options` and fills in the defaults.
 *
 * @throws {TypeError} A field of the wrong type, or an unknown field.
 * @throws {RangeError} A number out of range.
 */
export function resolveOptions(options: unknown): ResolvedOptions {
  if (options === undefined || options === null) options = {};
  if (!isRecord(options)) {
    throw new TypeError(`Invalid options: expected an object, received ${describe(options)}`);
  }
  rejectUnknown(options, OPTION_NAMES, "");
  const backend = options.backend ?? "etcd";
  if (!BACKENDS.includes(backend as Backend)) {
    throw new TypeError(
      `Invalid option "backend": expected "etcd", "redis" or "memory", received ${
        describe(backend)
      }`,
    );
  }
  const autoRenew = options.autoRenew ?? true;
  if (typeof autoRenew !== "boolean") {
    throw new TypeError(
      `Invalid option "autoRenew": expected a boolean, received ${describe(autoRenew)}`,
    );
  }
  const endpoints = endpointsOption(options.endpoints, backend as Backend);
  const resolved: ResolvedOptions = {
    backend: backend as Backend,
    endpoints,
    username: text("username", options.username),
    password: text("password", options.password, true),
    tls: tlsOption(options.tls),
    dialTimeout: duration("dialTimeout", options.dialTimeout, 5_000),
    ttl: duration("ttl", options.ttl, 10_000),
    retryInterval: duration("retryInterval", options.retryInterval, 100),
    autoRenew,
    waitReplicas: replicasOption(options.waitReplicas),
  };
  const masterName = text("masterName", options.masterName);
  const mode = modeOption(options.mode);
  const sentinelUsername = text("sentinelUsername", options.sentinelUsername);
  const sentinelPassword = text("sentinelPassword", options.sentinelPassword, true);
  if (backend !== "redis") {
    // Zero values are allowed anywhere: they mean "left out".
    const given = mode !== undefined
      ? "mode"
      : masterName !== ""
      ? "masterName"
      : resolved.waitReplicas !== 0
      ? "waitReplicas"
      : sentinelUsername !== ""
      ? "sentinelUsername"
      : sentinelPassword !== ""
      ? "sentinelPassword"
      : undefined;
    if (given !== undefined) {
      throw new TypeError(
        `Invalid option "${given}": it applies to "backend": "redis" only, received "backend": ${
          describe(backend)
        }`,
      );
    }
    return resolved;
  }
  const redis = { ...resolved, ...topology(mode, masterName, endpoints) };
  if (redis.mode !== "sentinel") {
    const given = sentinelUsername !== ""
      ? "sentinelUsername"
      : sentinelPassword !== ""
      ? "sentinelPassword"
      : undefined;
    if (given !== undefined) {
      throw new TypeError(
        `Invalid options "${given}" and "mode": Sentinel credentials are for "sentinel", received "mode": "${redis.mode}"`,
      );
    }
    return redis;
  }
  return { ...redis, sentinelUsername, sentinelPassword };
}

function modeOption(value: unknown): RedisMode | undefined {
  if (value === undefined || value === "") return undefined;
  if (!MODES.includes(value as RedisMode)) {
    throw new TypeError(
      `Invalid option "mode": expected "single", "cluster", "sentinel" or "redlock", received ${
        describe(value)
      }`,
    );
  }
  return value as RedisMode;
}

function replicasOption(value: unknown): number {
  if (value === undefined) return 0;
  if (typeof value !== "number") {
    throw new TypeError(
      `Invalid option "waitReplicas": expected a number of replicas, received ${describe(value)}`,
    );
  }
  if (!Number.isInteger(value) || value < 0 || value > MAX_REPLICAS) {
    throw new RangeError(
      `Invalid option "waitReplicas": expected a whole number from 0 to ${MAX_REPLICAS}, received ${value}`,
    );
  }
  return value;
}

/** The Redis mode and master name, defaulted and checked against each other and `endpoints`. */
function topology(
  given: RedisMode | undefined,
  masterName: string,
  endpoints: string[],
): { mode: RedisMode; masterName: string } {
  const mode = given ??
    (masterName !== "" ? "sentinel" : endpoints.length > 1 ? "redlock" : "single");
  if (mode === "single" && endpoints.length > 1) {
    throw new TypeError(
      `Invalid options "mode" and "endpoints": "single" takes one endpoint, received ${endpoints.length}`,
    );
  }
  if (mode === "sentinel" && masterName === "") {
    throw new TypeError(
      `Invalid options "mode" and "masterName": "sentinel" needs the name of the master group, received none`,
    );
  }
  if (mode !== "sentinel" && masterName !== "") {
    throw new TypeError(
      `Invalid options "masterName" and "mode": a master name is for "sentinel", received "mode": "${mode}"`,
    );
  }
  return { mode, masterName };
}

/**
 * Checks a lock key: a non-empty, well-formed string of at most
 * {@linkcode MAX_KEY_BYTES} UTF-8 bytes.
 *
 * @throws {TypeError} A key that is not a string.
 * @throws {RangeError} An empty or too long key, or one with a lone surrogate.
 */
export function validateKey(key: unknown): string {
  if (typeof key !== "string") {
    throw new TypeError(`Invalid lock key: expected a string, received ${describe(key)}`);
  }
  // A string's byte length is at most 3 per UTF-16 unit, so most keys skip the encode.
  const bytes = key.length * 3 <= MAX_KEY_BYTES ? key.length : new TextEncoder().encode(key).length;
  if (key.length === 0 || bytes > MAX_KEY_BYTES) {
    throw new RangeError(
      `Invalid lock key: expected a non-empty string of at most ${MAX_KEY_BYTES} UTF-8 bytes, received ${
        key.length === 0 ? "an empty string" : `${bytes} bytes`
      }`,
    );
  }
  // A lone surrogate would reach a server as U+FFFD: two different keys, one lock.
  if (!(key as string & { isWellFormed(): boolean }).isWellFormed()) {
    throw new RangeError(
      `Invalid lock key: expected a well-formed string, received one with a lone surrogate at index ${
        loneSurrogate(key)
      }`,
    );
  }
  return key;
}

/** Where a string has its first unpaired surrogate. */
function loneSurrogate(key: string): number {
  return key.search(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/);
}
