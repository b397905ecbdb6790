import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { inspect } from "node:util";
import { Etcd3 } from "etcd3";
import { type Lease, LockClosedError, LockConnectionError, LockLostError, New } from "../mod.ts";
import { createEtcdLocker } from "../backends/etcd.ts";
import { conformance } from "./_conformance.ts";
import { assertExitsAfterClose } from "./_scenarios.ts";
import { type Child, EtcdCluster, etcdMetrics, freePort, runScript } from "./_servers.ts";
import { isPending, prefix, sleep, until, within } from "./_util.ts";

let cluster: EtcdCluster;
let probe: Etcd3;

/** The keys under `name + "/"`, lowest create revision first, as etcd holds them. */
async function queue(name: string): Promise<{ key: string; rev: bigint; lease: string }[]> {
  const response = await probe.getAll().prefix(`${name}/`).sort("Create", "Ascend").exec();
  return response.kvs.map((kv) => ({
    key: kv.key.toString(),
    rev: BigInt(kv.create_revision),
    lease: BigInt(kv.lease).toString(16),
  }));
}

const fixture = new URL("./fixtures/holder.ts", import.meta.url).pathname;

/** The LeaseKeepAlive streams etcd started and the keepalive messages it received, on every member. */
async function keepaliveCounts(
  endpoints: string[],
): Promise<{ streams: number; messages: number }> {
  const metric = await etcdMetrics(endpoints);
  const method = 'grpc_method="LeaseKeepAlive"';
  return {
    streams: metric("grpc_server_started_total", method),
    messages: metric("grpc_server_msg_received_total", method),
  };
}

