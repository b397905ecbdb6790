import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { inspect } from "node:util";
import { Redis } from "ioredis";
import { LockConnectionError, LockLostError, LockTimeoutError, New } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { conformance } from "./_conformance.ts";
import { assertExitsAfterClose, assertPausedHolderLoses } from "./_scenarios.ts";
import { type Child, freePort, RedisServer, runScript } from "./_servers.ts";
import { prefix, Provoked, sleep, TOKEN, until, within } from "./_util.ts";

const fixture = new URL("./fixtures/holder.ts", import.meta.url).pathname;

/** Every error these tests provoke, scanned for secrets at the end. */
const provoked = new Provoked();
const keep = <T>(error: T) => provoked.keep(error);

/** Lock keys (not fencing counters, which outlive locks by design) under a prefix. */
async function lockKeys(client: Redis, keyPrefix: string): Promise<string[]> {
  const keys = await client.keys(`lock:{${keyPrefix}*`);
  return keys.filter((k) => !k.endsWith(":fence"));
}

describe("redis backend", () => {
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

  conformance({
    name: "redis",
    locker: (options) => New({ backend: "redis", endpoints: [server.endpoint], ...options }),
    shortTtl: 300,
    // Lockers of one process share a client and queue in it, first come,
    // first served; across processes, "hand-off across processes" below.
    fifoAcrossLockers: false,
    leftovers: async (keyPrefix) => (await lockKeys(probe, keyPrefix)).length,
  });

  describe("layout", () => {
    it("keeps the lock, its fencing counter and its channel under one hash tag", async () => {
      const locker = New({ backend: "redis", endpoints: [server.endpoint] });
      const name = prefix("layout");
      const lease = await locker.lock(name);
      const keys = (await probe.keys(`lock:{${name}}*`)).sort();
      assert.deepEqual(keys, [`lock:{${name}}`, `lock:{${name}}:fence`]);
      assert.equal(await probe.get(`lock:{${name}}:fence`), String(lease.token));
      assert.match(
        (await probe.get(`lock:{${name}}`))!,
        TOKEN,
      );
      const ttl = await probe.pttl(`lock:{${name}}`);
      assert.ok(ttl > 9_000 && ttl <= 10_000, `PTTL ${ttl}`);
      await locker.close();
      assert.deepEqual(await lockKeys(probe, name), []);
    });
  });

  describe("hand-off across processes", () => {
    it("hands the lock to waiters in other processes in the order they came, not after their 5 s poll", async () => {
      const name = prefix("handoff");
      const locker = New({ backend: "redis", endpoints: [server.endpoint] });
      const held = await locker.lock(name);
      const children: Child[] = [];
      try {
        for (let i = 0; i < 3; i++) {
          children.push(
            runScript(fixture, ["once", "redis", server.endpoint, name, "10000"], {
              GENESIS_RETRY_INTERVAL: "5000",
              GENESIS_HOLD: "30",
            }),
          );
          // The child finds the lock held, subscribes, and takes its place
          // in the lock's queue before the next one starts.
          await until(
            async () => await probe.zcard(`lock:{${name}}:queue`) === i + 1,
            20_000,
            `waiter ${i} in the queue`,
          );
        }
        await sleep(100); // and their first attempts are done
        for (const child of children) assert.doesNotMatch(child.output, /HELD/);
        const released = performance.now();
        await held.release();
        await Promise.all(children.map((child) => child.waitFor(/DONE/, 4_000)));
        const elapsed = performance.now() - released;
        // Three hand-offs; one missed notification alone would cost a 5 s poll.
        assert.ok(elapsed < 2_500, `three hand-offs took ${elapsed.toFixed(0)} ms`);
        const tokens = children.map((c) => BigInt(c.output.match(/HELD (\d+)/)![1]));
        // Each release handed the lock to the next in the queue, in order,
        // and no attempt took it in between: the tokens follow the holder's
        // one by one, in the children's order.
        assert.deepEqual(tokens, [1n, 2n, 3n].map((n) => held.token + n));
        assert.equal(await probe.exists(`lock:{${name}}:queue`), 0, "the queue is empty");
      } finally {
        await Promise.all(children.map((c) => c.stop()));
        await locker.close();
      }
    });

    /** A locker on a client of its own, so that it queues on the server, not in this process. */
    const own = (retryInterval = 5_000) => {
      const client = new Redis({ host: "127.0.0.1", port: server.port });
      const locker = createRedisLocker(client, { retryInterval });
      return {
        locker,
        close: async () => {
          await locker.close();
          client.disconnect();
        },
      };
    };
    const queued = (name: string) => probe.zcard(`lock:{${name}}:queue`);

    it("skips a queued waiter that gave up: the next one gets the lock at the release", async () => {
      const name = prefix("gave-up");
      const [a, b, c] = [own(), own(), own()];
      try {
        const held = await a.locker.lock(name);
        const quitting = b.locker.lock(name, { timeout: 600 });
        await until(async () => await queued(name) === 1, 5_000, "b in the queue");
        const waiting = c.locker.lock(name);
        await until(async () => await queued(name) === 2, 5_000, "c in the queue");
        await assert.rejects(quitting, LockTimeoutError);
        await until(async () => await queued(name) === 1, 5_000, "b out of the queue");
        const released = performance.now();
        await held.release();
        const lease = await within(waiting, 4_000, undefined);
        assert.ok(lease, "c waited for its 5 s poll");
        assert.ok(performance.now() - released < 1_000);
        assert.equal(lease.token, held.token + 1n);
        await lease.release();
      } finally {
        await Promise.all([a.close(), b.close(), c.close()]);
      }
    });

    it("skips a queued waiter whose process died: the next one gets the lock at the release", async () => {
      const name = prefix("died");
      const [a, c] = [own(), own()];
      let child: Child | undefined;
      try {
        const held = await a.locker.lock(name);
        child = runScript(fixture, ["once", "redis", server.endpoint, name, "10000"], {
          GENESIS_RETRY_INTERVAL: "5000",
        });
        await until(async () => await queued(name) === 1, 20_000, "the child in the queue");
        const waiting = c.locker.lock(name);
        await until(async () => await queued(name) === 2, 5_000, "c in the queue");
        child.signal("SIGKILL");
        await child.exited;
        const released = performance.now();
        await held.release();
        const lease = await within(waiting, 4_000, undefined);
        assert.ok(lease, "c waited for its 5 s poll");
        assert.ok(performance.now() - released < 1_000);
        assert.doesNotMatch(child.output, /HELD/);
        await lease.release();
        assert.equal(await queued(name), 0);
      } finally {
        await child?.stop();
        await Promise.all([a.close(), c.close()]);
      }
    });

    it("takes its place in the queue in one script when its process waited for the key just before", async () => {
      const name = prefix("again");
      const [a, b] = [own(), own()];
      /** Scripts the server has run so far (by SHA or by text). */
      const scripts = async () => {
        const stats = await probe.info("commandstats");
        return [...stats.matchAll(/^cmdstat_eval(?:sha)?:calls=(\d+)/gm)]
          .reduce((sum, m) => sum + Number(m[1]), 0);
      };
      try {
        const first = await a.locker.lock(name);
        const second = b.locker.lock(name); // b waits: a plain attempt, then in the queue
        await until(async () => await queued(name) === 1, 5_000, "b in the queue");
        await first.release();
        const handed = await within(second, 4_000, undefined);
        assert.ok(handed, "b waited for its 5 s poll");
        assert.equal(handed.token, first.token + 1n);
        // b waited for this key a moment ago: asked for it again while a
        // holds it, it takes its place in the queue at once.
        const third = a.locker.lock(name);
        await until(async () => await queued(name) === 1, 5_000, "a in the queue");
        await handed.release();
        const again = await within(third, 4_000, undefined);
        assert.ok(again, "a waited for its 5 s poll");
        const before = await scripts();
        const fourth = b.locker.lock(name);
        await until(async () => await queued(name) === 1, 5_000, "b in the queue again");
        assert.equal(await scripts() - before, 1, "scripts to queue b again");
        await again.release();
        const last = await within(fourth, 4_000, undefined);
        assert.ok(last, "b waited for its 5 s poll");
        assert.equal(last.token, first.token + 3n);
        await last.release();
        assert.equal(await queued(name), 0);
      } finally {
        await Promise.all([a.close(), b.close()]);
      }
    });

    it("lets the process exit by itself after close()", async () => {
      await assertExitsAfterClose({ backend: "redis", endpoints: [server.endpoint] }, "exit");
    });
  });

  describe("a stalled server (SIGSTOP)", () => {
    it("leaves no key behind when an acquisition in flight times out", async () => {
      const name = prefix("stall");
      const locker = New({ backend: "redis", endpoints: [server.endpoint] });
      await (await locker.lock(`${name}/warm`)).release(); // connected before the stall
      server.child!.signal("SIGSTOP");
      try {
        const started = performance.now();
        const error = keep(await locker.tryLock(name, { timeout: 300 }).catch((e) => e));
        assert.ok(error instanceof LockTimeoutError, inspect(error));
        assert.ok(performance.now() - started < 1_000);
      } finally {
        server.child!.signal("SIGCONT");
      }
      // The SET ran when the server woke; the late answer released it.
      await until(async () => (await lockKeys(probe, name)).length === 0, 3_000, "no ghost lock");
      assert.deepEqual(await lockKeys(probe, name), []);
      const lease = await locker.tryLock(name);
      assert.ok(lease, "the key is free");
      await locker.close();
    });

    it("decides loss locally while the server cannot answer", async () => {
      const name = prefix("stall-held");
      const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 500 });
      const lease = await locker.lock(name);
      const stopped = performance.now();
      server.child!.signal("SIGSTOP");
      try {
        await new Promise((resolve) => lease.signal.addEventListener("abort", resolve));
        const after = performance.now() - stopped;
        assert.ok(lease.signal.reason instanceof LockLostError);
        assert.ok(after < 500 + 100, `lost ${after.toFixed(0)} ms after the stall`);
      } finally {
        server.child!.signal("SIGCONT");
      }
      await locker.close();
    });
  });

  describe("a holder process paused past its TTL", () => {
    it("loses the lock to another process and sees the loss on its first turn after SIGCONT", async () => {
      await assertPausedHolderLoses(
        { backend: "redis", endpoints: [server.endpoint] },
        /^LOST Lost lock ".*": its 1000 ms lease ran out/,
      );
    });
  });

  describe("createRedisLocker() on a client the caller owns", () => {
    it("locks with the caller's client and never closes it", async () => {
      const client = new Redis({ host: "127.0.0.1", port: server.port });
      const locker = createRedisLocker(client, { ttl: 2_000 });
      const name = prefix("owned");
      const lease = await locker.lock(name);
      const other = New({ backend: "redis", endpoints: [server.endpoint] });
      assert.equal(await other.tryLock(name), undefined);
      await lease.release();
      await Promise.all([locker.close(), other.close()]);
      assert.equal(await client.ping(), "PONG", "the caller's client still works");
      client.disconnect();
    });

    it("rejects what is not an ioredis client", () => {
      assert.throws(() => createRedisLocker({} as never), {
        name: "TypeError",
        message: 'Invalid argument "client": expected an ioredis Redis or Cluster client',
      });
    });
  });
});

