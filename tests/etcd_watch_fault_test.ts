// etcd watches when the watch stream breaks (etcd restarted), and sessions
// revoked by someone else: a lock is never believed held after its key is gone,
// and waiting stays a watch, not a poll.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { Etcd3 } from "etcd3";
import { type Locker, LockLostError, New } from "../mod.ts";
import { EtcdCluster } from "./_servers.ts";
import { TcpProxy } from "./_proxy.ts";
import { prefix, sleep, until, within } from "./_util.ts";

let cluster: EtcdCluster;
let probe: Etcd3;

/** The keys under `name + "/"`, lowest create revision first. */
async function queue(name: string): Promise<string[]> {
  const response = await probe.getAll().prefix(`${name}/`).sort("Create", "Ascend").exec();
  return response.kvs.map((kv) => kv.key.toString());
}

/** Restarts the one etcd member, then waits until `locker`'s client works again. */
async function restartEtcd(locker: Locker): Promise<void> {
  await cluster.killMember(0);
  await cluster.startMember(0);
  const name = prefix("up");
  await until(
    async () => {
      const lease = await locker.tryLock(name).catch(() => undefined);
      await lease?.release();
      return lease !== undefined;
    },
    20_000,
    "the client to reach etcd again",
  );
}

describe("etcd: watches across a restart of etcd", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  it("aborts the holder's signal when its key is deleted after a restart in which a waiter of the same locker stopped waiting", async () => {
    // The steps: L1 waits for b (watch 0 on the stream), then holds a
    // (watch 1); etcd restarts and numbers watches from 0 again.
    const [a, b] = [prefix("held"), prefix("waited")];
    const l1 = New({ endpoints: cluster.endpoints });
    const l2 = New({ endpoints: cluster.endpoints });
    const heldB = await l2.lock(b);
    const waitingB = l1.lock(b, { timeout: 60_000 });
    await until(async () => (await queue(b)).length === 2, 5_000, "L1 to queue for b");
    const heldA = await l1.lock(a);
    await restartEtcd(l2);
    await sleep(500); // the holder's watch is back on the new stream
    await heldB.release();
    const leaseB = await waitingB;
    const [keyA] = await queue(a);
    cluster.etcdctl(["del", keyA]);
    await until(() => heldA.signal.aborted, 5_000, "the holder's signal to abort").catch(() => {});
    assert.ok(
      heldA.signal.reason instanceof LockLostError,
      `L1 still believes it holds ${a} after its key was deleted: ${inspect(heldA.signal.reason)}`,
    );
    assert.match(heldA.signal.reason.message, /its key was deleted/);
    const stolen = await l2.tryLock(a);
    assert.ok(stolen, "the deleted lock is free for another locker");
    await leaseB.release();
    await Promise.all([l1.close(), l2.close()]);
  });

  it("hands the lock over through a watch after a restart, well inside a 4 s poll interval", async () => {
    const name = prefix("handoff-restart");
    const options = { endpoints: cluster.endpoints, retryInterval: 4_000 };
    const [holder, waiter] = [New(options), New(options)];
    const poll = 4_000;
    const times: number[] = [];
    for (let round = 0; round < 2; round++) {
      const held = await holder.lock(name);
      const waiting = waiter.lock(name, { timeout: 60_000 });
      await until(async () => (await queue(name)).length === 2, 5_000, "the waiter to queue");
      // The waiter's fallback polls come every 4 s from about now.
      const queued = performance.now();
      await restartEtcd(holder);
      // Release just after a poll, at least a second after the restart (time
      // enough to watch again): a waiter that polls then waits ~3.7 s more.
      const earliest = performance.now() + 1_000 - queued;
      await sleep(Math.ceil(earliest / poll) * poll + 300 - (performance.now() - queued));
      const released = performance.now();
      await held.release();
      const lease = await waiting;
      times.push(performance.now() - released);
      await lease.release();
    }
    assert.ok(
      times.every((t) => t < 1_000),
      `hand-offs after a restart took ${times.map((t) => t.toFixed(0)).join(", ")} ms`,
    );
    await Promise.all([holder.close(), waiter.close()]);
  });
});

describe("etcd: a watch resumed after a cut connection", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  it("sees the delete of the holder's key that happened while its stream was down", async () => {
    await using proxy = await TcpProxy.start(cluster.endpoints[0]);
    const name = prefix("cut");
    const locker = New({ endpoints: [proxy.endpoint] });
    const held = await locker.lock(name);
    const [key] = await queue(name);
    proxy.hold(); // the delete event is never forwarded on this stream
    cluster.etcdctl(["del", key]);
    await sleep(200);
    proxy.cut();
    proxy.release();
    await until(() => held.signal.aborted, 5_000, "the holder's signal to abort");
    assert.ok(held.signal.reason instanceof LockLostError, inspect(held.signal.reason));
    assert.match(held.signal.reason.message, /its key was deleted/);
    await locker.close();
  });
});

describe("etcd: a session lease revoked by someone else", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  it("aborts the holder's signal at once, and the waiter whose turn came and new calls get a fresh session", async () => {
    const name = prefix("revoked");
    // A long lease: the next keepalive, which would tell, is 10 s away.
    const locker = New({ endpoints: cluster.endpoints, ttl: 30_000 });
    const held = await locker.lock(name);
    const waiting = locker.lock(name, { timeout: 10_000 });
    const [key] = await queue(name);
    const lease = key.slice(name.length + 1);
    cluster.etcdctl(["lease", "revoke", lease]);
    await until(() => held.signal.aborted, 2_000, "the holder's signal to abort");
    assert.ok(held.signal.reason instanceof LockLostError, inspect(held.signal.reason));
    const next = await waiting;
    assert.ok(next.token > held.token);
    const [nextKey] = await queue(name);
    assert.notEqual(nextKey, key, "the waiter queued on the revoked lease");
    const other = await locker.tryLock(prefix("after-revoke"));
    assert.ok(other, "tryLock() after the revoke was refused");
    await locker.close();
    assert.deepEqual(await queue(name), []);
  });

  it("rejects at once a waiter queued in etcd on the revoked lease, and lets it queue again on a fresh one", async () => {
    const [a, b] = [prefix("revoked-held"), prefix("revoked-waited")];
    const locker = New({ endpoints: cluster.endpoints, ttl: 30_000 });
    const other = New({ endpoints: cluster.endpoints });
    const held = await locker.lock(a);
    const heldB = await other.lock(b);
    const waiting = locker.lock(b, { timeout: 20_000 });
    await until(async () => (await queue(b)).length === 2, 5_000, "the waiter to queue");
    const [key] = await queue(a);
    cluster.etcdctl(["lease", "revoke", key.slice(a.length + 1)]);
    const error = await within(waiting.catch((e) => e), 3_000, "still waiting");
    assert.ok(error instanceof LockLostError, `the waiter was not told: ${inspect(error)}`);
    assert.match(error.message, /the session lease ended while waiting: /);
    assert.ok(held.signal.aborted);
    const again = locker.lock(b, { timeout: 10_000 });
    await until(async () => (await queue(b)).length === 2, 5_000, "the waiter to queue again");
    await heldB.release();
    await (await again).release();
    await Promise.all([locker.close(), other.close()]);
  });
});
