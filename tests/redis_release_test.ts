// A Redis lock taken away behind its holder's back (deleted, flushed or
// overwritten) must not pass for held: the release finds it gone and says so.
import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { Redis } from "ioredis";
import { LockLostError, New } from "../mod.ts";
import { RedisServer } from "./_servers.ts";
import { prefix, Provoked } from "./_util.ts";

const provoked = new Provoked();
const keep = <T>(error: T) => provoked.keep(error);

describe("redis release of a lock taken away", () => {
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

  const locker = (ttl = 30_000) => New({ backend: "redis", endpoints: [server.endpoint], ttl });

  it("withLock() rejects with a LockLostError when the key was deleted while the work ran", async () => {
    const name = prefix("deleted");
    const first = locker();
    const second = locker();
    let taken: bigint | undefined;
    let signal: AbortSignal | undefined;
    try {
      const error = keep(
        await first.withLock(name, async (lease) => {
          signal = lease.signal;
          await probe.del(`lock:{${name}}`);
          // Another holder gets the lock while this work still runs.
          const other = await second.tryLock(name);
          assert.ok(other, "the second locker takes the deleted lock");
          taken = other.token;
          await other.release();
          return "done";
        }).catch((e) => e),
      );
      assert.ok(taken !== undefined);
      assert.ok(error instanceof LockLostError, inspect(error));
      assert.equal(
        error.message,
        `Lost lock ${JSON.stringify(name)}: it was taken away before the release`,
      );
      assert.equal(signal!.aborted, true);
      assert.equal(signal!.reason, error);
    } finally {
      await Promise.all([first.close(), second.close()]);
    }
  });

  it("release() resolves and aborts lease.signal when another holder overwrote the key", async () => {
    const name = prefix("overwritten");
    const holder = locker();
    try {
      const lease = await holder.lock(name);
      await probe.set(`lock:{${name}}`, "someone-else", "PX", 30_000);
      await lease.release();
      assert.ok(lease.signal.reason instanceof LockLostError, inspect(lease.signal.reason));
      // The fenced release left the other holder's key alone.
      assert.equal(await probe.get(`lock:{${name}}`), "someone-else");
    } finally {
      await holder.close();
      await probe.del(`lock:{${name}}`);
    }
  });

  it("release() after FLUSHALL aborts lease.signal with a LockLostError", async () => {
    const name = prefix("flushed");
    const holder = locker();
    try {
      const lease = await holder.lock(name);
      await probe.flushall();
      await lease.release();
      assert.ok(lease.signal.reason instanceof LockLostError, inspect(lease.signal.reason));
    } finally {
      await holder.close();
    }
  });

  it("an ordinary release leaves lease.signal alone", async () => {
    const name = prefix("ordinary");
    const holder = locker();
    try {
      const lease = await holder.lock(name);
      await lease.release();
      assert.equal(lease.signal.aborted, false);
      assert.equal(await probe.exists(`lock:{${name}}`), 0);
    } finally {
      await holder.close();
    }
  });
});

describe("redis release errors", () => {
  it("never show a lock token in any error these tests provoked", () => {
    provoked.assertClean([]);
  });
});