describe("redis connection", () => {
  it("rejects with a LockConnectionError naming the endpoint when nothing listens", async () => {
    const endpoint = `127.0.0.1:${await freePort()}`;
    const locker = New({ backend: "redis", endpoints: [endpoint], dialTimeout: 500 });
    const started = performance.now();
    const error = keep(await locker.lock(prefix("down")).catch((e) => e));
    assert.ok(error instanceof LockConnectionError, inspect(error));
    assert.ok(error.message.startsWith(`Cannot connect to Redis at ${endpoint}: `), error.message);
    assert.ok(performance.now() - started < 500 + 500);
    await locker.close();
  });

  it("rejects within dialTimeout when the server accepts but never answers", async () => {
    const sockets: Socket[] = [];
    const blackHole = createServer((socket) => void sockets.push(socket));
    await new Promise<void>((resolve) => blackHole.listen(0, "127.0.0.1", resolve));
    const endpoint = `127.0.0.1:${(blackHole.address() as { port: number }).port}`;
    const locker = New({ backend: "redis", endpoints: [endpoint], dialTimeout: 500 });
    try {
      const started = performance.now();
      const error = keep(await locker.lock(prefix("hung")).catch((e) => e));
      const elapsed = performance.now() - started;
      assert.ok(error instanceof LockConnectionError, inspect(error));
      assert.equal(
        error.message,
        `Cannot connect to Redis at ${endpoint}: no answer within 500 ms`,
      );
      assert.ok(elapsed >= 450 && elapsed < 1_500, `took ${elapsed.toFixed(0)} ms`);
    } finally {
      await locker.close();
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => blackHole.close(resolve));
    }
  });
});

