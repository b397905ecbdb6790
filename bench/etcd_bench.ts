// etcd: uncontended acquire + release, against the raw-client floor.
//
//   npx deno bench --allow-all bench/etcd_bench.ts
//
// Starts its own etcd (from PATH) on a free port. The baseline is the least
// any etcd lock can do per acquisition: one transaction that puts the key on
// a pre-granted lease, and one delete. npm:etcd3's own Lock (a lease grant,
// a put and a revoke per acquisition) is shown for comparison.

import { Buffer } from "node:buffer";
import process from "node:process";
import { Etcd3 } from "etcd3";
import { New } from "../mod.ts";
import { EtcdCluster } from "../tests/_servers.ts";

const cluster = await EtcdCluster.start();
globalThis.addEventListener("unload", () => {
  for (const member of cluster.members) if (member.child) process.kill(member.child.pid, "SIGKILL");
});

const raw = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
const { ID: leaseId } = await raw.leaseClient.leaseGrant({ TTL: 60, ID: 0 });
const locker = New({ endpoints: cluster.endpoints });
const rawKey = Buffer.from(`/bench/raw/${BigInt(leaseId).toString(16)}`);

// Warm both paths (connection, session lease) before measuring.
await (await locker.lock("/bench/ours")).release();
await raw.put("/bench/warm").value("");

Deno.bench({
  name: "raw etcd3: txn put-if-absent on a pre-granted lease + delete",
  group: "uncontended acquire+release",
  baseline: true,
  async fn() {
    await raw.kv.txn({
      compare: [{ key: rawKey, target: "Create", result: "Equal", create_revision: 0 }],
      success: [{ request_put: { key: rawKey, value: Buffer.alloc(0), lease: leaseId } }],
      failure: [],
    });
    await raw.kv.deleteRange({ key: rawKey });
  },
});

Deno.bench({
  name: "@genesis/lock etcd: lock() + release()",
  group: "uncontended acquire+release",
  async fn() {
    const lease = await locker.lock("/bench/ours");
    await lease.release();
  },
});

Deno.bench({
  name: "npm:etcd3 Lock: acquire() + release()",
  group: "uncontended acquire+release",
  async fn() {
    const lock = raw.lock("/bench/etcd3");
    await lock.acquire();
    await lock.release();
  },
});
