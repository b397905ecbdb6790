// etcd under slow links, restarts and bursts: every request is bounded by the
// deadline of the call that needs it, a request given up on is compensated,
// and npm:etcd3's own retry and circuit breaker decide nothing.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { Etcd3 } from "etcd3";
import { LockTimeoutError, New } from "../mod.ts";
import { EtcdCluster, etcdMetrics, runScript } from "./_servers.ts";
import { TcpProxy } from "./_proxy.ts";
import { prefix, sleep, until, within } from "./_util.ts";

/** Counts the keys under `name + "/"`. */
function queueLength(client: Etcd3, name: string): Promise<number> {
  return client.getAll().prefix(`${name}/`).count();
}

describe("etcd behind a slow link", () => {
  let cluster: EtcdCluster;
  let probe: Etcd3;
  let proxy: TcpProxy;
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  it("Locker.lock() times out at its timeout, and the put etcd applies after the request's own deadline is deleted", async () => {
    proxy = await TcpProxy.start(cluster.endpoints[0]);
    const name = prefix("late");
    const applied = await probe.watch().prefix(`${name}/`).create();
    const puts: string[] = [];
    applied.on("put", (kv) => puts.push(kv.key.toString()));
    // dialTimeout bounds each request: the put's answer comes after its 1 s.
    const locker = New({ endpoints: [proxy.endpoint], ttl: 6_000, dialTimeout: 1_000 });
    await (await locker.lock(`${name}-warm`)).release();
    proxy.delayMs = 800; // each way: etcd applies the put at 0.8 s, answers at 1.6 s
    const started = performance.now();
    const error = await locker.lock(name, { timeout: 500 }).catch((e) => e);
    const elapsed = performance.now() - started;
    // Past the put's 1 s, so its answer (due at 1.6 s) comes too late to be
    // read; then later requests (renewals, clean-up) go at once.
    await sleep(1_300 - elapsed);
    proxy.delayMs = 0;
    assert.ok(error instanceof LockTimeoutError, inspect(error));
    assert.ok(elapsed < 1_000, `lock({ timeout: 500 }) rejected after ${elapsed.toFixed(0)} ms`);
    await until(() => puts.length > 0, 5_000, "etcd to apply the late put");
    // It landed on the live session lease; the locker must take it back.
    await until(
      async () => (await queueLength(probe, name)) === 0,
      8_000,
      "the late put's key to go",
    );
    const other = New({ endpoints: cluster.endpoints });
    const lease = await other.tryLock(name, { timeout: 2_000 });
    assert.ok(lease !== undefined, "the key is still held by the locker that timed out");
    await applied.cancel();
    await Promise.all([other.close(), locker.close()]);
    await proxy.close();
  });

  it("Locker.lock() times out at its timeout on a slow link, and the put answered late is deleted", async () => {
    proxy = await TcpProxy.start(cluster.endpoints[0]);
    const name = prefix("slow");
    const locker = New({ endpoints: [proxy.endpoint], ttl: 6_000 });
    await (await locker.lock(`${name}-warm`)).release();
    proxy.delayMs = 800; // each way: a 1.6 s round trip, within the 5 s dialTimeout
    const started = performance.now();
    const error = await locker.lock(name, { timeout: 500 }).catch((e) => e);
    const elapsed = performance.now() - started;
    assert.ok(error instanceof LockTimeoutError, inspect(error));
    assert.ok(elapsed < 1_200, `lock({ timeout: 500 }) rejected after ${elapsed.toFixed(0)} ms`);
    await until(
      async () => (await queueLength(probe, name)) === 0,
      8_000,
      "the late put's key to go",
    );
    proxy.delayMs = 0;
    await locker.close();
    await proxy.close();
  });
});

describe("etcd restarted for a second", () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
  });
  after(async () => {
    await cluster.stop();
  });

  it("keeps a lock with a 3 s ttl across a one-second restart", async () => {
    const name = prefix("restart");
    const locker = New({ endpoints: cluster.endpoints, ttl: 3_000 });
    const held = await locker.lock(name);
    await sleep(1_100); // a keepalive acknowledged since the grant
    const killed = performance.now();
    await cluster.killMember(0);
    await sleep(1_000);
    await cluster.startMember(0);
    const outage = performance.now() - killed;
    await sleep(4_000); // past the ttl after the restart: renewals must have resumed
    assert.equal(
      held.signal.aborted,
      false,
      `the lock was lost (etcd was down ${outage.toFixed(0)} ms): ${held.signal.reason}`,
    );
    const other = New({ endpoints: cluster.endpoints, ttl: 3_000 });
    assert.equal(await other.tryLock(name, { timeout: 2_000 }), undefined);
    await held.release();
    await Promise.all([locker.close(), other.close()]);
  });
});

