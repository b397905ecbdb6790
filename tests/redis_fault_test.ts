// Redis connection faults: restarts, dropped subscriber connections, a
// stalled server during close(), and what errors say. Each group starts its
// own server, since these tests kill connections and restart servers.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { Redis, type RedisOptions } from "ioredis";
import {
  type Lease,
  LockConnectionError,
  type Locker,
  LockError,
  LockTimeoutError,
  New,
} from "../mod.ts";
import { createRedisLocker, type RedisClient } from "../backends/redis.ts";
import { TcpProxy } from "./_proxy.ts";
import { RedisServer } from "./_servers.ts";
import { prefix, Provoked, sleep, until, within } from "./_util.ts";

const provoked = new Provoked();
const keep = <T>(error: T) => provoked.keep(error);

/** Whether `locker` reaches Redis again: one attempt on a key beside `name`. */
async function reconnected(locker: Locker, name: string): Promise<boolean> {
  try {
    await (await locker.tryLock(`${name}/probe`))?.release();
    return true;
  } catch {
    return false;
  }
}

describe("redis waiters through a lost connection", () => {
  it("keeps a waiting lock() waiting through a restart, and acquires once the holder releases", async () => {
    const server = await RedisServer.start({
      args: ["--appendonly", "yes", "--appendfsync", "always"],
    });
    const holder = New({ backend: "redis", endpoints: [server.endpoint], ttl: 10_000 });
    const waiter = New({ backend: "redis", endpoints: [server.endpoint], retryInterval: 50 });
    try {
      const name = prefix("restart");
      const held = await holder.lock(name);
      const waiting = waiter.lock(name).catch((e) => keep(e));
      assert.equal(await within(waiting, 300, "waiting"), "waiting");
      await server.shutdown("SIGTERM");
      await server.restart();
      // The holder's lock survived (AOF); the waiter must still be waiting.
      assert.equal(await within(waiting, 1_500, "waiting"), "waiting", "the waiter gave up");
      await until(() => reconnected(holder, name), 10_000, "the holder's client to reconnect");
      await held.release();
      const lease = await within(waiting, 5_000, undefined);
      assert.ok(lease && "token" in lease, `the waiter ended with ${inspect(lease)}`);
      assert.ok(lease.token > held.token, `token ${lease.token} after ${held.token}`);
      await lease.release();
    } finally {
      await Promise.allSettled([holder.close(), waiter.close()]);
      await server.stop();
    }
  });

  it("ends a wait while Redis is down with the caller's timeout, not a connection error", async () => {
    const server = await RedisServer.start();
    const waiter = New({ backend: "redis", endpoints: [server.endpoint] });
    try {
      const name = prefix("down");
      assert.ok(await reconnected(waiter, name), "connected before the outage");
      await server.shutdown("SIGKILL");
      const started = performance.now();
      const error = keep(await waiter.lock(name, { timeout: 800 }).catch((e) => e));
      const elapsed = performance.now() - started;
      assert.ok(error instanceof LockTimeoutError, inspect(error));
      assert.ok(elapsed >= 700, `gave up after ${elapsed.toFixed(0)} ms`);
    } finally {
      await waiter.close();
      await server.stop();
    }
  });
});

/**
 * The channels a waiting client on one Redis hears for one lock: the lock's
 * own, and its process's hand-off channel (`...:released:to:<id>`).
 */
const PER_WAITER = 2;

/** The subscriptions to the lock's channels (see {@linkcode PER_WAITER}). */
async function subscribers(probe: Redis, name: string): Promise<number> {
  const channels = await probe.pubsub("CHANNELS", `lock:{${name}}:released*`) as string[];
  if (channels.length === 0) return 0;
  const counts = await probe.pubsub("NUMSUB", ...channels) as (string | number)[];
  return counts.filter((_, i) => i % 2 === 1).reduce((a: number, b) => a + Number(b), 0);
}

