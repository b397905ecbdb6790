// Redis with ACL users, passwords and TLS, and Redlock over three instances.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { Redis } from "ioredis";
import {
  LockAuthError,
  LockConnectionError,
  LockLostError,
  LockPermissionError,
  New,
  type Options,
} from "../mod.ts";
import { makeCerts, RedisServer, type TestCerts } from "./_servers.ts";
import { prefix, Provoked, sleep, TOKEN, until } from "./_util.ts";

const PASSWORD = "app-Secret-4c9d";
const WRONG = "not-the-Password-8e1f";
const provoked = new Provoked();
const keep = <T>(error: T) => provoked.keep(error);

describe("redis with ACL users", () => {
  let server: RedisServer;
  before(async () => {
    server = await RedisServer.start();
    // A user limited to the keys and channels of locks under /app/; "default" stays enabled.
    server.cli([
      "ACL",
      "SETUSER",
      "app",
      "on",
      `>${PASSWORD}`,
      "resetkeys",
      "~lock:{/app/*",
      "resetchannels",
      "&lock:{/app/*",
      "-@all",
      "+evalsha",
      "+eval",
      // What the lock scripts run, as the user.
      "+set",
      "+get",
      "+del",
      "+incr",
      "+pttl",
      "+pexpire",
      "+publish",
      "+auth",
      "+hello",
      "+ping",
      "+info",
      "+quit",
      "+subscribe",
      "+unsubscribe",
    ]);
  });
  after(async () => {
    await server.stop();
  });

  /** A locker that authenticates as the "app" user. */
  const asApp = (options: Partial<Options> = {}) =>
    New({
      backend: "redis",
      endpoints: [server.endpoint],
      username: "app",
      password: PASSWORD,
      ...options,
    });

  it("locks as a user limited to the lock keys", async () => {
    const locker = asApp();
    const name = `/app${prefix()}`;
    const lease = await locker.lock(name);
    const other = asApp({ ttl: 5_000 });
    const waiting = other.lock(name); // subscribes on the lock's channel
    await lease.release();
    assert.ok((await waiting).token > lease.token);
    await Promise.all([locker.close(), other.close()]);
  });

  it("wakes a waiter whose ACL has no queue commands at the release, not at its 5 s poll", async () => {
    const name = `/app${prefix()}`;
    // The holder may queue (default user); the waiter may not (no ZADD, TIME...).
    const holder = New({ backend: "redis", endpoints: [server.endpoint] });
    const waiter = asApp({ retryInterval: 5_000 });
    try {
      const lease = await holder.lock(name);
      const waiting = waiter.lock(name);
      await sleep(300); // its attempts are done, and it is subscribed
      const released = performance.now();
      await lease.release();
      const next = await waiting;
      assert.ok(performance.now() - released < 1_000, "woken by its poll, not the release");
      assert.ok(next.token > lease.token);
      await next.release();
    } finally {
      await Promise.all([holder.close(), waiter.close()]);
    }
  });

  it("rejects a key outside the user's keys with a LockPermissionError", async () => {
    const locker = asApp();
    const error = keep(await locker.lock(`/other${prefix()}`).catch((e) => e));
    assert.ok(error instanceof LockPermissionError, inspect(error));
    assert.match(error.message, /permission denied by Redis at 127\.0\.0\.1:\d+: NOPERM/);
    await locker.close();
  });

  it("refuses a wrong password at once, though 'default' is still enabled", async () => {
    const locker = New({
      backend: "redis",
      endpoints: [server.endpoint],
      username: "app",
      password: WRONG,
    });
    const started = performance.now();
    const error = keep(await locker.lock(`/app${prefix()}`).catch((e) => e));
    assert.ok(error instanceof LockAuthError, inspect(error));
    assert.match(error.message, /rejected the credentials: WRONGPASS/);
    assert.ok(performance.now() - started < 1_000, "retried?");
    await locker.close();
  });

  it("refuses a password the server does not want, rather than going on as 'default'", async () => {
    const locker = New({ backend: "redis", endpoints: [server.endpoint], password: WRONG });
    const error = keep(await locker.lock(prefix()).catch((e) => e));
    assert.ok(error instanceof LockAuthError, inspect(error));
    await locker.close();
  });
});

describe("redis over TLS", () => {
  let server: RedisServer;
  let certs: TestCerts;
  before(async () => {
    certs = makeCerts();
    server = await RedisServer.start({ tls: { cert: certs.cert, key: certs.key, ca: certs.ca } });
  });
  after(async () => {
    await server.stop();
    certs.remove();
  });

  it("locks over TLS with the CA that signed the server's certificate", async () => {
    const tls = { ca: certs.caPem, serverName: "localhost" };
    const locker = New({ backend: "redis", endpoints: [server.endpoint], tls });
    const lease = await locker.lock(prefix("tls"));
    assert.ok(lease.token > 0n);
    await locker.close();
  });

  it("refuses a server certificate no trusted CA signed", async () => {
    const locker = New({
      backend: "redis",
      endpoints: [server.endpoint],
      tls: { serverName: "localhost" },
      dialTimeout: 1_000,
    });
    const error = keep(await locker.lock(prefix("untrusted")).catch((e) => e));
    assert.ok(error instanceof LockConnectionError, inspect(error));
    await locker.close();
  });
});

