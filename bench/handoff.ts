// Cross-process hand-offs per second on one key, 4 processes x 2 workers,
// for @genesis/lock against the raw-client floor, measured side by side in
// one run (raw, lock, raw, lock; the mean of each is reported).
//
//   npx deno run --allow-all bench/handoff.ts redis [seconds per round]
//   npx deno run --allow-all bench/handoff.ts etcd [seconds per round]
//
// Raw floor: each worker retries its put-if-absent in a tight loop (Redis:
// SET NX PX, then a compare-and-delete script by SHA; etcd: a transaction that puts
// the key on a pre-granted lease if it is absent, then a delete), with no
// sleep and no notification: the only faster hand-off is none at all.
// @genesis/lock: lock() and release(). Under the lock each worker does a
// read-modify-write of a shared counter on the same server, so every
// hand-off does real work, and the final count proves no update was lost.

import { Buffer } from "node:buffer";
import process from "node:process";
import { Etcd3 } from "etcd3";
import { Redis } from "ioredis";
import { type Backend, New } from "../mod.ts";
import { EtcdCluster, RedisServer, runScript } from "../tests/_servers.ts";

const COMPARE_AND_DELETE =
  "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/** The counter under the lock, and the raw lock, on one backend's server. */
interface Store {
  /** One read-modify-write of the counter. */
  increment(): Promise<void>;
  read(): Promise<number>;
  /** One raw attempt: put-if-absent; whether it got the lock. */
  tryRaw(): Promise<boolean>;
  releaseRaw(): Promise<void>;
  close(): void;
}

async function store(backend: string, endpoint: string, key: string): Promise<Store> {
  const counter = `count:${key}`;
  if (backend === "redis") {
    const [host, port] = endpoint.split(":");
    // The compare-and-delete goes by SHA (EVALSHA), as a real lock sends it.
    const redis = new Redis({ host, port: Number(port) }) as Redis & {
      floorRelease(key: string, token: string): Promise<number>;
    };
    redis.defineCommand("floorRelease", { numberOfKeys: 1, lua: COMPARE_AND_DELETE });
    let token = "";
    return {
      increment: async () => void await redis.set(counter, Number(await redis.get(counter)) + 1),
      read: async () => Number(await redis.get(counter)),
      tryRaw: async () => {
        token = crypto.randomUUID();
        return (await redis.set(`raw:${key}`, token, "PX", 10_000, "NX")) === "OK";
      },
      releaseRaw: async () => void await redis.floorRelease(`raw:${key}`, token),
      close: () => redis.disconnect(),
    };
  }
  const etcd = new Etcd3({ hosts: `http://${endpoint}` });
  const { ID: lease } = await etcd.leaseClient.leaseGrant({ TTL: 60, ID: 0 });
  const raw = Buffer.from(`raw:${key}`);
  return {
    increment: async () =>
      void await etcd.put(counter).value(Number(await etcd.get(counter).string()) + 1),
    read: async () => Number(await etcd.get(counter).string()),
    tryRaw: async () =>
      (await etcd.kv.txn({
        compare: [{ key: raw, target: "Create", result: "Equal", create_revision: 0 }],
        success: [{ request_put: { key: raw, value: Buffer.alloc(0), lease } }],
        failure: [],
      })).succeeded,
    releaseRaw: async () => void await etcd.kv.deleteRange({ key: raw }),
    close: () => etcd.close(),
  };
}

async function worker(mode: string, backend: string, endpoint: string, key: string, ms: number) {
  const s = await store(backend, endpoint, key);
  let count = 0;
  const until = performance.now() + ms;
  if (mode === "raw") {
    while (performance.now() < until) {
      if (!(await s.tryRaw())) continue;
      await s.increment();
      await s.releaseRaw();
      count++;
    }
  } else {
    const locker = New({ backend: backend as Backend, endpoints: [endpoint] });
    while (performance.now() < until) {
      const lease = await locker.lock(key);
      await s.increment();
      await lease.release();
      count++;
    }
    await locker.close();
  }
  s.close();
  return count;
}

if (process.argv[2] === "worker") {
  const [, , , mode, backend, endpoint, key, ms] = process.argv;
  const cpu = process.cpuUsage();
  const counts = await Promise.all(
    [0, 1].map(() => worker(mode, backend, endpoint, key, Number(ms))),
  );
  const used = process.cpuUsage(cpu);
  console.log(`COUNT ${counts[0] + counts[1]} CPU ${Math.round((used.user + used.system) / 1000)}`);
  process.exit(0);
}

const backend = process.argv[2] ?? "redis";
const seconds = Number(process.argv[3] ?? 5);
const server = backend === "etcd" ? await EtcdCluster.start() : await RedisServer.start();
const endpoint = server instanceof EtcdCluster ? server.endpoints[0] : server.endpoint;
const script = new URL(import.meta.url).pathname;
const rates: Record<string, number[]> = { raw: [], lock: [] };
const cpus: Record<string, number[]> = { raw: [], lock: [] };
try {
  for (const mode of ["raw", "lock", "raw", "lock"]) {
    const key = `/bench/handoff/${crypto.randomUUID()}`;
    const children = [0, 1, 2, 3].map(() =>
      runScript(script, ["worker", mode, backend, endpoint, key, String(seconds * 1000)])
    );
    const results = await Promise.all(children.map(async (child) => {
      const [, n, cpu] = await child.waitFor(/COUNT (\d+) CPU (\d+)/, seconds * 1000 + 30_000);
      await child.exited;
      return { count: Number(n), cpu: Number(cpu) };
    }));
    const total = results.reduce((a, r) => a + r.count, 0);
    const cpu = results.reduce((a, r) => a + r.cpu, 0);
    const check = await store(backend, endpoint, key);
    const counted = await check.read();
    check.close();
    if (counted !== total) {
      throw new Error(`${mode}: ${total} hand-offs, but the counter says ${counted}`);
    }
    rates[mode].push(total / seconds);
    cpus[mode].push(cpu / total);
    console.log(
      `${mode}: ${total} hand-offs in ${seconds} s (${(total / seconds).toFixed(0)}/s), ` +
        `${(cpu / total).toFixed(2)} ms client CPU each; counter ${counted}, no update lost`,
    );
  }
} finally {
  await server.stop();
}
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
console.log(
  `\n${backend} hand-offs/s, 4 processes x 2 workers, one key: raw floor ${
    mean(rates.raw).toFixed(0)
  }, ` +
    `@genesis/lock ${mean(rates.lock).toFixed(0)}: ${
      (mean(rates.lock) / mean(rates.raw)).toFixed(2)
    }x; ` +
    `client CPU ms per hand-off: raw ${mean(cpus.raw).toFixed(2)}, @genesis/lock ${
      mean(cpus.lock).toFixed(2)
    }`,
);
