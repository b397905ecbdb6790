// Hostile input, property-based (npm fast-check): every invalid option or key
// is refused before any I/O with an error that names it, no valid one
// crashes, and keys of every shape are one lock each on every backend.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import fc from "fast-check";
import { Redis } from "ioredis";
import { LockAuthError, type Locker, New, type Options } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { EtcdCluster, RedisClusterServers, RedisServer } from "./_servers.ts";
import { prefix } from "./_util.ts";

const FIELDS = [
  "backend",
  "endpoints",
  "username",
  "password",
  "tls",
  "dialTimeout",
  "ttl",
  "retryInterval",
  "autoRenew",
] as const;

/** Values of every kind, and near-misses of the valid ones. */
const values = fc.oneof(
  fc.anything(),
  fc.constantFrom("etcd", "redis", "memory", "Redis", "", " ", "127.0.0.1", "127.0.0.1:0"),
  fc.constantFrom(-1, 0, 0.5, 1, 999, 1e12, Number.NaN, Infinity, -0, 2 ** 31),
  fc.array(fc.oneof(fc.string(), fc.constantFrom("127.0.0.1:2379", "host:99999", ":1"))),
  fc.record({ ca: fc.anything(), serverName: fc.anything(), bogus: fc.anything() }),
);

/** What a key is made of: any code point, and the characters that mean something somewhere. */
const keyPart = fc.oneof(
  fc.string({ unit: "binary", minLength: 1, maxLength: 24 }),
  fc.constantFrom("/", "//", "{", "}", "{}", "\0", ":", "*", "?", " ", "\u{1F512}", "é", "e\u0301"),
  fc.stringMatching(/^\/[0-9a-f]{1,16}$/), // what looks like an etcd queue entry
);
const validKey = fc.array(keyPart, { minLength: 1, maxLength: 6 }).map((parts) => parts.join(""))
  .filter((key) => new TextEncoder().encode(key).length <= 1024);
/** Two different keys: unrelated, or one made from the other the way names collide. */
const keyPair = fc.oneof(
  fc.tuple(validKey, validKey),
  fc.tuple(validKey, keyPart).map(([key, part]) => [key, key + part] as [string, string]),
  validKey.map((key) => [key, `${key}/${"0123456789abcdef"[key.length % 16]}`] as [string, string]),
  validKey.map((key) => [`{${key}}`, key] as [string, string]),
).filter(([a, b]) => a !== b && new TextEncoder().encode(b).length <= 1024);

describe("hostile options", () => {
  it("refuses every invalid value of every option with a TypeError or RangeError naming it, and accepts the rest", () => {
    fc.assert(
      fc.property(fc.constantFrom(...FIELDS), values, (field, value) => {
        let locker: Locker;
        try {
          locker = New({ [field]: value } as Options);
        } catch (error) {
          assert.ok(
            error instanceof TypeError || error instanceof RangeError,
            `${field}=${inspect(value)}: ${error}`,
          );
          assert.match(error.message, new RegExp(`"${field}[".\\[]`), error.message);
          return;
        }
        // Valid: New() did no I/O, so close() has nothing to undo.
        void locker.close();
      }),
      { numRuns: 3_000 },
    );
  });

  it("never shows an invalid password, whatever its type", () => {
    fc.assert(
      fc.property(fc.oneof(fc.integer(), fc.double(), fc.bigInt(), fc.boolean()), (password) => {
        const error = (() => {
          try {
            New({ password } as unknown as Options);
          } catch (e) {
            return e as Error;
          }
          return undefined;
        })();
        assert.ok(error instanceof TypeError, String(error));
        assert.ok(!error.message.includes(String(password)) || String(password).length < 2);
      }),
    );
  });

  it("refuses an unknown option and options that are not an object, naming what it got", () => {
    assert.throws(() => New({ ttll: 5 } as Options), /"ttll"/);
    for (const bad of [5, "etcd", [], () => {}]) {
      assert.throws(() => New(bad as unknown as Options), TypeError);
    }
  });
});

describe("hostile keys", () => {
  it("refuses non-strings, empty, too long and ill-formed keys before any I/O, naming why", async () => {
    const locker = New({ backend: "memory" });
    const invalid = fc.oneof(
      fc.anything().filter((v) => typeof v !== "string"),
      fc.constant(""),
      fc.string({ unit: "binary", minLength: 1025, maxLength: 1500 }),
      // A lone surrogate somewhere in an otherwise fine key.
      fc.tuple(fc.string(), fc.integer({ min: 0xd800, max: 0xdfff }), fc.string()).map(
        ([a, unit, b]) => `${a}${String.fromCharCode(unit)}${b}`,
      ).filter((key) => !(key as string & { isWellFormed(): boolean }).isWellFormed()),
    );
    await fc.assert(
      fc.asyncProperty(invalid, async (key) => {
        const error = await locker.tryLock(key as string).then(() => undefined, (e) => e);
        assert.ok(error instanceof TypeError || error instanceof RangeError, String(error));
        assert.match(error.message, /^Invalid lock key: expected /);
      }),
      { numRuns: 500 },
    );
    await locker.close();
  });

  it("makes every well-formed key of at most 1024 bytes one lock, and two keys two locks (memory)", async () => {
    const [a, b] = [New({ backend: "memory" }), New({ backend: "memory" })];
    await fc.assert(fc.asyncProperty(keyPair, (pair) => assertTwoLocks(a, b, pair)), {
      numRuns: 500,
    });
    await Promise.all([a.close(), b.close()]);
  });
});

