// Connecting and disconnecting as `mode` says: one Redis, Cluster, Sentinel, or Redlock set.

import { LockAuthError, LockConnectionError, LockPermissionError } from "../../errors.ts";
import type { ConnectionConfig } from "../../_options.ts";
import {
  CLUSTER_SUBSCRIBER,
  clusterClient,
  connectOne,
  dial,
  hangUp,
  hasShardedPubSub,
  secretsOf,
  sentinelClient,
  standby,
  SUBSCRIBER,
} from "./_connection.ts";
import { type Instance, Instances } from "./_instances.ts";
import { Subscriptions } from "./_subscriptions.ts";

/** Connects as `config.mode` says: one Redis, a Cluster, a Sentinel's primary, or the Redlock set. */
export async function connect(config: ConnectionConfig): Promise<Instances> {
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

export async function disconnect(instances: Instances): Promise<void> {
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