describe("etcd backend", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  conformance({
    name: "etcd",
    locker: (options) => New({ backend: "etcd", endpoints: cluster.endpoints, ...options }),
    // The test cluster's short election timeout lets etcd grant 1 s leases.
    shortTtl: 1_000,
    fifoAcrossLockers: true,
    leftovers: (keyPrefix) => probe.getAll().prefix(keyPrefix).count(),
  });

  describe("Go concurrency.Mutex compatibility", () => {
    it("writes NAME/ plus the session lease ID in lowercase hex, with an empty value", async () => {
      const locker = New({ endpoints: cluster.endpoints });
      const name = prefix("layout");
      const lease = await locker.lock(name);
      const [entry] = await queue(name);
      assert.equal(entry.key, `${name}/${entry.lease}`);
      assert.match(entry.lease, /^[0-9a-f]+$/);
      assert.equal(entry.rev, lease.token, "the fencing token is the key's create revision");
      assert.equal(await probe.get(entry.key).string(), "");
      await locker.close();
      assert.deepEqual(await queue(name), []);
    });

    it("makes etcdctl lock wait while TypeScript holds the lock", async () => {
      const locker = New({ endpoints: cluster.endpoints });
      const name = prefix("ctl-waits");
      const lease = await locker.lock(name);
      const ctl = cluster.spawnEtcdctl(["lock", name, "--", "echo", "ETCDCTL-ACQUIRED"]);
      await until(async () => (await queue(name)).length === 2, 5_000, "etcdctl to queue");
      await sleep(300);
      assert.doesNotMatch(ctl.output, /ETCDCTL-ACQUIRED/, "etcdctl acquired while TypeScript held");
      await lease.release();
      await ctl.waitFor(/ETCDCTL-ACQUIRED/);
      assert.equal(await ctl.exited, 0);
      await locker.close();
    });

    it("makes TypeScript wait while etcdctl lock holds the lock", async () => {
      const locker = New({ endpoints: cluster.endpoints });
      const name = prefix("ts-waits");
      const ctl = cluster.spawnEtcdctl(["lock", name, "--", "sleep", "1"]);
      await until(async () => (await queue(name)).length === 1, 5_000, "etcdctl to hold");
      const [held] = await queue(name);
      assert.equal(await locker.tryLock(name), undefined);
      const waiting = locker.lock(name, { timeout: 10_000 });
      assert.equal(await isPending(waiting, 20), true);
      const lease = await waiting;
      assert.equal(
        await ctl.exited,
        0,
        "etcdctl finished its command before TypeScript got the lock",
      );
      assert.ok(lease.token > held.rev);
      await locker.close();
    });

    it("serves mixed etcdctl and TypeScript waiters in arrival order", async () => {
      const name = prefix("mixed");
      const order: string[] = [];
      const holder = New({ endpoints: cluster.endpoints });
      const held = await holder.lock(name);
      const children: Child[] = [];
      const lockers = [
        New({ endpoints: cluster.endpoints }),
        New({ endpoints: cluster.endpoints }),
      ];
      const waits: Promise<void>[] = [];
      for (const [i, who] of ["ctl-1", "ts-2", "ctl-3", "ts-4"].entries()) {
        if (who.startsWith("ctl")) {
          // etcdctl holds for 300 ms, so its output is seen before the next holder's turn.
          const ctl = cluster.spawnEtcdctl([
            "lock",
            name,
            "--",
            "sh",
            "-c",
            `echo GOT-${who}; sleep 0.3`,
          ]);
          children.push(ctl);
          waits.push(
            ctl.waitFor(new RegExp(`GOT-${who}`), 20_000).then(() => void order.push(who)),
          );
        } else {
          waits.push(
            lockers[i === 1 ? 0 : 1].lock(name, { timeout: 20_000 }).then(async (lease) => {
              order.push(who);
              await sleep(50);
              await lease.release();
            }),
          );
        }
        await until(async () => (await queue(name)).length === i + 2, 5_000, `${who} to queue`);
      }
      await held.release();
      await Promise.all(waits);
      await Promise.all(children.map((c) => c.exited));
      assert.deepEqual(order, ["ctl-1", "ts-2", "ctl-3", "ts-4"]);
      await Promise.all([holder.close(), ...lockers.map((l) => l.close())]);
    });
  });

  describe("fairness and liveness", () => {
    it("re-reads its own key after waiting, and rejects a waiter whose key was deleted", async () => {
      const name = prefix("deleted-waiter");
      const holder = New({ endpoints: cluster.endpoints });
      const waiter = New({ endpoints: cluster.endpoints });
      const held = await holder.lock(name);
      const waiting = waiter.lock(name, { timeout: 10_000 });
      await until(async () => (await queue(name)).length === 2, 5_000, "the waiter to queue");
      const [, mine] = await queue(name);
      await probe.delete().key(mine.key); // behind the waiter's back; its session lives on
      await held.release();
      await assert.rejects(waiting, (error) => {
        assert.ok(error instanceof LockLostError, String(error));
        assert.match(
          error.message,
          /its queued key was deleted, or its session expired, while it waited/,
        );
        return true;
      });
      assert.deepEqual(await queue(name), []);
      await Promise.all([holder.close(), waiter.close()]);
    });

    it("rejects, never grants, a waiter whose session expired while it was queued", async () => {
      // etcd-io/etcd#11456: etcd 3.4's own etcdctl lock grants this waiter.
      const name = prefix("expired-waiter");
      const holder = New({ endpoints: cluster.endpoints });
      const held = await holder.lock(name);
      const child = runScript(fixture, ["hold", "etcd", cluster.endpoints.join(","), name, "1000"]);
      try {
        await until(async () => (await queue(name)).length === 2, 20_000, "the child to queue");
        child.signal("SIGSTOP");
        // Its 1 s lease runs out while it is stopped, and its key goes with it.
        await until(
          async () => (await queue(name)).length === 1,
          5_000,
          "the waiter's key to expire",
        );
        await held.release();
        child.signal("SIGCONT");
        const code = await within(child.exited, 10_000, "still running");
        assert.notEqual(code, "still running", `the waiter was granted:\n${child.output}`);
        assert.doesNotMatch(child.output, /HELD/);
        assert.match(
          child.output,
          /LockLostError: Lost lock ".*": (the session lease expired while waiting|its queued key was deleted)|no keepalive was acknowledged/,
        );
      } finally {
        await child.stop();
        await holder.close();
      }
    });

    it("keeps a later waiter behind the holder when the waiter before it dies", async () => {
      const name = prefix("dead-waiter");
      const holder = New({ endpoints: cluster.endpoints });
      const held = await holder.lock(name);
      // A waiter in another process with a 1 s session, killed while queued.
      const doomed = cluster.spawnEtcdctl(["lock", "--ttl=1", name]);
      await until(
        async () => (await queue(name)).length === 2,
        5_000,
        "the doomed waiter to queue",
      );
      const later = New({ endpoints: cluster.endpoints });
      const waiting = later.lock(name, { timeout: 20_000 });
      await until(async () => (await queue(name)).length === 3, 5_000, "the later waiter to queue");
      doomed.signal("SIGKILL");
      await doomed.exited;
      await until(
        async () => (await queue(name)).length === 2,
        5_000,
        "the dead waiter's key to expire",
      );
      assert.equal(await isPending(waiting, 30), true, "the later waiter jumped the holder");
      assert.equal(held.signal.aborted, false);
      await held.release();
      const lease = await waiting;
      assert.ok(lease.token > held.token);
      await Promise.all([holder.close(), later.close()]);
    });

    it("hands the lock to the next waiter through its watch, well inside a 5 s poll interval", async () => {
      const name = prefix("handoff");
      const [a, b] = [
        New({ endpoints: cluster.endpoints, retryInterval: 5_000 }),
        New({ endpoints: cluster.endpoints, retryInterval: 5_000 }),
      ];
      const times: number[] = [];
      for (let i = 0; i < 5; i++) {
        const held = await a.lock(name);
        const waiting = b.lock(name);
        await until(async () => (await queue(name)).length === 2, 5_000, "the waiter to queue");
        await sleep(20);
        const released = performance.now();
        await held.release();
        const next: Lease = await waiting;
        times.push(performance.now() - released);
        await next.release();
      }
      times.sort((x, y) => x - y);
      // With a 5 s poll, only the watch can explain a hand-off under a second.
      assert.ok(times[2] < 1_000, `median hand-off ${times[2].toFixed(1)} ms`);
      await Promise.all([a.close(), b.close()]);
    });

    it("lets the process exit by itself after close()", async () => {
      await assertExitsAfterClose({ backend: "etcd", endpoints: cluster.endpoints }, "exit");
    });
  });

  describe("connection", () => {
    it("shares one client between lockers with equal options", async () => {
      const name = prefix("shared");
      const a = New({ endpoints: cluster.endpoints });
      const b = New({ endpoints: cluster.endpoints });
      await (await a.lock(name)).release();
      await (await b.lock(name)).release();
      // The two sessions are separate leases on one client: both exist now.
      const leases = await probe.leaseClient.leaseLeases();
      assert.ok(leases.leases.length >= 2);
      await a.close();
      const lease = await b.lock(name);
      assert.ok(lease, "closing one locker left the shared client open for the other");
      await b.close();
    });

    it("sends a renewing session's keepalives on one stream, not a stream each", async () => {
      // A 1 s lease: a keepalive every third of a second.
      const locker = New({ endpoints: cluster.endpoints, ttl: 1_000 });
      const lease = await locker.lock(prefix("stream"));
      const start = await keepaliveCounts(cluster.endpoints);
      await sleep(2_000);
      const end = await keepaliveCounts(cluster.endpoints);
      assert.equal(lease.signal.aborted, false);
      const messages = end.messages - start.messages;
      const streams = end.streams - start.streams;
      assert.ok(messages >= 4, `${messages} keepalives in 2 s`);
      assert.ok(streams <= 1, `${streams} keepalive streams opened for ${messages} keepalives`);
      await locker.close();
    });
  });

  describe("createEtcdLocker() on a client the caller owns", () => {
    it("locks with the caller's client and never closes it", async () => {
      const client = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
      const locker = createEtcdLocker(client, { ttl: 2_000 });
      const name = prefix("owned");
      const lease = await locker.lock(name);
      assert.equal((await queue(name)).length, 1);
      const other = New({ endpoints: cluster.endpoints });
      assert.equal(await other.tryLock(name), undefined);
      await other.close();
      await locker.close();
      assert.equal(await client.get("/anything").string(), null, "the caller's client still works");
      assert.ok(lease.signal.reason instanceof LockClosedError, "close() tells the holder");
      client.close();
    });

    it("rejects what is not an etcd client", () => {
      assert.throws(() => createEtcdLocker({} as never), {
        name: "TypeError",
        message: 'Invalid argument "client": expected an Etcd3 client from npm:etcd3',
      });
    });
  });
});

