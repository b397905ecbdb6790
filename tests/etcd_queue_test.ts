// etcd's queue of a lock: which keys count as its entries (names that share a
// prefix do not block each other), and in what order waiters are served.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { Etcd3 } from "etcd3";
import { New } from "../mod.ts";
import { EtcdCluster } from "./_servers.ts";
import { isPending, prefix, sleep, until, within } from "./_util.ts";

let cluster: EtcdCluster;
let probe: Etcd3;

/** How many keys are under `name + "/"`. */
function count(name: string): Promise<number> {
  return probe.getAll().prefix(`${name}/`).count();
}

/** Puts `n` keys `NAME/a/<i>` in one transaction: they share one create revision. */
async function putChildren(name: string, n: number): Promise<void> {
  await probe.kv.txn({
    compare: [],
    success: Array.from({ length: n }, (_, i) => ({
      request_put: { key: Buffer.from(`${name}/a/${i}`), value: Buffer.alloc(0) },
    })),
    failure: [],
  });
}

describe("etcd: the queue of a lock", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  describe("names that share a prefix", () => {
    it("grants NAME while NAME/a is held, to tryLock() and to lock() on the same locker", async () => {
      const name = prefix("jobs");
      const [a, b] = [New({ endpoints: cluster.endpoints }), New({ endpoints: cluster.endpoints })];
      const child = await a.lock(`${name}/a`);
      const tried = await b.tryLock(name);
      assert.ok(tried, `tryLock("${name}") was refused while only "${name}/a" was held`);
      await tried.release();
      // Child, then parent, on one locker: this waited for itself before.
      const parent = await within(a.lock(name, { timeout: 10_000 }), 5_000, undefined);
      assert.ok(parent, `lock("${name}") waited for "${name}/a"`);
      assert.equal(child.signal.aborted, false);
      await parent.release();
      await child.release();
      await Promise.all([a.close(), b.close()]);
    });

    it("skips longer names' keys, even a page of them made in one transaction, and still queues behind NAME's holder", async () => {
      const name = prefix("jobs");
      const [holder, waiter] = [
        New({ endpoints: cluster.endpoints }),
        New({ endpoints: cluster.endpoints }),
      ];
      await putChildren(name, 100); // older than every entry
      const held = await holder.lock(name, { timeout: 10_000 });
      await putChildren(`${name}/b`, 100); // between the holder and the waiter
      // Hex, but 17 digits: longer than any lease ID, so no queue entry either.
      await probe.put(`${name}/0123456789abcdef0`).value("");
      const waiting = waiter.lock(name, { timeout: 20_000 });
      await until(async () => (await count(name)) === 203, 5_000, "the waiter to queue");
      await sleep(300);
      assert.equal(await isPending(waiting), true, "the waiter was granted while NAME was held");
      assert.equal(await holder.tryLock(`${name}/a`), undefined, "NAME/a/<i> is NAME/a's queue");
      await held.release();
      const lease = await waiting;
      assert.ok(lease.token > held.token);
      await lease.release();
      await Promise.all([holder.close(), waiter.close()]);
      await probe.delete().prefix(`${name}/`);
    });
  });

  describe("order across lockers", () => {
    it("serves a locker's second waiter after the waiters other lockers queued before its first was done", async () => {
      // Arrivals W1 (locker A), W2 (locker A), W3 (locker C). A has one place in
      // etcd's queue per name: W1 takes it, W2 waits in process and takes a new
      // place, behind W3's, when W1 is done.
      const name = prefix("order");
      const [holder, a, c] = [
        New({ endpoints: cluster.endpoints }),
        New({ endpoints: cluster.endpoints }),
        New({ endpoints: cluster.endpoints }),
      ];
      const held = await holder.lock(name);
      const order: string[] = [];
      const serve = (who: string, locker: typeof a) =>
        locker.lock(name, { timeout: 20_000 }).then(async (lease) => {
          order.push(who);
          await lease.release();
        });
      const waits = [serve("W1", a)];
      await until(async () => (await count(name)) === 2, 5_000, "W1 to queue");
      waits.push(serve("W2", a));
      await sleep(100);
      assert.equal(await count(name), 2, "W2 took a second place in etcd's queue");
      waits.push(serve("W3", c));
      await until(async () => (await count(name)) === 3, 5_000, "W3 to queue");
      await held.release();
      await Promise.all(waits);
      assert.deepEqual(order, ["W1", "W3", "W2"]);
      await Promise.all([holder.close(), a.close(), c.close()]);
    });
  });
});