describe("redlock over three instances", () => {
  let servers: RedisServer[];
  before(async () => {
    servers = await Promise.all([RedisServer.start(), RedisServer.start(), RedisServer.start()]);
  });
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  const endpoints = () => servers.map((s) => s.endpoint);

  it("holds the lock on every instance and excludes another locker", async () => {
    const locker = New({ backend: "redis", endpoints: endpoints() });
    const name = prefix("redlock");
    const lease = await locker.lock(name);
    // Granted once a quorum took it: the last instance may take it a
    // moment later (Bun, 1 run in 1: it had not yet when lock() resolved).
    await until(
      () => servers.every((server) => TOKEN.test(server.cli(["GET", `lock:{${name}}`]))),
      2_000,
      "the lock on every instance",
    );
    const other = New({ backend: "redis", endpoints: endpoints(), ttl: 5_000 });
    assert.equal(await other.tryLock(name), undefined);
    const waiting = other.lock(name);
    await lease.release();
    assert.ok((await waiting).token > lease.token);
    await Promise.all([locker.close(), other.close()]);
  });

  it("keeps tokens rising when successive majorities differ", async () => {
    const name = prefix("majorities");
    // Skew the counters: the first instance counts far ahead of the others.
    servers[0].cli(["SET", `lock:{${name}}:fence`, "100"]);
    // A quorum of answers decides: make the first majority the first two.
    servers[2].cli(["SET", `lock:{${name}}`, "someone-else", "PX", "30000"]);
    const locker = New({ backend: "redis", endpoints: endpoints() });
    const first = await locker.lock(name);
    assert.equal(first.token, 101n);
    await first.release();
    servers[2].cli(["DEL", `lock:{${name}}`]);
    await servers[0].shutdown("SIGKILL"); // the next majority is the other two
    try {
      const second = await locker.lock(name, { timeout: 5_000 });
      assert.ok(second.token > first.token, `token ${second.token} after ${first.token}`);
      await second.release();
    } finally {
      await servers[0].restart();
    }
    await locker.close();
  });

  it("works with one of three instances down, and loses the lock when a second goes", async () => {
    const name = prefix("down");
    const locker = New({ backend: "redis", endpoints: endpoints(), ttl: 1_000 });
    await servers[2].shutdown("SIGKILL");
    try {
      const lease = await locker.lock(name, { timeout: 5_000 });
      await new Promise((resolve) => setTimeout(resolve, 1_500)); // renewed past its TTL on 2 of 3
      assert.equal(lease.signal.aborted, false, `lost with 2 of 3 up: ${lease.signal.reason}`);
      await servers[1].shutdown("SIGKILL");
      await new Promise((resolve) => lease.signal.addEventListener("abort", resolve));
      assert.ok(lease.signal.reason instanceof LockLostError);
      // One attempt (a waiting lock() would wait on until its signal).
      const error = keep(await locker.tryLock(`${name}/2`).catch((e) => e));
      assert.ok(error instanceof LockConnectionError, inspect(error));
      // The error says what each instance answered.
      assert.match(error.message, /1 of 3 Redis instances answered \(2 needed\)/);
      for (const server of servers) assert.ok(error.message.includes(server.endpoint));
    } finally {
      await servers[1].restart();
      await servers[2].restart();
    }
    await locker.close();
  });

  it("connects with one instance down and counts it in once it is back", async () => {
    await servers[1].shutdown("SIGKILL");
    const locker = New({ backend: "redis", endpoints: endpoints(), dialTimeout: 1_000 });
    const name = prefix("late");
    try {
      const lease = await locker.lock(name);
      await lease.release();
    } finally {
      await servers[1].restart();
    }
    // The instance that came back takes part again once its client reconnects.
    const probe = new Redis({ host: "127.0.0.1", port: servers[1].port });
    await until(
      async () => {
        const lease = await locker.lock(name);
        const present = (await probe.get(`lock:{${name}}`)) !== null;
        await lease.release();
        return present;
      },
      10_000,
      "the restarted instance to hold the lock too",
    );
    probe.disconnect();
    await locker.close();
  });
});

describe("redis errors", () => {
  it("never show the password or a lock token in any error these tests provoked", () => {
    provoked.assertClean([PASSWORD, WRONG]);
  });
});
