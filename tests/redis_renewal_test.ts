// Renewals are scheduled per client, not per lease: one renewal pass sends one
// fenced multi-key script per hundred held locks, and a refused key loses
// only its own lease. Counted on the servers (INFO commandstats).

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { Redis } from "ioredis";
import { type Lease, type Locker, LockLostError, New } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { RedisServer } from "./_servers.ts";
import { prefix, sleep, until } from "./_util.ts";

/** How many script calls (EVALSHA and EVAL) `server` has run. */
function scriptCalls(server: RedisServer): number {
  const calls = server.commandCalls();
  return (calls.evalsha ?? 0) + (calls.eval ?? 0);
}

/** Holds `n` locks under one prefix on `locker`; resolves them in order. */
async function holdMany(locker: ReturnType<typeof New>, name: string, n: number) {
  const leases: Lease[] = [];
  for (let i = 0; i < n; i += 50) {
    const batch = Array.from(
      { length: Math.min(50, n - i) },
      (_, j) => locker.lock(`${name}/${i + j}`),
    );
    leases.push(...await Promise.all(batch));
  }
  return leases;
}

describe("redis renewals, batched per client", () => {
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

  it("renews 250 held locks with at most 3 script calls per pass, and keeps every one", async () => {
    // ttl 1.5 s: a pass about every 500 ms once the first one has gathered them.
    const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 1_500 });
    const name = prefix("batch");
    const leases = await holdMany(locker, name, 250);
    // Let the first pass gather the leases acquired over a few milliseconds.
    await sleep(1_100);
    const before = scriptCalls(server);
    const window = 2_000;
    await sleep(window);
    const calls = scriptCalls(server) - before;
    // In 2 s at least 3 passes (one per ttl/3) and at most 5 (a pass may
    // come up to half a period early): 3 calls each (250 keys, 100 a call).
    assert.ok(calls >= 3 * 3 - 1, `renewed: ${calls} script calls in ${window} ms`);
    assert.ok(calls <= 5 * 3, `${calls} script calls in ${window} ms for 250 locks`);
    for (const lease of leases) assert.equal(lease.signal.aborted, false, lease.key);
    // Each key's TTL was refreshed within the last pass.
    const pttls = await Promise.all(leases.map((l) => probe.pttl(`lock:{${l.key}}`)));
    assert.ok(Math.min(...pttls) > 500, `lowest PTTL ${Math.min(...pttls)} ms`);
    await Promise.all(leases.map((l) => l.release()));
    await locker.close();
  });

  it("loses only the lease whose key was taken; the others in its batch are renewed", async () => {
    const locker = New({ backend: "redis", endpoints: [server.endpoint], ttl: 1_500 });
    const name = prefix("refused");
    const leases = await holdMany(locker, name, 120);
    const [deleted, overwritten] = [leases[7], leases[63]];
    await probe.del(`lock:{${deleted.key}}`);
    await probe.set(`lock:{${overwritten.key}}`, "someone-else", "PX", 60_000);
    await until(() => deleted.signal.aborted && overwritten.signal.aborted, 3_000, "both lost");
    assert.ok(deleted.signal.reason instanceof LockLostError);
    assert.ok(overwritten.signal.reason instanceof LockLostError);
    // Two more passes: everyone else is still held and renewed.
    await sleep(1_200);
    const others = leases.filter((l) => l !== deleted && l !== overwritten);
    for (const lease of others) assert.equal(lease.signal.aborted, false, lease.key);
    const pttls = await Promise.all(others.map((l) => probe.pttl(`lock:{${l.key}}`)));
    assert.ok(Math.min(...pttls) > 500, `lowest PTTL ${Math.min(...pttls)} ms`);
    // The key someone else took is theirs still: the lost lease never touched it.
    assert.equal(await probe.get(`lock:{${overwritten.key}}`), "someone-else");
    await Promise.all(leases.map((l) => l.release()));
    await probe.del(`lock:{${overwritten.key}}`);
    await locker.close();
  });
});

