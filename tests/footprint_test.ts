// What a held lock costs in memory: at most 2 KB of heap each, with its
// renewal scheduled and (on etcd) its watch in place, measured after a full
// garbage collection on real servers. 10,000 held locks must fit in 20 MB.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import process from "node:process";
import { type Lease, type Locker, New } from "../mod.ts";
import { EtcdCluster, RedisServer } from "./_servers.ts";
import { collectGarbage, prefix, sleep } from "./_util.ts";

/** The most heap one held lock may cost, in bytes. */
const PER_LOCK = 2_048;
const LOCKS = 2_000;

async function heapAfterGc(): Promise<number> {
  await sleep(50);
  collectGarbage();
  await sleep(50);
  collectGarbage();
  return process.memoryUsage().heapUsed;
}

/** Heap bytes per lock that `locker` holds, once each lock's watch or renewal is in place. */
async function heapPerHeldLock(locker: Locker): Promise<number> {
  const name = prefix("footprint");
  // Warm up: the client, the session, the code paths.
  for (let i = 0; i < 100; i++) await (await locker.lock(`${name}/warm/${i}`)).release();
  await sleep(300);
  const before = await heapAfterGc();
  const leases: Lease[] = [];
  for (let i = 0; i < LOCKS; i += 100) {
    leases.push(
      ...await Promise.all(Array.from({ length: 100 }, (_, j) => locker.lock(`${name}/${i + j}`))),
    );
  }
  // etcd starts a held lock's watch 100 ms after the grant: count it in.
  await sleep(500);
  const held = await heapAfterGc();
  for (const lease of leases) assert.equal(lease.signal.aborted, false, lease.key);
  await Promise.all(leases.map((lease) => lease.release()));
  return (held - before) / LOCKS;
}

describe("the heap a held lock costs", () => {
  let etcd: EtcdCluster;
  let redis: RedisServer;
  before(async () => {
    [etcd, redis] = await Promise.all([EtcdCluster.start(), RedisServer.start()]);
  });
  after(async () => {
    await Promise.all([etcd.stop(), redis.stop()]);
  });

  for (const backend of ["etcd", "redis"] as const) {
    it(`is at most 2 KB per lock for ${LOCKS} held ${backend} locks, watched and renewed`, async () => {
      const endpoints = backend === "etcd" ? etcd.endpoints : [redis.endpoint];
      const locker = New({ backend, endpoints, ttl: 30_000 });
      try {
        const bytes = await heapPerHeldLock(locker);
        assert.ok(
          bytes > 0,
          `the heap did not grow (${bytes} bytes per lock): nothing was measured`,
        );
        assert.ok(bytes <= PER_LOCK, `${Math.round(bytes)} bytes of heap per held ${backend} lock`);
      } finally {
        await locker.close();
      }
    });
  }
});