/** Releases `held` and resolves how long `waiting` then took to get the lock. */
async function handOff(held: Lease, waiting: Promise<Lease>): Promise<number> {
  const released = performance.now();
  await held.release();
  const lease = await within(waiting, 10_000, undefined);
  assert.ok(lease, "the waiter never got the lock");
  const elapsed = performance.now() - released;
  await lease.release();
  return elapsed;
}

describe("redis pub/sub wake-ups", () => {
  let server: RedisServer;
  let probe: Redis;
  before(async () => {
    server = await RedisServer.start();
    probe = new Redis({ host: "127.0.0.1", port: server.port });
  });
  after(async () => {
    probe.disconnect();
    await server.stop();
  });

  it("subscribes again when the subscriber connection drops while its SUBSCRIBE is in flight", async () => {
    const proxy = await TcpProxy.start(server.endpoint);
    const holder = New({ backend: "redis", endpoints: [server.endpoint] });
    // A poll this slow cannot pass for a wake-up.
    const waiter = New({ backend: "redis", endpoints: [proxy.endpoint], retryInterval: 5_000 });
    try {
      const name = prefix("in-flight");
      const held = await holder.lock(name);
      assert.ok(await reconnected(waiter, name), "the waiter's client is connected");
      // Slow link: the server has the SUBSCRIBE while its confirmation is still on the way.
      proxy.delayMs = 400;
      const waiting = waiter.lock(name);
      await until(
        async () => await subscribers(probe, name) === PER_WAITER,
        15_000,
        "the SUBSCRIBE",
      );
      await probe.call("CLIENT", "KILL", "TYPE", "pubsub");
      proxy.delayMs = 0;
      await until(
        async () => await subscribers(probe, name) === PER_WAITER,
        4_000,
        "the subscriber to subscribe again after its reconnect",
      );
      const elapsed = await handOff(held, waiting);
      assert.ok(elapsed < 2_000, `the hand-off took ${elapsed.toFixed(0)} ms: a poll`);
    } finally {
      await Promise.allSettled([holder.close(), waiter.close()]);
      await proxy.close();
    }
  });

  it("wakes waiters on a client made with enableOfflineQueue: false", async () => {
    const client = new Redis({ host: "127.0.0.1", port: server.port, enableOfflineQueue: false });
    await new Promise((resolve) => client.once("ready", resolve));
    const holder = New({ backend: "redis", endpoints: [server.endpoint] });
    const waiter = createRedisLocker(client, { retryInterval: 5_000 });
    try {
      const name = prefix("no-offline-queue");
      const held = await holder.lock(name);
      const waiting = waiter.lock(name);
      await until(
        async () => await subscribers(probe, name) === PER_WAITER,
        4_000,
        "the SUBSCRIBE",
      );
      const elapsed = await handOff(held, waiting);
      assert.ok(elapsed < 2_000, `the hand-off took ${elapsed.toFixed(0)} ms: a poll`);
    } finally {
      await Promise.allSettled([holder.close(), waiter.close()]);
      client.disconnect();
    }
  });
});

