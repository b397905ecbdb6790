// The shared Locker under replies that come later than the lease lasts.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { Etcd3 } from "etcd3";
import { New } from "../mod.ts";
import { EtcdCluster } from "./_servers.ts";
import { TcpProxy } from "./_proxy.ts";
import { prefix, sleep, within } from "./_util.ts";

describe("Locker: a grant that arrives already lost", () => {
  let cluster: EtcdCluster;
  let proxy: TcpProxy;
  let probe: Etcd3;
  before(async () => {
    cluster = await EtcdCluster.start();
    proxy = await TcpProxy.start(cluster.endpoints[0]);
    probe = new Etcd3({ hosts: `http://${cluster.endpoints[0]}` });
  });
  after(async () => {
    probe.close();
    await proxy.close();
    await cluster.stop();
  });

  it("is given back, lock() tries again on a fresh session, and the key's queue still works", async () => {
    const name = prefix("late");
    const locker = New({ endpoints: [proxy.endpoint], ttl: 2_000 });
    try {
      await (await locker.lock(`${name}/warm-up`)).release(); // connected, session granted
      // Requests reach etcd and are applied (keepalives too, so the session
      // lives on the server), but no answer comes back until the session's
      // local deadline has passed: the put's answer is a grant already lost.
      proxy.hold("replies");
      const pending = locker.lock(name, { timeout: 20_000 });
      await sleep(2_600);
      proxy.release();
      const lease = await pending;
      assert.equal(lease.signal.aborted, false, String(lease.signal.reason));
      const keys = await probe.getAll().prefix(`${name}/`).keys();
      assert.equal(keys.length, 1, `the lost grant's key was not given back: ${keys.join(", ")}`);
      await lease.release();
      // The in-process queue of the key was left: the next lock() is served.
      const again = await within(locker.lock(name, { timeout: 5_000 }), 6_000, "hung" as const);
      if (again === "hung") assert.fail("the key's in-process queue was never left");
      await again.release();
    } finally {
      proxy.release();
      await locker.close();
    }
  });
});
