// The Redis backend on a Sentinel-managed primary through New(): a primary,
// a replica and three Sentinels (quorum 2) on loopback. The Locker contract,
// and waitReplicas: grants and renewals that count only once a replica has
// acknowledged them, so a failover keeps the lock and its fencing counter.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { LockConnectionError, type Locker, New, type Options } from "../mod.ts";
import { conformance } from "./_conformance.ts";
import { freePort, RedisSentinels } from "./_servers.ts";
import { prefix, sleep } from "./_util.ts";

describe("redis backend on a Sentinel-managed primary through New()", () => {
  let setup: RedisSentinels;
  let probe: Redis;
  before(async () => {
    setup = await RedisSentinels.start();
    probe = new Redis({ host: "127.0.0.1", port: setup.primary.port });
  });
  after(async () => {
    probe.disconnect();
    await setup.stop();
  });

  const sentinel = (options?: Options): Locker =>
    New({
      backend: "redis",
      mode: "sentinel",
      masterName: setup.masterName,
      endpoints: setup.endpoints,
      ...options,
    });

  conformance({
    name: 'a Sentinel-managed primary (New({ mode: "sentinel" }))',
    locker: (options): Locker => sentinel(options),
    shortTtl: 300,
    fifoAcrossLockers: false,
    leftovers: async (keyPrefix) =>
      (await probe.keys(`lock:{${keyPrefix}*`)).filter((k) => !k.endsWith(":fence")).length,
  });

  it("rejects the first call with a LockConnectionError when no Sentinel knows the master", async () => {
    const locker = sentinel({ masterName: "no-such-group", dialTimeout: 2_000 });
    const started = performance.now();
    await assert.rejects(locker.lock(prefix("unknown-master")), (error: Error) => {
      assert.ok(error instanceof LockConnectionError, `${error.name}: ${error.message}`);
      assert.match(
        error.message,
        /^Cannot connect to Redis at master "no-such-group" via Sentinels /,
      );
      return true;
    });
    assert.ok(performance.now() - started < 5_000, "within about dialTimeout");
    await locker.close();
    // ioredis ends each Sentinel query connection as it gives up, with a
    // timer that the socket's close clears a moment later.
    await sleep(200);
  });

  it("rejects the first call with a LockConnectionError when no Sentinel answers", async () => {
    const endpoints = [`127.0.0.1:${await freePort()}`, `127.0.0.1:${await freePort()}`];
    const locker = New({
      backend: "redis",
      masterName: "locks",
      endpoints,
      dialTimeout: 1_000,
    });
    await assert.rejects(locker.tryLock(prefix("no-sentinel")), LockConnectionError);
    await locker.close();
    // ioredis 6 ends a refused Sentinel query connection with a 2 s timer
    // that only its socket's close (already past) would clear: it runs out.
    await sleep(2_100);
  });
});