describe("etcd: keepalives a member holds without answering, as through an election", () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
  });
  after(async () => {
    await cluster.stop();
  });

  it("keeps a lock with a 3 s ttl when its member answers nothing for 2.7 s, sending each unanswered keepalive again at once", async () => {
    const proxy = await TcpProxy.start(cluster.endpoints[0]);
    const name = prefix("held-keepalive");
    const locker = New({ endpoints: [proxy.endpoint], ttl: 3_000 });
    const before = performance.now();
    const held = await locker.lock(name); // the session is granted here: its deadline is 3 s on
    // The member takes every request and answers none: each keepalive gives
    // up after ttl / 6 = 500 ms. Sent again only at the clock's retry
    // (500 ms later), the tries go out at 1, 2 and 3 s, and the one in
    // flight when the answers resume (2.7 s) is none: the lock would be lost.
    proxy.hold("replies");
    await sleep(2_700 - (performance.now() - before));
    proxy.release();
    await sleep(1_000);
    assert.equal(held.signal.aborted, false, `the lock was lost: ${held.signal.reason}`);
    const other = New({ endpoints: cluster.endpoints, ttl: 3_000 });
    assert.equal(await other.tryLock(name, { timeout: 2_000 }), undefined);
    await held.release();
    await Promise.all([locker.close(), other.close()]);
    await proxy.close();
  });
});

const ROOT = "root-pw-4e8a";

// npm:etcd3 exchanges the password for a token through a gRPC client it makes
// for the purpose and never closes (see etcd_security_test.ts).
describe("etcd with authentication, restarted for a second", {
  sanitizeOps: false,
  sanitizeResources: false,
}, () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
    cluster.etcdctl(["user", "add", `root:${ROOT}`]);
    cluster.etcdctl(["auth", "enable"]);
  });
  after(async () => {
    await cluster.stop();
  });

  it("keeps the lock past its ttl after the restart, and later calls and close() settle", async () => {
    const name = prefix("auth-restart");
    const options = { endpoints: cluster.endpoints, username: "root", password: ROOT };
    const locker = New({ ...options, ttl: 4_000 });
    const held = await locker.lock(name);
    await sleep(1_500);
    await cluster.killMember(0);
    await sleep(1_000);
    await cluster.startMember(0); // etcd forgets every auth token it gave out
    await sleep(5_000); // past the ttl after the restart
    assert.equal(held.signal.aborted, false, `the lock was lost: ${held.signal.reason}`);
    const next = locker.tryLock(`${name}-next`, { timeout: 1_000 });
    const lease = await within(next, 3_000, "still pending");
    assert.notEqual(lease, "still pending", "tryLock({ timeout: 1000 }) did not settle");
    assert.ok(lease !== undefined, "a free key was not acquired");
    const closed = await within(locker.close().then(() => "closed"), 5_000, "still pending");
    assert.equal(closed, "closed", "close() did not settle");
  });
});

describe("etcd: close() while the session's lease grant is in flight", () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
  });
  after(async () => {
    await cluster.stop();
  });

  it("leaves no lease on the server and lets the process exit", async () => {
    const fixture = new URL("./fixtures/etcd_close_granting.ts", import.meta.url).pathname;
    const child = runScript(fixture, [cluster.endpoints[0], prefix("granting")]);
    try {
      await child.waitFor(/CLOSED/, 20_000);
      // Well within the fixture's 5 s ttl, which a late session would renew.
      const code = await within(child.exited, 2_000, "still running");
      assert.equal(code, 0, `the process did not exit after close():\n${child.output}`);
      assert.match(child.output, /CLOSING\n(REJECTED LockClosedError)\n/);
    } finally {
      await child.stop();
    }
    const leases = cluster.etcdctl(["lease", "list"]);
    assert.match(leases, /found 0 leases/, leases);
  });
});

/** etcd's count of unary requests it has started and not yet answered, from one reading. */
async function unaryInFlight(endpoint: string): Promise<number> {
  const metric = await etcdMetrics([endpoint]);
  const unary = 'grpc_type="unary"';
  return metric("grpc_server_started_total", unary) - metric("grpc_server_handled_total", unary);
}

/** etcd's count of answered requests of one gRPC method. */
async function handled(endpoint: string, method: string): Promise<number> {
  return (await etcdMetrics([endpoint]))("grpc_server_handled_total", `grpc_method="${method}"`);
}

