// Redis topologies through New(): the mode options and their validation, the
// connection cache keeping topologies apart, and the whole Locker contract on
// a Redis Cluster reached with New({ backend: "redis", mode: "cluster" }).

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Cluster } from "ioredis";
import { type Locker, New, type Options } from "../mod.ts";
import { hashConfig } from "../connector.ts";
import { resolveOptions } from "../_options.ts";
import { conformance } from "./_conformance.ts";
import { RedisClusterServers } from "./_servers.ts";
import { prefix } from "./_util.ts";

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
