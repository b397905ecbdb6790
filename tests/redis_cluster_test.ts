// The Redis backend on a Redis Cluster, through a caller's ioredis Cluster
// client: every key of a lock shares one hash tag, so one slot holds them.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Cluster } from "ioredis";
import type { Locker } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { conformance } from "./_conformance.ts";
import { RedisClusterServers } from "./_servers.ts";
import { prefix } from "./_util.ts";

describe("redis backend on a Redis Cluster", () => {
  let servers: RedisClusterServers;
  let client: Cluster;
  let probe: Cluster;
  before(async () => {
    servers = await RedisClusterServers.start();
    client = new Cluster(servers.nodes);
    probe = new Cluster(servers.nodes);
  });
  after(async () => {
    client.disconnect();
    probe.disconnect();
    await servers.stop();
  });

  /** Lock keys (not fencing counters) under a prefix, over every master. */
  async function lockKeys(keyPrefix: string): Promise<string[]> {
    const keys = await Promise.all(
      probe.nodes("master").map((node) => node.keys(`lock:{${keyPrefix}*`)),
    );
    return keys.flat().filter((k) => !k.endsWith(":fence"));
  }

  conformance({
    name: "a Redis Cluster",
    locker: (options): Locker => createRedisLocker(client, options),
    shortTtl: 300,
    fifoAcrossLockers: false,
    leftovers: async (keyPrefix) => (await lockKeys(keyPrefix)).length,
  });

  it("wakes a waiter through the cluster's pub/sub, not its 5 s poll", async () => {
    const name = prefix("cluster-handoff");
    const [a, b] = [createRedisLocker(client), createRedisLocker(client, { retryInterval: 5_000 })];
    const held = await a.lock(name);
    const waiting = b.lock(name);
    await new Promise((resolve) => setTimeout(resolve, 300)); // subscribed and waiting
    const released = performance.now();
    await held.release();
    const next = await waiting;
    const elapsed = performance.now() - released;
    assert.ok(elapsed < 1_000, `the hand-off took ${elapsed.toFixed(0)} ms`);
    assert.ok(next.token > held.token);
    await next.release();
    await Promise.all([a.close(), b.close()]);
  });

  it("keeps a lock's keys in one slot, on one master", async () => {
    const locker = createRedisLocker(client);
    const names = [prefix("slot-a"), prefix("slot-b"), prefix("slot-c"), prefix("slot-d")];
    const leases = await Promise.all(names.map((name) => locker.lock(name)));
    for (const name of names) {
      const slots = new Set(
        await Promise.all(
          [`lock:{${name}}`, `lock:{${name}}:fence`, `lock:{${name}}:released`].map((key) =>
            probe.cluster("KEYSLOT", key)
          ),
        ),
      );
      assert.equal(slots.size, 1, `the keys of ${name} span slots ${[...slots].join(", ")}`);
    }
    await Promise.all(leases.map((lease) => lease.release()));
    await locker.close();
  });
});
