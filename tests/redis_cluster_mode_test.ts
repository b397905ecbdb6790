// Redis topologies through New(): the mode options and their validation, the
// connection cache keeping topologies apart, and the whole Locker contract on
// a Redis Cluster reached with New({ backend: "redis", mode: "cluster" }).

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { Cluster } from "ioredis";
import { type Locker, LockReplicationError, New, type Options } from "../mod.ts";
import { hashConfig } from "../connector.ts";
import { resolveOptions } from "../_options.ts";
import { conformance } from "./_conformance.ts";
import { assertExitsAfterClose, assertKeptThroughFailover } from "./_scenarios.ts";
import { RedisClusterServers, type RedisServer } from "./_servers.ts";
import { prefix, TOKEN, until } from "./_util.ts";

function rejects(options: unknown, name: "TypeError" | "RangeError", message: RegExp | string) {
  assert.throws(() => New(options as Options), (error: Error) => {
    assert.equal(error.name, name);
    if (typeof message === "string") assert.equal(error.message, message);
    else assert.match(error.message, message);
    return true;
  });
}

const three = ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"];

describe("New() Redis mode options", () => {
  it("defaults to single for one endpoint, redlock for several, sentinel with a master name", () => {
    const mode = (options: Options) => resolveOptions({ backend: "redis", ...options }).mode;
    assert.equal(mode({}), "single");
    assert.equal(mode({ endpoints: three }), "redlock");
    assert.equal(mode({ endpoints: three, masterName: "locks" }), "sentinel");
    assert.equal(mode({ endpoints: three, mode: "cluster" }), "cluster");
    assert.equal(resolveOptions({ backend: "redis" }).waitReplicas, 0);
  });

  it("rejects a combination that makes no sense with a TypeError naming both fields", () => {
    rejects(
      { backend: "redis", mode: "single", endpoints: three },
      "TypeError",
      'Invalid options "mode" and "endpoints": "single" takes one endpoint, received 3',
    );
    rejects(
      { backend: "redis", mode: "cluster", masterName: "locks", endpoints: three },
      "TypeError",
      'Invalid options "masterName" and "mode": a master name is for "sentinel", received "mode": "cluster"',
    );
    rejects(
      { backend: "redis", mode: "sentinel", endpoints: three },
      "TypeError",
      'Invalid options "mode" and "masterName": "sentinel" needs the name of the master group, received none',
    );
    rejects(
      { backend: "etcd", mode: "cluster" },
      "TypeError",
      'Invalid option "mode": it applies to "backend": "redis" only, received "backend": "etcd"',
    );
    rejects({ waitReplicas: 1 }, "TypeError", /^Invalid option "waitReplicas": .*"etcd"$/);
    rejects({ backend: "memory", masterName: "x" }, "TypeError", /"masterName": .*"memory"$/);
  });

  it("names a bad mode, master name or replica count and what it received", () => {
    rejects(
      { backend: "redis", mode: "replicated" },
      "TypeError",
      'Invalid option "mode": expected "single", "cluster", "sentinel" or "redlock", received "replicated"',
    );
    rejects(
      { backend: "redis", masterName: 5 },
      "TypeError",
      'Invalid option "masterName": expected a string, received 5',
    );
    rejects(
      { backend: "redis", waitReplicas: "1" },
      "TypeError",
      'Invalid option "waitReplicas": expected a number of replicas, received "1"',
    );
    rejects(
      { backend: "redis", waitReplicas: -1 },
      "RangeError",
      /^Invalid option "waitReplicas": expected a whole number from 0 to 1000, received -1$/,
    );
    rejects({ backend: "redis", waitReplicas: 1.5 }, "RangeError", /received 1.5$/);
  });

  it("takes zero values as left out, on every backend", async () => {
    for (const backend of ["memory", "redis"] as const) {
      const locker = New({ backend, mode: undefined, masterName: "", waitReplicas: 0 });
      await locker.close();
    }
  });

  it("hashes mode and master name, so one endpoint as server, seed or Sentinel are three connections", async () => {
    const hash = (options: Options) =>
      hashConfig(resolveOptions({ backend: "redis", endpoints: ["127.0.0.1:7000"], ...options }));
    const hashes = new Set(
      await Promise.all([
        hash({}),
        hash({ mode: "cluster" }),
        hash({ masterName: "a" }),
        hash({ masterName: "b" }),
        hash({ mode: "redlock" }),
      ]),
    );
    assert.equal(hashes.size, 5);
    // waitReplicas decides no connection: lockers with and without it share one.
    assert.equal(await hash({ waitReplicas: 2 }), await hash({}));
  });
});