describe("redis restarts", () => {
  it("keeps the lock and the fencing counter across a restart with appendfsync always", async () => {
    const server = await RedisServer.start({
      args: ["--appendonly", "yes", "--appendfsync", "always"],
    });
    try {
      const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 5_000 });
      const name = prefix("aof");
      const held = await locker.lock(name);
      await server.shutdown("SIGTERM");
      await server.restart();
      await sleep(2_000); // renewals reconnect and go on
      assert.equal(held.signal.aborted, false, `lost: ${held.signal.reason}`);
      await held.release();
      const next = await locker.lock(name);
      assert.ok(next.token > held.token, `token ${next.token} after ${held.token}`);
      await locker.close();
    } finally {
      await server.stop();
    }
  });

  it("without persistence, loses the lock and starts the tokens again (documented)", async () => {
    const server = await RedisServer.start();
    try {
      const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 3_000 });
      const name = prefix("volatile");
      for (let i = 0; i < 3; i++) await (await locker.lock(name)).release();
      const held = await locker.lock(name);
      assert.equal(held.token, 4n);
      await server.shutdown("SIGKILL");
      await server.restart();
      await new Promise((resolve) => held.signal.addEventListener("abort", resolve));
      assert.match(String(held.signal.reason), /its key was deleted or taken over|lease ran out/);
      const next = await locker.lock(name);
      // The counter was lost with the data: the token repeats an old one.
      assert.equal(next.token, 1n);
      await locker.close();
    } finally {
      await server.stop();
    }
  });
});

describe("redis errors", () => {
  it("never show a lock token in any error these tests provoked", () => {
    provoked.assertClean([]);
  });
});
