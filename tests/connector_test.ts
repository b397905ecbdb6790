import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { type ConnectionConfig, Connector, hashConfig } from "../connector.ts";
import { collectGarbage, sleep, until } from "./_util.ts";

const SECRET = "s3cret-Password-that-must-not-leak";

function config(overrides: Partial<ConnectionConfig> = {}): ConnectionConfig {
  return {
    backend: "etcd",
    endpoints: ["127.0.0.1:2379"],
    username: "app",
    password: SECRET,
    tls: false,
    dialTimeout: 5_000,
    ...overrides,
  };
}

interface FakeClient {
  id: number;
  closed: boolean;
}

/** A factory that counts what it creates and closes, and can be told to fail. */
function countingFactory() {
  const counts = { created: 0, closed: 0, failNext: 0 };
  const connector = new Connector<FakeClient>({
    create: async () => {
      await sleep(5); // a real connect takes a while: concurrent callers overlap
      if (counts.failNext > 0) {
        counts.failNext--;
        throw new Error("connection refused");
      }
      return { id: ++counts.created, closed: false };
    },
    close: (client) => {
      client.closed = true;
      counts.closed++;
      return Promise.resolve();
    },
  });
  return { connector, counts };
}

/** Every string reachable from `root`, through objects, arrays, maps, sets, promises' values and weak refs. */
async function reachableStrings(root: unknown): Promise<string[]> {
  const seen = new Set<unknown>();
  const strings: string[] = [];
  const stack = [root];
  while (stack.length > 0) {
    let value = stack.pop();
    if (typeof value === "string") {
      strings.push(value);
      continue;
    }
    if (typeof value !== "object" || value === null || seen.has(value)) continue;
    seen.add(value);
    if (value instanceof Promise) value = await value.catch(() => undefined);
    if (value instanceof WeakRef) value = value.deref();
    if (value instanceof Map) {
      for (const [k, v] of value) stack.push(k, v);
      continue;
    }
    if (value instanceof Set || Array.isArray(value)) {
      stack.push(...value);
      continue;
    }
    if (typeof value === "object" && value !== null) {
      for (const key of Reflect.ownKeys(value)) {
        if (typeof key === "string") strings.push(key);
        stack.push((value as Record<string | symbol, unknown>)[key]);
      }
    }
  }
  return strings;
}

describe("Connector", () => {
  it("creates one client for 1,000 concurrent acquires of one config", async () => {
    const { connector, counts } = countingFactory();
    const refs = await Promise.all(
      Array.from({ length: 1_000 }, () => connector.acquire(config())),
    );
    assert.equal(counts.created, 1);
    assert.ok(refs.every((ref) => ref.client === refs[0].client));
    const later = await connector.acquire(config());
    assert.equal(later.client, refs[0].client);
    assert.equal(counts.created, 1);
    await Promise.all([...refs, later].map((ref) => ref.release()));
    assert.equal(counts.closed, 1);
  });

  for (
    const [field, other] of [
      ["password", { password: "another password" }],
      ["username", { username: "other" }],
      ["endpoint list", { endpoints: ["127.0.0.1:2379", "127.0.0.1:22379"] }],
      ["TLS setting", { tls: {} }],
      ["TLS CA", { tls: { ca: "-----BEGIN CERTIFICATE-----" } }],
      ["backend", { backend: "redis" }],
      ["dial timeout", { dialTimeout: 100 }],
    ] as const
  ) {
    it(`creates another client for a different ${field}`, async () => {
      const { connector, counts } = countingFactory();
      const a = await connector.acquire(config());
      const b = await connector.acquire(config(other as Partial<ConnectionConfig>));
      assert.equal(counts.created, 2);
      assert.notEqual(a.client, b.client);
      await a.release();
      await b.release();
    });
  }

  it("hashes equal configs equally and different passwords differently", async () => {
    assert.equal(await hashConfig(config()), await hashConfig(config()));
    assert.notEqual(await hashConfig(config()), await hashConfig(config({ password: "x" })));
    assert.match(await hashConfig(config()), /^[0-9a-f]{64}$/);
  });

  it("retries a failed creation instead of caching it", async () => {
    const { connector, counts } = countingFactory();
    counts.failNext = 1;
    const failures = await Promise.allSettled([
      connector.acquire(config()),
      connector.acquire(config()),
    ]);
    assert.ok(
      failures.every((r) => r.status === "rejected"),
      "concurrent callers share the failure",
    );
    assert.equal(connector.cache.size, 0, "the failure is not cached");
    const ref = await connector.acquire(config());
    assert.equal(counts.created, 1);
    assert.equal(ref.client.closed, false);
    await ref.release();
  });

  it("keeps a client open while another user holds it and closes it on the last release", async () => {
    const { connector, counts } = countingFactory();
    const a = await connector.acquire(config());
    const b = await connector.acquire(config());
    await a.release();
    await a.release(); // idempotent: must not steal b's reference
    assert.equal(b.client.closed, false);
    assert.equal(counts.closed, 0);
    await b.release();
    assert.equal(b.client.closed, true);
    assert.equal(connector.cache.size, 0);
    const c = await connector.acquire(config());
    assert.notEqual(c.client, b.client, "a closed client is never handed out again");
    assert.equal(counts.created, 2);
    await c.release();
  });

  it("holds no plaintext secret anywhere reachable from the cache", async () => {
    const { connector } = countingFactory();
    const pending = connector.acquire(config({ tls: { key: "PRIVATE-KEY-PEM" } }));
    await until(() => connector.cache.size === 1, 1_000, "the creation to be cached");
    const whileCreating = await reachableStrings(connector.cache);
    const ref = await pending;
    const created = await reachableStrings(connector.cache);
    for (const strings of [whileCreating, created]) {
      assert.ok(strings.length > 0, "the walk found the cache's keys");
      for (const s of strings) {
        assert.ok(!s.includes(SECRET), `the cache holds the password in ${JSON.stringify(s)}`);
        assert.ok(!s.includes("PRIVATE-KEY-PEM"), "the cache holds the TLS key");
        assert.ok(!s.includes("app"), "the cache holds the username");
      }
    }
    await ref.release();
  });

  it("gives back the reference of an owner dropped without release", async () => {
    const { connector, counts } = countingFactory();
    const kept = await connector.acquire(config());
    await (async () => {
      // The owner lives only inside this function.
      await connector.acquire(config(), { name: "a locker that was never closed" });
    })();
    await kept.release();
    assert.equal(counts.closed, 0, "the dropped owner's reference still keeps the client open");
    await until(
      async () => {
        collectGarbage();
        await sleep(10);
        return counts.closed === 1;
      },
      5_000,
      "the dropped owner's reference to be given back",
    );
    assert.equal(connector.cache.size, 0);
  });
});