describe("redis backend on a Redis Cluster through New()", () => {
  let servers: RedisClusterServers;
  let probe: Cluster;
  before(async () => {
    servers = await RedisClusterServers.start();
    probe = new Cluster(servers.nodes);
  });
  after(async () => {
    probe.disconnect();
    await servers.stop();
  });

  const cluster = (options?: Options): Locker =>
    New({ backend: "redis", mode: "cluster", endpoints: servers.endpoints, ...options });

  /** Lock keys (not fencing counters) under a prefix, over every master. */
  async function lockKeys(keyPrefix: string): Promise<string[]> {
    const keys = await Promise.all(
      probe.nodes("master").map((node) => node.keys(`lock:{${keyPrefix}*`)),
    );
    return keys.flat().filter((k) => !k.endsWith(":fence"));
  }

  conformance({
    name: 'a Redis Cluster (New({ mode: "cluster" }))',
    locker: (options): Locker => cluster(options),
    shortTtl: 300,
    fifoAcrossLockers: false,
    leftovers: async (keyPrefix) => (await lockKeys(keyPrefix)).length,
  });

  it("wakes a waiter through sharded pub/sub in the lock's slot, not its 5 s poll", async () => {
    const name = prefix("sharded");
    const channel = `lock:{${name}}:released`;
    const [a, b] = [cluster(), cluster({ retryInterval: 5_000 })];
    const held = await a.lock(name);
    const waiting = b.lock(name);
    const slot = Number(await probe.cluster("KEYSLOT", channel));
    const master = servers.masterOf(slot);
    await until(
      () => master.cli(["PUBSUB", "SHARDCHANNELS", channel]) === channel,
      5_000,
      "the waiter's SSUBSCRIBE on the slot's master",
    );
    for (const server of servers.servers) {
      assert.equal(server.cli(["PUBSUB", "CHANNELS", channel]), "", "no global channel");
    }
    const released = performance.now();
    await held.release();
    const next = await waiting;
    const elapsed = performance.now() - released;
    assert.ok(elapsed < 2_000, `the hand-off took ${elapsed.toFixed(0)} ms`);
    assert.ok(next.token > held.token);
    await next.release();
    await Promise.all([a.close(), b.close()]);
  });

  it("keeps a lease whose slot migrates to another master (ASK, then MOVED); never two holders", async () => {
    const options: Options = { ttl: 3_000 };
    const [holder, competitor] = [cluster(options), cluster({ ...options, dialTimeout: 4_000 })];
    const name = prefix("migrating");
    const key = `lock:{${name}}`;
    const lease = await holder.lock(name);
    const slot = Number(await probe.cluster("KEYSLOT", key));
    const from = servers.masterOf(slot);
    const to = servers.servers.find((s) => s !== from)!;
    const [fromId, toId] = [from, to].map((s) => s.cli(["CLUSTER", "MYID"]));
    /** The key's PTTL on `server`, asked after ASKING (an importing master answers it then). */
    const pttl = (server: RedisServer) =>
      Number(
        execFileSync("redis-cli", ["-p", String(server.port)], {
          input: `ASKING\nPTTL ${key}\n`,
          encoding: "utf8",
        }).trim().split("\n").at(-1),
      );
    /** Waits for a renewal on `server`: the key's PTTL goes back up between two samples. */
    const renewedOn = async (server: RedisServer, what: string) => {
      let last = pttl(server);
      assert.ok(last > 0, `${key} is on ${what}: PTTL ${last}`);
      await until(
        () => {
          const now = pttl(server);
          const rose = now > last + 100;
          last = now;
          return rose;
        },
        5_000,
        what,
      );
    };
    to.cli(["CLUSTER", "SETSLOT", String(slot), "IMPORTING", fromId]);
    from.cli(["CLUSTER", "SETSLOT", String(slot), "MIGRATING", toId]);
    const keys = from.cli(["CLUSTER", "GETKEYSINSLOT", String(slot), "100"]).split("\n");
    assert.ok(keys.includes(key) && keys.includes(`${key}:fence`), keys.join(", "));
    from.cli(["MIGRATE", "127.0.0.1", String(to.port), "", "0", "5000", "KEYS", ...keys]);
    // Mid-migration the old master answers ASK for the moved keys.
    await renewedOn(to, "a renewal through ASK on the importing master");
    assert.equal(await competitor.tryLock(name), undefined);
    for (const server of servers.servers) {
      server.cli(["CLUSTER", "SETSLOT", String(slot), "NODE", toId]);
    }
    // Then MOVED, and the slot map is refreshed.
    await renewedOn(to, "a renewal through MOVED on the new master");
    assert.equal(lease.signal.aborted, false, String(lease.signal.reason));
    assert.equal(await competitor.tryLock(name), undefined);
    await lease.release();
    assert.equal(to.cli(["EXISTS", key]), "0");
    const next = await competitor.lock(name, { timeout: 5_000 });
    assert.ok(next.token > lease.token, `${next.token} after ${lease.token}`);
    await next.release();
    await Promise.all([holder.close(), competitor.close()]);
  });

  it("lets the process exit by itself after close()", async () => {
    await assertExitsAfterClose({
      backend: "redis",
      endpoints: servers.endpoints,
      env: { GENESIS_MODE: "cluster" },
    }, "exit");
  });

  it("reaches keys on every master from one seed node", async () => {
    const locker = New({ backend: "redis", mode: "cluster", endpoints: [servers.endpoints[0]] });
    const names = Array.from({ length: 24 }, (_, i) => prefix(`spread-${i}`));
    const leases = await Promise.all(names.map((name) => locker.lock(name)));
    const slots = await Promise.all(names.map((n) => probe.cluster("KEYSLOT", `lock:{${n}}`)));
    const masters = new Set(slots.map((slot) => servers.masterOf(Number(slot)).port));
    assert.equal(masters.size, 3, "the keys landed on every master");
    await Promise.all(leases.map((lease) => lease.release()));
    assert.deepEqual(await lockKeys(names[0].split("spread")[0]), []);
    await locker.close();
  });

  it("keeps a single-server locker and a cluster locker on the same endpoint apart", async () => {
    const endpoint = servers.endpoints[0];
    const single = New({ backend: "redis", endpoints: [endpoint] });
    const name = prefix("apart");
    // A connection shared with the plain client would answer MOVED for the
    // keys other masters serve.
    const names = Array.from({ length: 12 }, (_, i) => `${name}-${i}`);
    const errors: unknown[] = [];
    for (const n of names) await single.tryLock(n).then((l) => l?.release(), (e) => errors.push(e));
    assert.ok(errors.length > 0, "the single-server locker cannot reach other masters' slots");
    for (const error of errors) {
      assert.match(String((error as Error).message), /is a Redis Cluster node .*mode "cluster"/);
    }
    const clustered = cluster({});
    const leases = await Promise.all(names.map((n) => clustered.lock(n)));
    await Promise.all(leases.map((lease) => lease.release()));
    await Promise.all([single.close(), clustered.close()]);
  });
});