describe("etcd: bursts", () => {
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

  it("keeps at most 512 requests in flight to etcd during a burst of 3,000 tryLocks, and every one succeeds", async () => {
    const name = prefix("burst");
    const locker = New({ endpoints: cluster.endpoints });
    await (await locker.lock(`${name}/warm`)).release();
    let peak = 0;
    let stop = false;
    const sampler = (async () => {
      while (!stop) {
        peak = Math.max(peak, await unaryInFlight(cluster.endpoints[0]));
        await sleep(5);
      }
    })();
    const results = await Promise.allSettled(
      Array.from({ length: 3_000 }, (_, i) => locker.tryLock(`${name}/${i}`)),
    );
    stop = true;
    await sampler;
    const rejected = results.filter((r) => r.status === "rejected");
    assert.deepEqual(rejected, [], `${rejected.length} tryLocks rejected`);
    assert.ok(peak <= 512, `etcd had ${peak} requests of this locker in flight at once`);
    await locker.close();
  });

  it("Locker.close() of a locker holding 2,000 locks revokes its session lease in one request and leaves no key", async () => {
    const name = prefix("close-many");
    const locker = New({ endpoints: cluster.endpoints });
    const leases = await Promise.all(
      Array.from({ length: 2_000 }, (_, i) => locker.tryLock(`${name}/${i}`)),
    );
    assert.ok(leases.every((lease) => lease !== undefined));
    const txns = await handled(cluster.endpoints[0], "Txn");
    const revokes = await handled(cluster.endpoints[0], "LeaseRevoke");
    await locker.close();
    const deletes = (await handled(cluster.endpoints[0], "Txn")) - txns;
    assert.ok(deletes < 10, `close() sent ${deletes} transactions, one per lock`);
    assert.ok((await handled(cluster.endpoints[0], "LeaseRevoke")) > revokes, "no revoke");
    assert.equal(await probe.getAll().prefix(`${name}/`).count(), 0);
  });
});

const APP = "app-pw-31c7";

describe("etcd: close() when etcd refuses to revoke the session lease", {
  sanitizeOps: false,
  sanitizeResources: false,
}, () => {
  let cluster: EtcdCluster;
  const root = [`--user=root:${ROOT}`];
  before(async () => {
    cluster = await EtcdCluster.start();
    cluster.etcdctl(["user", "add", `root:${ROOT}`]);
    cluster.etcdctl(["auth", "enable"]);
    cluster.etcdctl(["role", "add", "locker"], root);
    cluster.etcdctl(
      ["role", "grant-permission", "locker", "--prefix=true", "readwrite", "/app/"],
      root,
    );
    cluster.etcdctl(["user", "add", `app:${APP}`], root);
    cluster.etcdctl(["user", "grant-role", "app", "locker"], root);
  });
  after(async () => {
    await cluster.stop();
  });

  it("still gives back every lock, one by one", async () => {
    const name = `/app${prefix("refused")}`;
    const locker = New({ endpoints: cluster.endpoints, username: "app", password: APP });
    const leases = await Promise.all(
      Array.from({ length: 50 }, (_, i) => locker.lock(`${name}/${i}`)),
    );
    // A key outside the app's role on the app's session lease: etcd lets the
    // app revoke the lease only if it may write every key on it.
    const keys = cluster.etcdctl(["get", "--prefix", "--keys-only", `${name}/0/`], root);
    const hex = keys.trim().split("/").pop()!;
    cluster.etcdctl(["put", `--lease=${hex}`, `/other${name}`, "x"], root);
    await locker.close();
    assert.ok(leases.every((lease) => lease.signal.aborted));
    const left = cluster.etcdctl(["get", "--prefix", "--keys-only", `${name}/`], root);
    assert.equal(left.trim(), "", "close() left locks behind");
    // The lease itself was not revoked: it runs out with its ttl.
    assert.match(cluster.etcdctl(["get", `/other${name}`], root), /x/);
  });
});

// grpc-js leaves unref'd reconnect timers behind the channel to the dead
// member (see etcd_test.ts); they do not hold the process.
describe("etcd: a three-member cluster with one member down", {
  sanitizeOps: false,
  sanitizeResources: false,
}, () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start({ members: 3 });
  });
  after(async () => {
    await cluster.stop();
  });

  it("serves every tryLock through the members that are up, npm:etcd3's retry being off", async () => {
    const name = prefix("member-down");
    const locker = New({ endpoints: cluster.endpoints });
    await (await locker.lock(`${name}/warm`)).release();
    await cluster.killMember(cluster.leader() === 0 ? 1 : 0);
    // Each request picks a member at random: about one in three meets the dead one first.
    const results = await Promise.allSettled(
      Array.from({ length: 60 }, (_, i) => locker.tryLock(`${name}/${i}`, { timeout: 10_000 })),
    );
    const rejected = results.filter((r) => r.status === "rejected");
    assert.deepEqual(rejected, [], `${rejected.length} of 60 tryLocks rejected`);
    await locker.close();
  });
});