describe("redis subscriber that cannot connect", () => {
  it("queues no SUBSCRIBE while it cannot connect, and subscribes only what is still wanted", async () => {
    const server = await RedisServer.start();
    const probe = new Redis({ host: "127.0.0.1", port: server.port });
    // Two lockers on one shared client: one holds, the other waits and subscribes.
    const holder = New({ backend: "redis", endpoints: [server.endpoint] });
    const waiter = New({ backend: "redis", endpoints: [server.endpoint], retryInterval: 5_000 });
    try {
      const name = prefix("full");
      assert.ok(await reconnected(waiter, name), "the shared client is connected");
      // The probe and the shared client fill the server: the subscriber is refused.
      await probe.config("SET", "maxclients", "2");
      await probe.call("CONFIG", "RESETSTAT");
      for (let i = 0; i < 20; i++) {
        const held = await holder.lock(`${name}/${i}`);
        keep(await waiter.lock(`${name}/${i}`, { timeout: 150 }).catch((e) => e));
        await held.release();
      }
      await sleep(1_500); // every channel's linger is over: none is wanted any more
      const held = await holder.lock(name);
      const waiting = waiter.lock(name);
      await sleep(300);
      await probe.config("SET", "maxclients", "100");
      await until(
        async () => await subscribers(probe, name) === PER_WAITER,
        6_000,
        "the SUBSCRIBE",
      );
      await sleep(300);
      // One SUBSCRIBE per channel of the one lock still wanted; none for the 20 gone meanwhile.
      const stats = await probe.info("commandstats");
      assert.match(stats, new RegExp(`cmdstat_subscribe:calls=${PER_WAITER},`), stats);
      const elapsed = await handOff(held, waiting);
      assert.ok(elapsed < 2_000, `the hand-off took ${elapsed.toFixed(0)} ms`);
    } finally {
      await Promise.allSettled([holder.close(), waiter.close()]);
      probe.disconnect();
      await server.stop();
    }
  });
});

describe("redis close() while Redis is stalled", () => {
  it("gives back an acquisition that timed out in flight, once Redis answers, before close() resolves", async () => {
    const server = await RedisServer.start();
    const probe = new Redis({ host: "127.0.0.1", port: server.port });
    const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 10_000 });
    const name = prefix("ghost");
    try {
      assert.ok(await reconnected(locker, name), "connected before the stall");
      server.child!.signal("SIGSTOP");
      let closed: Promise<unknown>;
      try {
        const error = keep(await locker.lock(name, { timeout: 300 }).catch((e) => e));
        assert.ok(error instanceof LockTimeoutError, inspect(error));
        closed = locker.close().catch((e) => keep(e));
        await sleep(800); // longer than close() gives QUIT
      } finally {
        server.child!.signal("SIGCONT");
      }
      await closed;
      // The SET ran when Redis resumed; a ghost would hold the key for its 10 s TTL.
      await until(
        async () => await probe.exists(`lock:{${name}}`) === 0,
        2_000,
        "the late give-back of the key",
      );
    } finally {
      await locker.close().catch(() => {});
      probe.disconnect();
      await server.stop();
    }
  });

  it("status() rejects with a LockConnectionError within dialTimeout while Redis is stalled", async () => {
    const server = await RedisServer.start();
    const locker = New({ backend: "redis", endpoints: [server.endpoint], dialTimeout: 500 });
    const name = prefix("stalled-status");
    try {
      assert.ok(await reconnected(locker, name), "connected before the stall");
      server.child!.signal("SIGSTOP");
      const started = performance.now();
      const outcome = await within(locker.status(name).catch((e) => e), 3_000, "still pending");
      const elapsed = performance.now() - started;
      assert.ok(outcome instanceof LockConnectionError, inspect(outcome));
      assert.match(outcome.message, /did not answer within 500 ms/);
      assert.ok(elapsed < 1_500, `status() gave up after ${elapsed.toFixed(0)} ms`);
    } finally {
      server.child?.signal("SIGCONT");
      await locker.close().catch(() => {});
      await server.stop();
    }
  });

  it("still ends close() within its bound when Redis stays stalled", async () => {
    const server = await RedisServer.start();
    const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 30_000 });
    const name = prefix("stalled-close");
    try {
      assert.ok(await reconnected(locker, name), "connected before the stall");
      server.child!.signal("SIGSTOP");
      keep(await locker.lock(name, { timeout: 300 }).catch((e) => e));
      const started = performance.now();
      await locker.close().catch((e) => keep(e));
      const elapsed = performance.now() - started;
      // At most 5 s for the late answer, then QUIT's 500 ms and the hang-up.
      assert.ok(elapsed < 8_000, `close() took ${elapsed.toFixed(0)} ms`);
    } finally {
      server.child?.signal("SIGCONT");
      await server.stop();
    }
  });
});

const PASSWORD = "fault-Secret-7b3e";

