import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { LockTimeoutError, New } from "../mod.ts";
import { createMemoryLocker, MemoryStore } from "../backends/memory.ts";
import { conformance } from "./_conformance.ts";
import { prefix, until } from "./_util.ts";

const store = new MemoryStore();

conformance({
  name: "memory",
  locker: (options) => createMemoryLocker(store, options),
  shortTtl: 60,
  fifoAcrossLockers: true,
  leftovers: (keyPrefix) => Promise.resolve(store.records(keyPrefix)),
});

describe('New({ backend: "memory" })', () => {
  it("gives lockers that exclude each other through the shared store", async () => {
    const a = New({ backend: "memory" });
    const b = New({ backend: "memory", password: "ignored in one process" });
    const key = `${prefix()}/shared`;
    const lease = await a.lock(key, { signal: AbortSignal.timeout(2_000) });
    assert.equal(await b.tryLock(key), undefined);
    await a.close();
    const next = await b.lock(key, { timeout: 2_000 });
    assert.ok(next.token > lease.token);
    await b.close();
  });

  it("gives a fresh key tokens 1n, 2n, ... while the shared store lives", async () => {
    const a = New({ backend: "memory" });
    const first = await a.lock(`${prefix()}/a`);
    const second = await a.lock(`${prefix()}/b`);
    assert.equal(second.token, first.token + 1n);
    await a.close();
  });
});

describe("MemoryStore", () => {
  it("keeps no record of a key once it is released and unwaited", async () => {
    const own = new MemoryStore();
    const locker = createMemoryLocker(own, { ttl: 5_000, autoRenew: false });
    const held = await locker.lock("/a");
    const waiting = createMemoryLocker(own).lock("/a", { timeout: 100 }).catch((e) => e);
    await until(() => own.records() === 2, 1_000, "the waiter to queue");
    assert.ok((await waiting) instanceof LockTimeoutError);
    assert.equal(own.records(), 1);
    await held.release();
    assert.equal(own.records(), 0);
    await locker.close();
  });

  it("createMemoryLocker() rejects what is not a store", () => {
    assert.throws(() => createMemoryLocker({} as MemoryStore), {
      name: "TypeError",
      message: 'Invalid argument "store": expected a MemoryStore',
    });
  });
});
