// The Redis backend on a Redis Cluster, through a caller's ioredis Cluster
// client: every key of a lock shares one hash tag, so one slot holds them.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Cluster, Redis } from "ioredis";
import type { Locker } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { conformance } from "./_conformance.ts";
import { RedisClusterServers } from "./_servers.ts";
import { prefix, sleep } from "./_util.ts";

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

  it("sends each master a renewal pass's scripts in one write, not one per script", async () => {
    // A client of its own, so nothing else reaches the masters meanwhile.
    const own = new Cluster(servers.nodes);
    const locker = createRedisLocker(own, { ttl: 3_000 }); // a pass a second
    const masters = servers.servers.map((s) => new Redis({ host: "127.0.0.1", port: s.port }));
    /** Socket reads and script calls so far, per master (each sample costs 2 reads). */
    const sample = () =>
      Promise.all(masters.map(async (master) => {
        const [stats, commands] = [await master.info("stats"), await master.info("commandstats")];
        return {
          reads: Number(stats.match(/^total_reads_processed:(\d+)/m)![1]),
          scripts: Number(commands.match(/^cmdstat_evalsha:calls=(\d+)/m)?.[1] ?? 0),
        };
      }));
    try {
      const name = prefix("pass");
      // 600 locks over the three masters, most of them in a slot of their
      // own, taken at once: they renew in the same passes.
      const leases = await Promise.all(
        Array.from({ length: 600 }, (_, i) => locker.lock(`${name}/${i}`)),
      );
      // The first pass loads the renewal script on each master (one EVAL a
      // call, as ioredis does after NOSCRIPT); the next ones are measured.
      await sleep(1_300);
      const before = await sample();
      await sleep(2_000); // two passes, perhaps three
      const after = await sample();
      after.forEach((now, i) => {
        const scripts = now.scripts - before[i].scripts;
        const reads = now.reads - before[i].reads - 2;
        assert.ok(scripts >= 100, `master ${i}: ${scripts} renewal scripts`);
        // Corked, a pass of ~200 scripts came in 2 reads (the server reads
        // 16 KB at a time); uncorked, in 14 to 40.
        assert.ok(reads * 40 < scripts, `master ${i}: ${scripts} scripts in ${reads} reads`);
      });
      await Promise.all(leases.map((lease) => lease.release()));
    } finally {
      await locker.close();
      own.disconnect();
      for (const master of masters) master.disconnect();
    }
  });
});
