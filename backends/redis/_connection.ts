// ioredis clients that never queue or re-send: options, dialling, Cluster, Sentinel, hang-up.

import { Cluster, type ClusterOptions, Redis, type RedisOptions } from "ioredis";
import { LockConnectionError } from "../../errors.ts";
import type { ConnectionConfig } from "../../_options.ts";
import { translate } from "./_errors.ts";

/** An ioredis connection to one server (or a Sentinel's primary), or to a Redis Cluster. */
export type Client = Redis | Cluster;

/** The secrets of `config`, scrubbed from every error. */
export function secretsOf(config: ConnectionConfig): string[] {
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
export function connectOne(config: ConnectionConfig, endpoint: string): Promise<Redis> {
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
export async function dial<C extends Client>(
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
export function clusterClient(config: ConnectionConfig, connected: () => boolean): Cluster {
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
export function sentinelClient(config: ConnectionConfig, connected: () => boolean): Redis {
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

/** A client for an instance that was down at connect time: it keeps trying in the background. */
export function standby(config: ConnectionConfig, endpoint: string): Redis {
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
export async function hangUp(client: Client): Promise<void> {
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
export const SUBSCRIBER: RedisOptions = {
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
export async function hasShardedPubSub(cluster: Cluster, ms: number): Promise<boolean> {
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
export const CLUSTER_SUBSCRIBER: ClusterOptions = {
  lazyConnect: false,
  enableOfflineQueue: false,
  clusterRetryStrategy: (times) => Math.min(50 * 2 ** times, 2_000),
};

/**
 * A subscriber connection for a client the caller owns, with options of its
 * own: a `Redis` made with `enableOfflineQueue: false` (as the README advises) would
 * otherwise pass that on, and its SUBSCRIBE would be refused while it
 * connects. A `Cluster` keeps its own subscriber handling, and plain pub/sub:
 * whether its servers have sharded pub/sub is not known before it connects.
 */
export function subscriberOf(client: Redis): Redis {
  if ((client as { isCluster?: boolean }).isCluster === true) return client.duplicate();
  return client.duplicate(SUBSCRIBER);
}