describe("redis backend on a Redis Cluster with a replica per master, through New()", () => {
  let servers: RedisClusterServers;
  before(async () => {
    servers = await RedisClusterServers.start({ replicas: 1 });
  });
  after(async () => {
    await servers.stop();
  });

  /** The slot of `key`, asked of a running node. */
  const slotOf = (key: string) =>
    Number(servers.servers.find((s) => s.child)!.cli(["CLUSTER", "KEYSLOT", key]));

  it("asks the replica of the lock's own slot: a stopped replica fails its slot's grants only", async () => {
    const locker = New({
      backend: "redis",
      mode: "cluster",
      endpoints: servers.endpoints,
      waitReplicas: 1,
      ttl: 1_000,
    });
    // Two locks whose slots two different masters serve.
    const names: string[] = [];
    const masters: RedisServer[] = [];
    while (masters.length < 2) {
      const name = prefix("acked");
      const slot = slotOf(`lock:{${name}}`);
      const master = servers.masterOf(slot);
      if (masters.includes(master)) continue;
      names.push(name);
      masters.push(master);
    }
    const replica = servers.servers.find((s) =>
      s.cli(["INFO", "replication"]).includes(`master_port:${masters[0].port}`)
    )!;
    const lease = await locker.lock(names[0]);
    await lease.release();
    replica.child!.signal("SIGSTOP");
    try {
      await assert.rejects(locker.tryLock(names[0]), (error: Error) => {
        assert.ok(error instanceof LockReplicationError, `${error.name}: ${error.message}`);
        assert.equal(error.acknowledged, 0);
        assert.match(
          error.message,
          /: 0 of 1 replicas acknowledged the grant on Redis at .*\(cluster\)/,
        );
        return true;
      });
      const other = await locker.tryLock(names[1]);
      assert.ok(other, "a lock in a slot whose replica answers is granted");
      await other.release();
    } finally {
      replica.child!.signal("SIGCONT");
    }
    const again = await locker.lock(names[0], { timeout: 10_000 });
    await again.release();
    await locker.close();
  });

  it("keeps a lease granted with waitReplicas: 1 when its master is SIGKILLed and its replica takes over; never two holders, and the next token is greater", async () => {
    const options: Options = {
      backend: "redis",
      mode: "cluster",
      endpoints: servers.endpoints,
      waitReplicas: 1,
      ttl: 15_000,
    };
    const holder = New(options);
    // Its own connection (another dialTimeout is another config).
    const competitor = New({ ...options, dialTimeout: 4_000 });
    const name = prefix("cluster-failover");
    const key = `lock:{${name}}`;
    const lease = await holder.lock(name);
    assert.equal(await competitor.tryLock(name), undefined);
    const slot = slotOf(key);
    const master = servers.masterOf(slot);
    const killedAt = performance.now();
    await master.shutdown("SIGKILL");
    let promoted = master;
    await until(
      () => {
        try {
          promoted = servers.masterOf(slot);
        } catch {
          return false; // no master for the slot yet
        }
        return promoted !== master;
      },
      20_000,
      "the replica to take over the slot",
    );
    assert.match(promoted.cli(["GET", key]), TOKEN, "the grant was replicated");
    // The old master comes back as the new master's replica, so renewals can be acknowledged.
    await master.restart();
    await until(
      () => master.cli(["INFO", "replication"]).includes("master_link_status:up"),
      20_000,
      "the old master to follow the new one",
    );
    await assertKeptThroughFailover({
      promoted: promoted,
      role: "master",
      name,
      lease,
      holder,
      competitor,
      killedAt,
      ttl: 15_000,
    });
  });
});
