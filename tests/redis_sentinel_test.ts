// The Redis backend on a Sentinel-managed primary through New(): a primary,
// a replica and three Sentinels (quorum 2) on loopback. The Locker contract,
// and waitReplicas: grants and renewals that count only once a replica has
// acknowledged them, so a failover keeps the lock and its fencing counter.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import {
  LockAuthError,
  LockConnectionError,
  type Locker,
  LockReplicationError,
  LockTimeoutError,
  New,
  type Options,
} from "../mod.ts";
import { conformance } from "./_conformance.ts";
import { assertExitsAfterClose, assertKeptThroughFailover } from "./_scenarios.ts";
import { freePort, RedisSentinels } from "./_servers.ts";
import { prefix, Provoked, sleep, TOKEN, until, within } from "./_util.ts";
import { hashConfig } from "../connector.ts";
import { resolveOptions } from "../_options.ts";

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

  it("lets the process exit by itself after close()", async () => {
    await assertExitsAfterClose({
      backend: "redis",
      endpoints: setup.endpoints,
      env: { GENESIS_MASTER_NAME: setup.masterName },
    }, "exit");
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

  it("with the replica stopped, lock() with waitReplicas: 1 does not resolve and leaves no key, tryLock() rejects saying 0 of 1 acknowledged, and lock() acquires once it resumes", async () => {
    const locker = sentinel({ waitReplicas: 1, ttl: 1_000 });
    const name = prefix("stopped-replica");
    const key = `lock:{${name}}`;
    const replica = setup.replica;
    replica.child!.signal("SIGSTOP");
    try {
      const waiting = locker.lock(name, { timeout: 2_500 });
      assert.equal(await within(waiting.then(() => "held"), 1_500, "pending"), "pending");
      await assert.rejects(waiting, LockTimeoutError);
      // The grant in flight when the timeout ended it is given back once its WAIT returns.
      await until(async () => await probe.exists(key) === 0, 3_000, "the key to be given back");
      await assert.rejects(locker.tryLock(name), (error: Error) => {
        assert.ok(error instanceof LockReplicationError, `${error.name}: ${error.message}`);
        assert.equal(error.acknowledged, 0);
        assert.equal(error.required, 1);
        assert.match(
          error.message,
          new RegExp(
            `^Cannot acquire lock "${name}": 0 of 1 replicas acknowledged the grant on Redis at .* within \\d+ ms, so it was given back$`,
          ),
        );
        return true;
      });
      await until(async () => await probe.exists(key) === 0, 3_000, "the key to be given back");
    } finally {
      replica.child!.signal("SIGCONT");
    }
    const lease = await locker.lock(name, { timeout: 10_000 });
    // Acknowledged: the replica has it.
    assert.equal(replica.cli(["GET", key]), await probe.get(key));
    await lease.release();
    await locker.close();
  });

  it("loses a lease held with waitReplicas: 1 once the replica stops acknowledging, and says so", async () => {
    const locker = sentinel({ waitReplicas: 1, ttl: 1_000 });
    const lease = await locker.lock(prefix("unacknowledged"));
    const replica = setup.replica;
    replica.child!.signal("SIGSTOP");
    try {
      await until(() => lease.signal.aborted, 3_000, "the loss");
    } finally {
      replica.child!.signal("SIGCONT");
    }
    assert.match(
      String(lease.signal.reason),
      /its 1000 ms lease ran out before a renewal was confirmed \(the last renewal reached fewer than 1 replicas within \d+ ms\)$/,
    );
    await locker.close();
  });
});

describe("Sentinels that require a password", () => {
  const SECRET = "sentinel-Secret-that-must-not-leak";
  const provoked = new Provoked();
  let setup: RedisSentinels;
  before(async () => {
    setup = await RedisSentinels.start({ sentinelPassword: SECRET });
  });
  after(async () => {
    await setup.stop();
    provoked.assertClean([SECRET, SECRET.slice(0, 12)]);
  });

  const options = (sentinelPassword?: string): Options => ({
    backend: "redis",
    masterName: setup.masterName,
    endpoints: setup.endpoints,
    sentinelPassword,
    dialTimeout: 2_000,
  });

  it("are reached with sentinelPassword", async () => {
    const locker = New(options(SECRET));
    const lease = await locker.lock(prefix("sentinel-auth"));
    await lease.release();
    await locker.close();
  });

  it("reject a wrong or missing sentinelPassword with a LockAuthError that does not show it", async () => {
    for (const password of [`${SECRET}-wrong`, undefined]) {
      const locker = New(options(password));
      await assert.rejects(locker.tryLock(prefix("sentinel-auth")), (error: Error) => {
        provoked.keep(error);
        assert.ok(error instanceof LockAuthError, `${error.name}: ${error.message}`);
        assert.match(error.message, /^Cannot connect to Redis at master "locks" via Sentinels /);
        return true;
      });
      await locker.close();
    }
    // See "no Sentinel answers" above: ioredis's query connections leave a timer that runs out.
    await sleep(2_100);
  });

  it("decide the connection: another sentinelPassword is another client", async () => {
    const hash = (sentinelPassword: string) =>
      hashConfig(resolveOptions({ ...options(), sentinelPassword }));
    assert.notEqual(await hash("a"), await hash("b"));
    assert.throws(
      () => New({ backend: "redis", endpoints: ["127.0.0.1:1"], sentinelPassword: "x" }),
      {
        name: "TypeError",
        message:
          'Invalid options "sentinelPassword" and "mode": Sentinel credentials are for "sentinel", received "mode": "single"',
      },
    );
  });
});

describe("waitReplicas through a Sentinel failover (a primary, two replicas, three Sentinels)", () => {
  let setup: RedisSentinels;
  before(async () => {
    setup = await RedisSentinels.start({ replicas: 2 });
  });
  after(async () => {
    await setup.stop();
  });

  it("keeps a lease granted with waitReplicas: 1 when the primary is SIGKILLed: a competitor stays out, and the next token is greater", async () => {
    const options: Options = {
      backend: "redis",
      masterName: setup.masterName,
      endpoints: setup.endpoints,
      waitReplicas: 1,
      ttl: 10_000,
    };
    const holder = New(options);
    // Its own connection (another dialTimeout is another config).
    const competitor = New({ ...options, dialTimeout: 4_000 });
    const name = prefix("failover");
    const key = `lock:{${name}}`;
    const lease = await holder.lock(name);
    assert.equal(await competitor.tryLock(name), undefined);
    const killedAt = performance.now();
    const oldPort = setup.primaryPort();
    await setup.primary.shutdown("SIGKILL");
    const primary = await setup.failedOverFrom(oldPort);
    // The other replica follows the new primary, so renewals can be acknowledged.
    await setup.replicasSynced();
    assert.match(primary.cli(["GET", key]), TOKEN, "the grant was replicated");
    await assertKeptThroughFailover({
      promoted: primary,
      role: "primary",
      name,
      lease,
      holder,
      competitor,
      killedAt,
      ttl: 10_000,
    });
  });
});
