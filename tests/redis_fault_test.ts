// Redis connection faults: restarts, dropped subscriber connections, a
// stalled server during close(), and what errors say. Each group starts its
// own server, since these tests kill connections and restart servers.

import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { type Locker, LockTimeoutError, New } from "../mod.ts";
import { RedisServer } from "./_servers.ts";
import { prefix, Provoked, until, within } from "./_util.ts";

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
