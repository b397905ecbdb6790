// Redis instances that stall (SIGSTOP), go silent (a held proxy) or lost the
// holder's key: each instance's call has its own deadline, a quorum of timely
// answers decides, and a partial acquisition given back wakes nobody.
import { after, afterEach, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { LockConnectionError, type Locker, LockTimeoutError, New, type Options } from "../mod.ts";
import { RedisServer } from "./_servers.ts";
import { TcpProxy } from "./_proxy.ts";
import { isPending, prefix, sleep, TOKEN, until, within } from "./_util.ts";

/** Lockers a test opened; each is closed after its test, passed or failed (close() is idempotent). */
const opened: Locker[] = [];
function open(options: Options): Locker {
  const locker = New(options);
  opened.push(locker);
  return locker;
}
async function closeOpened(): Promise<void> {
  await Promise.all(opened.splice(0).map((locker) => locker.close().catch(() => {})));
}

describe("redlock with one of three instances stopped (SIGSTOP)", () => {
  let servers: RedisServer[];
  before(async () => {
    servers = await Promise.all([RedisServer.start(), RedisServer.start(), RedisServer.start()]);
  });
  afterEach(closeOpened);
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  const endpoints = () => servers.map((s) => s.endpoint);
  const stopped = () => servers[2];

  /** A locker connected to all three before the stall (connecting waits on every instance). */
  async function connected(ttl: number) {
    const locker = open({ backend: "redis", endpoints: endpoints(), ttl });
    await (await locker.lock(prefix("warm"))).release();
    return locker;
  }

  /** Runs `fn` with the third instance stopped, and wakes it again whatever happens. */
  async function whileStopped(fn: () => Promise<void>): Promise<void> {
    stopped().child!.signal("SIGSTOP");
    try {
      await fn();
    } finally {
      stopped().child!.signal("SIGCONT");
    }
  }

  it("keeps a held lease with ttl 1500 ms renewed on the two that answer", async () => {
    const locker = await connected(1_500);
    const name = prefix("renew");
    const lease = await locker.lock(name);
    await whileStopped(async () => {
      await sleep(4_000); // well past two TTLs: only renewals on a quorum keep it
      assert.equal(lease.signal.aborted, false, `lost: ${lease.signal.reason}`);
      for (const server of servers.slice(0, 2)) {
        const pttl = Number(server.cli(["PTTL", `lock:{${name}}`]));
        assert.ok(pttl > 0, `PTTL ${pttl} on ${server.endpoint}`);
      }
    });
    await locker.close();
  });

  it("lock() does not wait out the validity time when one instance granted, one found it held and the stopped one is silent", async () => {
    const locker = await connected(3_000);
    const name = prefix("split");
    // Held on the second instance only, for 400 ms, by someone else: the
    // first attempt takes the first instance and finds the second held.
    servers[1].cli(["SET", `lock:{${name}}`, "someone-else", "PX", "400"]);
    await whileStopped(async () => {
      const started = performance.now();
      const lease = await locker.lock(name, { timeout: 5_000 });
      const took = performance.now() - started;
      // Waiting for the silent instance until the validity time (about 3 s)
      // before giving back and trying again would take past 2.9 s.
      assert.ok(took < 1_500, `lock() took ${took.toFixed(0)} ms`);
      for (const server of servers.slice(0, 2)) {
        assert.match(server.cli(["GET", `lock:{${name}}`]), TOKEN);
      }
      await lease.release();
    });
  });

  it("acquires a new lock on the majority that answers", async () => {
    const locker = await connected(10_000);
    const name = prefix("acquire");
    await whileStopped(async () => {
      const lease = await locker.lock(name, { timeout: 5_000 }).catch((e) => e);
      assert.ok(!(lease instanceof Error), inspect(lease));
      for (const server of servers.slice(0, 2)) {
        assert.match(server.cli(["GET", `lock:{${name}}`]), TOKEN);
      }
      const released = await within(lease.release().then(() => "released"), 3_000, "hung");
      assert.equal(released, "released");
    });
    // The stopped instance ran the SET when it woke, and the release sent after it.
    await until(() => stopped().cli(["EXISTS", `lock:{${name}}`]) === "0", 5_000, "no ghost lock");
    await locker.close();
  });

  it("finishes release() and close() promptly while the instance is stopped", async () => {
    const locker = await connected(30_000);
    const name = prefix("release");
    const held = await locker.lock(name);
    const other = await locker.lock(`${name}/2`);
    await whileStopped(async () => {
      const started = performance.now();
      const released = await within(held.release().then(() => "released"), 3_000, "hung");
      assert.equal(released, "released", "release() waits on the stopped instance");
      const closed = await within(locker.close().then(() => "closed"), 5_000, "hung");
      assert.equal(closed, "closed", "close() waits on the stopped instance");
      assert.equal(other.signal.aborted, true);
      const elapsed = performance.now() - started;
      assert.ok(elapsed < 8_000, `took ${elapsed.toFixed(0)} ms`);
      for (const server of servers.slice(0, 2)) {
        assert.equal(server.cli(["EXISTS", `lock:{${name}}`]), "0");
        assert.equal(server.cli(["EXISTS", `lock:{${name}/2}`]), "0");
      }
    });
  });
});

describe("redis instances that stop answering an acquisition (SIGSTOP)", () => {
  let servers: RedisServer[];
  before(async () => {
    servers = await Promise.all([RedisServer.start(), RedisServer.start(), RedisServer.start()]);
  });
  afterEach(closeOpened);
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  /** A locker connected to `list` before they stop, with a 1 s TTL (a 988 ms validity time). */
  async function connected(list: RedisServer[]) {
    const locker = open({ backend: "redis", endpoints: list.map((s) => s.endpoint), ttl: 1_000 });
    await (await locker.lock(prefix("warm"))).release();
    return locker;
  }

  it("tryLock() rejects with a LockConnectionError once the only instance has not answered within the validity time; lock() waits on until its timeout", async () => {
    const locker = await connected([servers[0]]);
    const name = prefix("only");
    servers[0].child!.signal("SIGSTOP");
    try {
      const error = await within(locker.tryLock(name).catch((e) => e), 5_000, "hung");
      assert.ok(error instanceof LockConnectionError, inspect(error));
      // A transient loss: a waiting lock() keeps trying until its own timeout.
      const waited = await within(
        locker.lock(name, { timeout: 2_500 }).catch((e) => e),
        6_000,
        "hung",
      );
      assert.ok(waited instanceof LockTimeoutError, inspect(waited));
      assert.equal(
        error.message,
        `Cannot acquire lock ${JSON.stringify(name)}: Redis at ${
          servers[0].endpoint
        } did not answer within 988 ms`,
      );
    } finally {
      servers[0].child!.signal("SIGCONT");
      await locker.close();
    }
  });

  it("tryLock() rejects with a LockConnectionError saying which did not answer when two of three stop", async () => {
    const locker = await connected(servers);
    const name = prefix("two");
    servers[1].child!.signal("SIGSTOP");
    servers[2].child!.signal("SIGSTOP");
    try {
      const error = await within(locker.tryLock(name).catch((e) => e), 5_000, "hung");
      assert.ok(error instanceof LockConnectionError, inspect(error));
      assert.match(error.message, /1 of 3 Redis instances answered \(2 needed\)/);
      assert.ok(error.message.includes(`${servers[0].endpoint} granted it`), error.message);
      for (const server of servers.slice(1)) {
        assert.ok(
          error.message.includes(`${server.endpoint}: no answer within 988 ms`),
          error.message,
        );
      }
      // The one instance that granted it gave it back.
      assert.equal(servers[0].cli(["EXISTS", `lock:{${name}}`]), "0");
    } finally {
      servers[1].child!.signal("SIGCONT");
      servers[2].child!.signal("SIGCONT");
      await locker.close();
    }
  });
});

describe("redlock with one of three instances silently partitioned", () => {
  let servers: RedisServer[];
  let proxy: TcpProxy;
  before(async () => {
    servers = await Promise.all([RedisServer.start(), RedisServer.start(), RedisServer.start()]);
    proxy = await TcpProxy.start(servers[2].endpoint);
  });
  afterEach(closeOpened);
  after(async () => {
    await proxy.close();
    await Promise.all(servers.map((s) => s.stop()));
  });

  it("renews, acquires, releases and closes on the two that answer", async () => {
    const endpoints = [servers[0].endpoint, servers[1].endpoint, proxy.endpoint];
    const locker = open({ backend: "redis", endpoints, ttl: 1_500 });
    const name = prefix("partition");
    const held = await locker.lock(name);
    proxy.hold(); // nothing is forwarded and nothing is closed, as when packets stop
    try {
      await sleep(3_500);
      assert.equal(held.signal.aborted, false, `lost: ${held.signal.reason}`);
      const next = await locker.lock(`${name}/2`, { timeout: 3_000 }).catch((e) => e);
      assert.ok(!(next instanceof Error), inspect(next));
      assert.equal(await within(held.release().then(() => "released"), 3_000, "hung"), "released");
      assert.equal(await within(locker.close().then(() => "closed"), 5_000, "hung"), "closed");
      assert.equal(servers[0].cli(["EXISTS", `lock:{${name}}`]), "0");
    } finally {
      proxy.release();
    }
  });
});

describe("redlock with the holder's key missing on one instance", () => {
  let servers: RedisServer[];
  before(async () => {
    servers = await Promise.all([RedisServer.start(), RedisServer.start(), RedisServer.start()]);
  });
  afterEach(closeOpened);
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  const endpoints = () => servers.map((s) => s.endpoint);

  it("lets a waiter poll a handful of times a second, and wakes nobody when it gives back a partial acquisition", async () => {
    const name = prefix("spin");
    // A long TTL: no renewal puts the key back during the count.
    const holder = open({ backend: "redis", endpoints: endpoints(), ttl: 30_000 });
    // Its own connections, as another process would have.
    const other = open({ backend: "redis", endpoints: endpoints(), dialTimeout: 4_000 });
    const held = await holder.lock(name);
    servers[0].cli(["DEL", `lock:{${name}}`]); // as if it had been down at the acquisition
    const waiting = other.lock(name, { timeout: 20_000 });
    try {
      await sleep(300); // subscribed and waiting
      servers[0].cli(["CONFIG", "RESETSTAT"]);
      await sleep(1_000);
      const calls = servers[0].commandCalls();
      const scripts = (calls.evalsha ?? 0) + (calls.eval ?? 0);
      // Polling at retryInterval (100 ms): about ten attempts and ten give-backs.
      assert.ok(scripts < 100, `${scripts} script calls in one second`);
      assert.equal(calls.publish ?? 0, 0, "a give-back of a partial acquisition published");
      assert.equal(await isPending(waiting), true, "the waiter took a lock held on a majority");
    } finally {
      await held.release();
    }
    const lease = await waiting;
    assert.ok(lease.token > held.token);
    await lease.release();
    await Promise.all([holder.close(), other.close()]);
  });

  it("puts the key back where it is missing at the next renewal, with the same token", async () => {
    const name = prefix("restore");
    const key = `lock:{${name}}`;
    const holder = open({ backend: "redis", endpoints: endpoints(), ttl: 1_500 });
    const lease = await holder.lock(name);
    const token = servers[1].cli(["GET", key]);
    servers[0].cli(["DEL", key]);
    servers[0].cli(["DEL", `${key}:fence`]);
    await until(
      () => servers[0].cli(["GET", key]) === token,
      3_000,
      "the key back on the instance",
    );
    assert.ok(Number(servers[0].cli(["PTTL", key])) > 0);
    // Its fencing counter counts from the lease's token on, as on the others.
    assert.ok(BigInt(servers[0].cli(["GET", `${key}:fence`])) >= lease.token);
    assert.equal(lease.signal.aborted, false);
    await holder.close();
    for (const server of servers) assert.equal(server.cli(["EXISTS", key]), "0");
  });

  it("puts the key back on that instance even when it answers after the quorum did", async () => {
    const name = prefix("restore-slow");
    const key = `lock:{${name}}`;
    await using proxy = await TcpProxy.start(servers[0].endpoint);
    const holder = open({
      backend: "redis",
      endpoints: [proxy.endpoint, servers[1].endpoint, servers[2].endpoint],
      ttl: 1_500,
    });
    const lease = await holder.lock(name);
    const token = servers[1].cli(["GET", key]);
    proxy.delayMs = 50; // its answer comes after the other two have renewed
    servers[0].cli(["DEL", key]);
    await until(
      () => servers[0].cli(["GET", key]) === token,
      3_000,
      "the key back on the instance",
    );
    assert.equal(lease.signal.aborted, false);
    await holder.close();
  });

  it("never overwrites another holder's key on that instance", async () => {
    const name = prefix("foreign");
    const key = `lock:{${name}}`;
    const holder = open({ backend: "redis", endpoints: endpoints(), ttl: 1_500 });
    const lease = await holder.lock(name);
    servers[0].cli(["SET", key, "someone-else", "PX", "30000"]);
    await sleep(1_500); // two renewals
    assert.equal(servers[0].cli(["GET", key]), "someone-else");
    assert.equal(lease.signal.aborted, false, "a majority still holds it");
    await holder.close();
    assert.equal(servers[0].cli(["GET", key]), "someone-else");
    servers[0].cli(["DEL", key]);
  });
});