/** `a` holds one key: `b` gets the other, not the same one; and the other way round. */
async function assertTwoLocks(a: Locker, b: Locker, pair: [string, string]) {
  for (const [first, second] of [pair, [pair[1], pair[0]]]) {
    const held = await a.lock(first, { timeout: 5_000 });
    try {
      assert.equal(await b.tryLock(first), undefined, `${JSON.stringify(first)} was two locks`);
      const other = await b.tryLock(second);
      assert.ok(
        other,
        `holding ${JSON.stringify(first)} kept ${JSON.stringify(second)} from being taken`,
      );
      await other.release();
    } finally {
      await held.release();
    }
  }
}

/** The same property on a real server: fewer runs, each a few round trips. */
function keysOn(name: string, make: () => Locker) {
  it(`makes every well-formed key one lock, and two keys two locks (${name})`, async () => {
    const [a, b] = [make(), make()];
    try {
      const unique = prefix("hostile");
      await fc.assert(
        fc.asyncProperty(keyPair, ([first, second]) =>
          // A unique start keeps runs apart; the generated part follows it.
          assertTwoLocks(a, b, [
            `${unique}${first}`.slice(0, 1000),
            `${unique}${second}`.slice(0, 1000),
          ])),
        { numRuns: 40 },
      );
      // The full 1024 bytes, in four-byte characters.
      await assertTwoLocks(a, b, ["\u{1F512}".repeat(256), "\u{1F511}".repeat(256)]);
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });
}

describe("hostile keys on real servers", () => {
  let etcd: EtcdCluster;
  let redis: RedisServer;
  let cluster: RedisClusterServers;
  const clients: { disconnect(): void }[] = [];
  before(async () => {
    [etcd, redis, cluster] = await Promise.all([
      EtcdCluster.start(),
      RedisServer.start(),
      RedisClusterServers.start(),
    ]);
  });
  after(async () => {
    for (const client of clients) client.disconnect();
    await Promise.all([etcd.stop(), redis.stop(), cluster.stop()]);
  });

  keysOn("etcd", () => New({ endpoints: etcd.endpoints }));
  keysOn("redis", () => New({ backend: "redis", endpoints: [redis.endpoint] }));
  keysOn("Redis Cluster", () => {
    const client = new Redis.Cluster(cluster.nodes, { enableOfflineQueue: true });
    clients.push(client);
    return createRedisLocker(client as never);
  });
});

describe("secrets at rest", () => {
  let server: RedisServer;
  let admin: Redis;
  const password = "hostile-Pass-7431";
  before(async () => {
    server = await RedisServer.start({ args: ["--requirepass", password] });
    admin = new Redis({ host: "127.0.0.1", port: server.port, password });
  });
  after(async () => {
    admin.disconnect();
    await server.stop();
  });

  it("shows no password when a locker, its lease or its options are inspected", async () => {
    const options: Options = { backend: "redis", endpoints: [server.endpoint], password };
    const locker = New(options);
    const lease = await locker.lock(prefix("inspect"));
    try {
      for (const seen of [locker, lease, lease.signal]) {
        const text = inspect(seen, { depth: 10, showHidden: true }) + String(seen) +
          JSON.stringify(seen, (_, v) => typeof v === "bigint" ? String(v) : v);
        assert.ok(!text.includes(password), text);
      }
    } finally {
      await lease.release();
      await locker.close();
    }
  });

  it("never lets a wrong-password config use the connection the right one opened (checked on the server)", async () => {
    const right = New({ backend: "redis", endpoints: [server.endpoint], password });
    const wrong = New({ backend: "redis", endpoints: [server.endpoint], password: "not-it" });
    const key = prefix("cache");
    try {
      const lease = await right.lock(key);
      await admin.call("ACL", "LOG", "RESET");
      await assert.rejects(wrong.tryLock(key), LockAuthError);
      // The wrong password was sent on a connection of its own, and refused.
      const log = await admin.call("ACL", "LOG") as unknown[][];
      assert.ok(log.some((entry) => entry.includes("auth")), JSON.stringify(log));
      await lease.release();
    } finally {
      await Promise.all([right.close(), wrong.close()]);
    }
  });
});