describe("redis errors", () => {
  it("releases as a user without channel rights, and its waiters get the lock by polling", async () => {
    const server = await RedisServer.start();
    // Redis 7 gives a new user no channels (acl-pubsub-default resetchannels).
    server.cli(["ACL", "SETUSER", "nochannels", "on", `>${PASSWORD}`, "~lock:*", "+@all"]);
    const options = {
      backend: "redis" as const,
      endpoints: [server.endpoint],
      username: "nochannels",
      password: PASSWORD,
    };
    const holder = New(options);
    const waiter = New({ ...options, ttl: 5_000 });
    try {
      const name = prefix("nochannels");
      const held = await holder.lock(name);
      const waiting = waiter.lock(name, { timeout: 5_000 }).catch((e) => keep(e));
      assert.equal(await within(waiting, 300, "waiting"), "waiting");
      // The DEL ran; only the PUBLISH was refused.
      const released = await held.release().then(() => "released", (e) => keep(e));
      assert.equal(released, "released", inspect(released));
      const lease = await waiting;
      assert.ok(lease && "token" in lease, inspect(lease));
      assert.ok(lease.token > held.token);
    } finally {
      await Promise.allSettled([holder.close(), waiter.close()]);
      await server.stop();
    }
  });

  it("says the server's reason when it has no room for another client", async () => {
    const server = await RedisServer.start({ args: ["--maxclients", "1"] });
    const hog = new Redis({ host: "127.0.0.1", port: server.port });
    const locker = New({ backend: "redis", endpoints: [server.endpoint], dialTimeout: 2_000 });
    try {
      await hog.ping();
      const error = keep(await locker.lock(prefix("full")).catch((e) => e));
      assert.ok(error instanceof LockConnectionError, inspect(error));
      assert.match(error.message, /max number of clients reached/, error.message);
      assert.ok(error.message.startsWith(`Cannot connect to Redis at ${server.endpoint}: `));
    } finally {
      await locker.close();
      hog.disconnect();
      await server.stop();
    }
  });

  it("calls a CROSSSLOT answer what Redis answered, not a connection error, and stops waiting", async () => {
    const server = await RedisServer.start({
      args: ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
    });
    server.cli(["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    const redis = new Redis({ host: "127.0.0.1", port: server.port });
    const locker = createRedisLocker(crossSlot(redis));
    try {
      await until(
        () => server.cli(["CLUSTER", "INFO"]).includes("cluster_state:ok"),
        10_000,
        "cluster_state:ok",
      );
      const started = performance.now();
      const error = keep(
        await locker.lock(prefix("crossslot"), { timeout: 3_000 }).catch((e) => e),
      );
      assert.ok(error instanceof LockError, inspect(error));
      assert.ok(!(error instanceof LockConnectionError), inspect(error));
      assert.ok(!(error instanceof LockTimeoutError), `waited: ${inspect(error)}`);
      assert.match(error.message, /the given client answered: CROSSSLOT/, error.message);
      assert.ok(performance.now() - started < 2_000);
    } finally {
      await locker.close();
      redis.disconnect();
      await server.stop();
    }
  });

  it("never show the password or a lock token in any error these tests provoked", () => {
    provoked.assertClean([PASSWORD]);
  });
});

/**
 * The caller's client, but each script also names a key of another slot:
 * a Redis in cluster mode answers CROSSSLOT, as it does to a command whose
 * keys hash to different slots.
 */
function crossSlot(redis: Redis): RedisClient {
  const withKey = (count: number, rest: (string | number)[]) =>
    [count + 1, ...rest.slice(0, count), "{elsewhere}", ...rest.slice(count)] as const;
  return {
    evalsha: (sha: string, count: number, ...rest: (string | number)[]) =>
      redis.evalsha(sha, ...withKey(count, rest)),
    eval: (script: string, count: number, ...rest: (string | number)[]) =>
      redis.eval(script, ...withKey(count, rest)),
    duplicate: (options?: RedisOptions) => redis.duplicate(options),
  };
}
