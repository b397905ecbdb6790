// The Locker contract, one suite for every backend. A backend's test file
// mounts it with a target that makes lockers sharing one lock space.

import { after, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import {
  type Lease,
  LockClosedError,
  type Locker,
  LockLostError,
  LockNotHeldError,
  LockTimeoutError,
} from "../mod.ts";
import { isPending, prefix, sleep, until } from "./_util.ts";

/** A backend under test. */
export interface ConformanceTarget {
  /** The backend's name, for the test titles. */
  name: string;
  /** Makes a locker; every locker made by one target shares one lock space. */
  locker(options?: { ttl?: number; autoRenew?: boolean }): Locker;
  /** The shortest lease the backend grants, in milliseconds. */
  shortTtl: number;
  /** Whether waiters on different lockers are served in arrival order. */
  fifoAcrossLockers: boolean;
  /** How many server-side records remain under `keyPrefix` (lock and waiter keys). */
  leftovers(keyPrefix: string): Promise<number>;
}

/** Mounts the conformance suite for `target`. */
export function conformance(target: ConformanceTarget): void {
  describe(`Locker contract on ${target.name}`, () => {
    const lockers: Locker[] = [];
    const make = (options?: { ttl?: number; autoRenew?: boolean }) => {
      const locker = target.locker(options);
      lockers.push(locker);
      return locker;
    };
    after(async () => {
      await Promise.all(lockers.map((locker) => locker.close()));
    });

    it("lock() grants a free key and tryLock() elsewhere then finds it held", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/a`;
      const lease = await a.lock(key);
      assert.equal(lease.key, key);
      assert.equal(typeof lease.token, "bigint");
      assert.equal(lease.signal.aborted, false);
      assert.equal(await b.tryLock(key), undefined);
      await lease.release();
      const again = await b.tryLock(key);
      assert.ok(again, "tryLock() after the release acquires");
      await again.release();
    });

    it("lock() waits until the holder releases", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/wait`;
      const held = await a.lock(key);
      const waiting = b.lock(key);
      assert.equal(await isPending(waiting, 10), true, "the waiter is granted while held");
      await held.release();
      const next = await waiting;
      assert.ok(next.token > held.token);
      await next.release();
    });

    it("tryLock() never waits, including behind a call on the same locker", async () => {
      const a = make();
      const key = `${prefix()}/try`;
      const held = await a.lock(key);
      assert.equal(await a.tryLock(key), undefined);
      const queued = a.lock(key);
      await held.release();
      const next = await queued;
      assert.equal(await a.tryLock(key), undefined);
      await next.release();
    });

    for (const spread of ["4 lockers", "one locker"]) {
      it(`lock() excludes concurrent read-modify-writes across ${spread}`, async () => {
        const key = `${prefix()}/rmw`;
        const lockers = spread === "one locker" ? [make()] : [make(), make(), make(), make()];
        const perWorker = 4;
        const workers = 8;
        let counter = 0;
        let inside = 0;
        let overlaps = 0;
        await Promise.all(Array.from({ length: workers }, async (_, w) => {
          const locker = lockers[w % lockers.length];
          for (let i = 0; i < perWorker; i++) {
            await locker.withLock(key, async () => {
              if (++inside > 1) overlaps++;
              const read = counter;
              await sleep(1);
              counter = read + 1;
              inside--;
            });
          }
        }));
        assert.equal(overlaps, 0, "two critical sections overlapped");
        assert.equal(counter, workers * perWorker);
      });
    }

    it("lock() serves waiters on one locker first come, first served", async () => {
      const a = make();
      const key = `${prefix()}/fifo1`;
      const held = await a.lock(key);
      const order: number[] = [];
      const waits = [0, 1, 2, 3, 4].map((i) =>
        a.lock(key).then(async (lease) => {
          order.push(i);
          await lease.release();
        })
      );
      await held.release();
      await Promise.all(waits);
      assert.deepEqual(order, [0, 1, 2, 3, 4]);
    });

    if (target.fifoAcrossLockers) {
      it("lock() serves waiters on different lockers first come, first served", async () => {
        const key = `${prefix()}/fifo`;
        const held = await make().lock(key);
        const order: number[] = [];
        const waits: Promise<void>[] = [];
        for (const i of [0, 1, 2, 3, 4]) {
          const locker = make();
          waits.push(
            locker.lock(key).then(async (lease) => {
              order.push(i);
              await lease.release();
            }),
          );
          // Let each waiter reach the server before the next one starts.
          await until(async () => (await target.leftovers(key)) >= i + 2, 5_000, `waiter ${i}`);
        }
        await held.release();
        await Promise.all(waits);
        assert.deepEqual(order, [0, 1, 2, 3, 4]);
      });
    }

    it("lock() rejects with the signal's reason and leaves nothing behind", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/abort`;
      const held = await a.lock(key);
      const controller = new AbortController();
      const waiting = b.lock(key, { signal: controller.signal });
      await sleep(20);
      const reason = new Error("the caller gave up");
      controller.abort(reason);
      await assert.rejects(waiting, (error) => error === reason);
      await held.release();
      await until(async () => (await target.leftovers(key)) === 0, 5_000, "no leftovers");
      const c = await make().tryLock(key);
      assert.ok(c, "the aborted waiter left no lock");
      await c.release();
    });

    it("lock() with an aborted signal rejects without acquiring", async () => {
      const a = make();
      const key = `${prefix()}/pre`;
      const reason = new Error("already aborted");
      await assert.rejects(a.lock(key, { signal: AbortSignal.abort(reason) }), (e) => e === reason);
      await assert.rejects(
        a.tryLock(key, { signal: AbortSignal.abort(reason) }),
        (e) => e === reason,
      );
      assert.equal(await target.leftovers(key), 0);
    });

    it("lock() with a timeout rejects with a LockTimeoutError naming the key", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/timeout`;
      const held = await a.lock(key);
      await assert.rejects(b.lock(key, { timeout: 50 }), (error) => {
        assert.ok(error instanceof LockTimeoutError);
        assert.equal(
          error.message,
          `Cannot acquire lock ${JSON.stringify(key)}: timed out after 50 ms`,
        );
        return true;
      });
      await held.release();
      await until(async () => (await target.leftovers(key)) === 0, 5_000, "no leftovers");
    });

    it("lease tokens strictly increase for successive holders", async () => {
      const key = `${prefix()}/tokens`;
      const lockers = [make(), make(), make()];
      const tokens: bigint[] = [];
      for (let i = 0; i < 9; i++) {
        const lease = await lockers[i % 3].lock(key);
        tokens.push(lease.token);
        await lease.release();
      }
      for (let i = 1; i < tokens.length; i++) {
        assert.ok(tokens[i] > tokens[i - 1], `token ${tokens[i]} follows ${tokens[i - 1]}`);
      }
    });

    it("a lease without autoRenew is lost after its ttl and its signal says so", async () => {
      const a = make({ ttl: target.shortTtl, autoRenew: false });
      const key = `${prefix()}/expire`;
      const lease = await a.lock(key);
      const lost = new Promise((resolve) => lease.signal.addEventListener("abort", resolve));
      await lost;
      assert.ok(lease.signal.reason instanceof LockLostError);
      assert.equal(lease.signal.reason.key, key);
      const b = make();
      const next = await b.lock(key, { timeout: 5_000 });
      assert.ok(next.token > lease.token);
      await next.release();
    });

    it("release() is fenced: a lost lease's release leaves the new holder's lock", async () => {
      const a = make({ ttl: target.shortTtl, autoRenew: false });
      const [b, c] = [make(), make()];
      const key = `${prefix()}/fence`;
      const stale = await a.lock(key);
      const fresh = await b.lock(key, { timeout: target.shortTtl * 5 });
      assert.equal(stale.signal.aborted, true);
      await stale.release();
      await assert.rejects(a.unlock(key), LockNotHeldError);
      assert.equal(await c.tryLock(key), undefined, "the new holder's lock survived");
      assert.equal(fresh.signal.aborted, false);
      await fresh.release();
    });

    it("autoRenew keeps a lease past several ttls", async () => {
      const a = make({ ttl: target.shortTtl, autoRenew: true });
      const key = `${prefix()}/renew`;
      const lease = await a.lock(key);
      await sleep(target.shortTtl * 2.5);
      assert.equal(lease.signal.aborted, false);
      assert.equal(await make().tryLock(key), undefined);
      await lease.release();
    });

    it("unlock() releases this locker's lease and refuses a key it does not hold", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/unlock`;
      await assert.rejects(a.unlock(key), (error) => {
        assert.ok(error instanceof LockNotHeldError);
        assert.equal(error.key, key);
        return true;
      });
      const lease = await a.lock(key);
      await assert.rejects(b.unlock(key), LockNotHeldError);
      assert.equal(await b.tryLock(key), undefined, "another locker's unlock() deleted the lock");
      await a.unlock(key);
      await assert.rejects(a.unlock(key), LockNotHeldError);
      const next = await b.tryLock(key);
      assert.ok(next);
      assert.equal(lease.signal.aborted, false, "a normal release does not abort the signal");
      await next.release();
    });

    it("release() twice is harmless and releases once", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/twice`;
      const lease = await a.lock(key);
      await Promise.all([lease.release(), lease.release()]);
      const next = await b.lock(key);
      await lease.release();
      assert.equal(await a.tryLock(key), undefined, "a repeated release freed the next holder");
      await next.release();
    });

    it("await using releases at the end of the block", async () => {
      const a = make();
      const key = `${prefix()}/using`;
      {
        await using lease = await a.lock(key);
        assert.equal(await make().tryLock(key), undefined);
        assert.ok(lease.token > 0n);
      }
      const again = await make().tryLock(key);
      assert.ok(again);
      await again.release();
    });

    it("withLock() returns the work's result, rethrows its error, and releases", async () => {
      const a = make();
      const key = `${prefix()}/with`;
      assert.equal(await a.withLock(key, (lease) => lease.key), key);
      const failure = new Error("the work failed");
      await assert.rejects(a.withLock(key, () => Promise.reject(failure)), (e) => e === failure);
      const free = await make().tryLock(key);
      assert.ok(free);
      await free.release();
    });

    it("withLock() rejects with LockLostError when the lock is lost during the work", async () => {
      const a = make({ ttl: target.shortTtl, autoRenew: false });
      const key = `${prefix()}/withlost`;
      await assert.rejects(
        a.withLock(
          key,
          (lease) => new Promise((resolve) => lease.signal.addEventListener("abort", resolve)),
        ),
        LockLostError,
      );
    });

    it("close() rejects pending waits, releases held leases, and is idempotent", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/close`;
      const other = `${prefix()}/close2`;
      const held = await a.lock(key);
      const waiting = a.lock(key);
      const elsewhere = await b.lock(other);
      const blocked = a.lock(other);
      await sleep(20);
      await Promise.all([a.close(), a.close()]);
      await assert.rejects(waiting, LockClosedError);
      await assert.rejects(blocked, LockClosedError);
      // The lock is gone: the holder is told so, not left believing it holds it.
      assert.ok(held.signal.reason instanceof LockClosedError, String(held.signal.reason));
      const next = await b.tryLock(key);
      assert.ok(next, "close() released the held lease");
      await next.release();
      await elsewhere.release();
      await until(async () => (await target.leftovers(other)) === 0, 5_000, "no leftovers");
    });

    it("close() after a stall that outlasted a lease resolves and reports the lease lost", async () => {
      const a = make({ ttl: target.shortTtl, autoRenew: false });
      const key = `${prefix()}/stall`;
      const lease = await a.lock(key);
      // A long synchronous computation: no timer runs, so nothing has yet
      // noticed that the lease's deadline passed when close() looks.
      const end = performance.now() + target.shortTtl + 50;
      while (performance.now() < end) { /* the stall */ }
      await a.close();
      assert.ok(lease.signal.reason instanceof LockLostError, String(lease.signal.reason));
      const next = await make().lock(key, { timeout: 5_000 });
      assert.ok(next.token > lease.token);
      await next.release();
    });

    it("close() during withLock() work aborts the lease's signal first, and withLock() rejects", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/closework`;
      let held!: (lease: Lease) => void;
      const inside = new Promise<Lease>((resolve) => held = resolve);
      let finish!: () => void;
      const work = new Promise<void>((resolve) => finish = resolve);
      const running = a.withLock(key, async (lease) => {
        held(lease);
        await work;
        return "done";
      });
      const lease = await inside;
      const closing = a.close();
      const taken = await b.lock(key, { timeout: 5_000 });
      // Once anyone else holds the lock, the holder has been told it lost it.
      assert.ok(lease.signal.reason instanceof LockClosedError, String(lease.signal.reason));
      finish();
      await assert.rejects(running, LockClosedError);
      await taken.release();
      await closing;
    });

    it("status() reports the holder's token while held, and no holder once released", async () => {
      const [a, b] = [make(), make()];
      const key = `${prefix()}/status`;
      assert.equal((await b.status(key)).holder, undefined);
      const lease = await a.lock(key);
      const status = await b.status(key);
      assert.equal(status.key, key);
      assert.equal(status.holder?.token, lease.token);
      const ttl = status.holder?.ttl;
      assert.ok(ttl === undefined || (ttl >= 0 && ttl <= 10_000), `ttl ${ttl}`);
      await lease.release();
      assert.equal((await b.status(key)).holder, undefined);
    });

    it("a closed locker rejects every call with LockClosedError", async () => {
      const a = make();
      const key = `${prefix()}/closed`;
      await a.close();
      await assert.rejects(a.lock(key), LockClosedError);
      await assert.rejects(a.tryLock(key), LockClosedError);
      await assert.rejects(a.unlock(key), LockClosedError);
      await assert.rejects(a.withLock(key, () => 1), LockClosedError);
      await assert.rejects(a.status(key), LockClosedError);
      await a.close();
    });

    it("bad keys and options reject with TypeError or RangeError naming the problem", async () => {
      const a = make();
      await assert.rejects(a.lock(42 as unknown as string), {
        name: "TypeError",
        message: "Invalid lock key: expected a string, received 42",
      });
      await assert.rejects(a.lock(""), { name: "RangeError", message: /received an empty string/ });
      await assert.rejects(a.tryLock("x".repeat(1025)), {
        name: "RangeError",
        message: /1025 bytes/,
      });
      await assert.rejects(a.lock("é".repeat(513)), { name: "RangeError", message: /1026 bytes/ });
      await assert.rejects(a.lock("/k", { timeout: -1 }), {
        name: "RangeError",
        message: /"timeout".*received -1/,
      });
      await assert.rejects(a.lock("/k", { signal: "soon" as unknown as AbortSignal }), {
        name: "TypeError",
        message: /"signal": expected an AbortSignal, received "soon"/,
      });
      await assert.rejects(a.unlock(""), RangeError);
      await assert.rejects(a.withLock("/k", "fn" as unknown as () => void), TypeError);
      const lease: Lease = await a.lock("x".repeat(1024));
      await lease.release();
    });
  });
}