// grpc-js leaves unref'd reconnect and idle timers behind a channel whose
// connect failed, even after close(); they do not hold the process (the
// "exit" fixture test below proves it), but Deno's op sanitizer counts them.
describe("etcd connection failures", { sanitizeOps: false, sanitizeResources: false }, () => {
  it("rejects the first call with a LockConnectionError within dialTimeout when etcd does not answer", async () => {
    // A listener that accepts connections and never answers: a hung server.
    const sockets: Socket[] = [];
    const blackHole = createServer((socket) => void sockets.push(socket));
    await new Promise<void>((resolve) => blackHole.listen(0, "127.0.0.1", resolve));
    const port = (blackHole.address() as { port: number }).port;
    const locker = New({ endpoints: [`127.0.0.1:${port}`], dialTimeout: 500 });
    const started = performance.now();
    const error = await locker.lock(prefix("hung")).catch((e) => e);
    const elapsed = performance.now() - started;
    assert.ok(error instanceof LockConnectionError, inspect(error));
    assert.equal(
      error.message,
      `Cannot connect to etcd at 127.0.0.1:${port}: no answer within 500 ms`,
    );
    assert.ok(elapsed >= 450 && elapsed < 1_500, `took ${elapsed.toFixed(0)} ms`);
    // A failed connect is not cached: with the port now closed, the next call
    // makes a new attempt and fails differently, at once.
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => blackHole.close(resolve));
    const again = performance.now();
    const refused = await locker.tryLock(prefix("hung")).catch((e) => e);
    assert.ok(refused instanceof LockConnectionError, inspect(refused));
    assert.doesNotMatch(refused.message, /no answer within/);
    assert.ok(performance.now() - again < 500, "the second call waited out a timeout again");
    await locker.close();
  });

  it("rejects with a LockConnectionError naming the endpoint when nothing listens", async () => {
    const port = await freePort();
    const locker = New({ endpoints: [`127.0.0.1:${port}`], dialTimeout: 500 });
    const error = await locker.lock(prefix("down")).catch((e) => e);
    assert.ok(error instanceof LockConnectionError, inspect(error));
    assert.match(
      error.message,
      new RegExp(`^Cannot connect to etcd at 127\\.0\\.0\\.1:${port}: `),
    );
    assert.ok(error.cause instanceof Error, "the client's error is kept as cause");
    await locker.close();
  });

  it("lets the process exit by itself after a failed connect and close()", async () => {
    const endpoints = [`127.0.0.1:${await freePort()}`];
    await assertExitsAfterClose({ backend: "etcd", endpoints }, "refused");
  });
});