describe("redlock renewals, batched per instance", () => {
  let servers: RedisServer[];
  before(async () => {
    servers = [await RedisServer.start(), await RedisServer.start(), await RedisServer.start()];
  });
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  it("sends each instance at most 2 script calls per pass for 150 locks", async () => {
    const locker = New({
      backend: "redis",
      endpoints: servers.map((s) => s.endpoint),
      ttl: 1_500,
    });
    const leases = await holdMany(locker, prefix("redlock"), 150);
    await sleep(1_100);
    const before = servers.map(scriptCalls);
    await sleep(2_000);
    const after = servers.map(scriptCalls);
    after.forEach((calls, i) => {
      const renewals = calls - before[i];
      assert.ok(renewals >= 2 * 3 - 1, `instance ${i}: ${renewals} script calls`);
      assert.ok(renewals <= 2 * 5, `instance ${i}: ${renewals} script calls for 150 locks`);
    });
    for (const lease of leases) assert.equal(lease.signal.aborted, false, lease.key);
    await Promise.all(leases.map((l) => l.release()));
    await locker.close();
  });
});

describe("redis writes, coalesced per tick", () => {
  let server: RedisServer;
  before(async () => {
    server = await RedisServer.start();
  });
  after(async () => {
    await server.stop();
  });

  /**
   * Runs `body` with a locker on a client of its own (nothing else writes to
   * its socket), the scripts loaded so that no NOSCRIPT retry counts.
   */
  async function onOwnClient(
    label: string,
    body: (client: Redis, locker: Locker, name: string) => Promise<void>,
  ): Promise<void> {
    const client = new Redis({ host: "127.0.0.1", port: server.port });
    const locker = createRedisLocker(client);
    try {
      const name = prefix(label);
      await (await locker.lock(`${name}/warm`)).release();
      await body(client, locker, name);
    } finally {
      await locker.close();
      client.disconnect();
    }
  }

  it("sends the acquisitions and releases that 64 workers start in one tick in one socket write each", () =>
    onOwnClient("tick", async (client, locker, name) => {
      // What reaches the socket's handle: one _write or _writev per flush.
      const stream = (client as unknown as { stream: Record<string, (...a: unknown[]) => unknown> })
        .stream;
      let flushes = 0;
      for (const method of ["_write", "_writev"]) {
        const original = stream[method];
        stream[method] = function (this: unknown, ...args: unknown[]) {
          flushes++;
          return original.apply(this, args);
        };
      }
      const leases = await Promise.all(
        Array.from({ length: 64 }, (_, i) => locker.lock(`${name}/${i}`)),
      );
      const acquiring = flushes;
      flushes = 0;
      await Promise.all(leases.map((lease) => lease.release()));
      assert.equal(leases.length, 64);
      assert.ok(acquiring <= 2, `64 acquisitions took ${acquiring} socket writes`);
      assert.ok(flushes <= 2, `64 releases took ${flushes} socket writes`);
      assert.equal(await client.dbsize(), 64 + 1, "each lock's fencing counter, and no lock key");
    }));

  it("keeps the wire in call order when a write that is not a plain string comes mid-tick", () =>
    // The user's own commands on the locker's client: a Buffer argument makes
    // ioredis write a Buffer, which goes out after the scripts held before
    // it and before those after it. Out of order, replies would reach the
    // wrong callers (ioredis matches them by order).
    onOwnClient("order", async (client, locker, name) => {
      const key = Buffer.from(`${name}/plain`);
      const [first, set, second, got, third] = await Promise.all([
        locker.lock(`${name}/1`),
        client.set(key, "value"),
        locker.lock(`${name}/2`),
        client.getBuffer(key),
        locker.tryLock(`${name}/1`),
      ]);
      assert.equal(set, "OK");
      assert.equal(got?.toString(), "value");
      assert.equal(third, undefined, "lock 1 is held");
      assert.deepEqual([first.token, second.token], [1n, 1n], "each a new key's first grant");
      await Promise.all([first.release(), second.release()]);
      assert.equal(await client.exists(`lock:{${name}/1}`, `lock:{${name}/2}`), 0);
    }));
});
