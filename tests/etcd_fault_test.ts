// etcd under faults: a paused holder process, and members of a 3-member
// cluster killed while a lock is held and another waits.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Etcd3 } from "etcd3";
import { LockLostError, New } from "../mod.ts";
import { EtcdCluster } from "./_servers.ts";
import { assertPausedHolderLoses } from "./_scenarios.ts";
import { prefix, sleep, until } from "./_util.ts";

/** Counts the keys under `name + "/"`. */
function queueLength(client: Etcd3, name: string): Promise<number> {
  return client.getAll().prefix(`${name}/`).count();
}

describe("etcd: a holder process paused past its TTL", () => {
  let cluster: EtcdCluster;
  let probe: Etcd3;
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  it("loses the lock to another process and sees the loss on its first turn after SIGCONT", async () => {
    await assertPausedHolderLoses(
      { backend: "etcd", endpoints: cluster.endpoints },
      /^LOST Lost lock ".*": no keepalive was acknowledged/,
    );
  });
});

describe("etcd: a 3-member cluster losing members", () => {
  let cluster: EtcdCluster;
  let probe: Etcd3;
  before(async () => {
    cluster = await EtcdCluster.start({ members: 3 });
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  /** Samples both lockers every 20 ms and fails if both ever count as holder. */
  function watchExclusion(held: { signal: AbortSignal }, waiting: Promise<unknown>) {
    let waiterHolds = false;
    let overlaps = 0;
    waiting.then(() => waiterHolds = true, () => {});
    const timer = setInterval(() => {
      if (waiterHolds && !held.signal.aborted) overlaps++;
    }, 20);
    return {
      get waiterHolds() {
        return waiterHolds;
      },
      stop() {
        clearInterval(timer);
        return overlaps;
      },
    };
  }

  it("keeps the holder's lock when keepalive recovers through another member after the leader dies", async () => {
    const name = prefix("leader");
    const holder = New({ endpoints: cluster.endpoints, ttl: 3_000 });
    const other = New({ endpoints: cluster.endpoints, ttl: 3_000 });
    const held = await holder.lock(name);
    const waiting = other.lock(name, { timeout: 60_000 });
    await until(async () => (await queueLength(probe, name)) === 2, 5_000, "the waiter to queue");
    const exclusion = watchExclusion(held, waiting);
    const leader = cluster.leader();
    await cluster.killMember(leader);
    await sleep(6_000); // two lease TTLs without the old leader
    assert.equal(held.signal.aborted, false, `the holder lost its lock: ${held.signal.reason}`);
    assert.equal(exclusion.waiterHolds, false, "the waiter acquired while the holder still held");
    await held.release();
    const next = await waiting;
    assert.equal(exclusion.stop(), 0, "two holders at once");
    assert.ok(next.token > held.token);
    await Promise.all([holder.close(), other.close()]);
    await cluster.startMember(leader);
  });

  it("keeps handing the lock over through a leader's restart, with no wait as long as etcd's request timeout", async () => {
    const name = prefix("election");
    // Each locker its own client (dialTimeout differs), as separate processes would have.
    const lockers = [5_000, 5_001, 5_002].map((dialTimeout) =>
      New({ endpoints: cluster.endpoints, dialTimeout })
    );
    let last = performance.now();
    let longest = 0;
    let running = true;
    const failures: unknown[] = [];
    const loops = lockers.map(async (locker) => {
      while (running) {
        try {
          const lease = await locker.lock(name, { timeout: 10_000 });
          longest = Math.max(longest, performance.now() - last);
          last = performance.now();
          await sleep(5);
          await lease.release();
        } catch (error) {
          failures.push(error);
        }
      }
    });
    await sleep(1_000);
    last = performance.now();
    longest = 0;
    const leader = cluster.leader();
    await cluster.killMember(leader);
    await sleep(1_000);
    await cluster.startMember(leader);
    await sleep(3_000);
    running = false;
    await Promise.all(loops);
    await Promise.all(lockers.map((locker) => locker.close()));
    assert.deepEqual(failures, []);
    // A request a member held through the election used to hold every waiter
    // up for its whole 5 s deadline; sent again, it is served by the new leader.
    assert.ok(longest < 4_000, `no hand-off for ${longest.toFixed(0)} ms around the election`);
  });

  it("aborts the holder's signal by its deadline when quorum is lost; the waiter acquires once it is back", async () => {
    const name = prefix("quorum");
    const holder = New({ endpoints: cluster.endpoints, ttl: 2_000 });
    // The waiter's session outlives the outage, so it stays queued.
    const other = New({ endpoints: cluster.endpoints, ttl: 15_000 });
    const held = await holder.lock(name);
    const waiting = other.lock(name, { timeout: 60_000 });
    await until(async () => (await queueLength(probe, name)) === 2, 5_000, "the waiter to queue");
    const exclusion = watchExclusion(held, waiting);
    const lost = new Promise((resolve) => held.signal.addEventListener("abort", resolve));
    const down = [0, 1, 2].filter((i) => i !== cluster.leader()).slice(0, 1);
    down.push(cluster.leader());
    const killedAt = performance.now();
    await Promise.all(down.map((i) => cluster.killMember(i)));
    await lost;
    const after = performance.now() - killedAt;
    assert.ok(held.signal.reason instanceof LockLostError);
    // The deadline is at most one TTL after the last acknowledged keepalive.
    assert.ok(
      after <= 2_000 + 250,
      `the signal aborted ${after.toFixed(0)} ms after quorum was lost`,
    );
    assert.equal(exclusion.waiterHolds, false);
    for (const i of down) await cluster.startMember(i);
    const next = await waiting;
    assert.equal(exclusion.stop(), 0, "two holders at once");
    assert.ok(next.token > held.token);
    await held.release();
    await Promise.all([holder.close(), other.close()]);
  });
});
