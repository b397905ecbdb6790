// Cross-process hand-offs per second on one key, 4 processes x 2 workers,
// through New() on one Redis and on a three-master Redis Cluster
// (mode: "cluster"), measured side by side in one run (single, cluster,
// single, cluster; the mean of each is reported).
//
//   npx deno run --allow-all bench/cluster_handoff.ts [seconds per round]
//
// Under the lock each worker increments a counter on a separate Redis (the
// same for both modes, so the work is the same); the final count proves no
// update was lost.

import process from "node:process";
import { Redis } from "ioredis";
import { New } from "../mod.ts";
import { RedisClusterServers, RedisServer, runScript } from "../tests/_servers.ts";

type Mode = "single" | "cluster";

async function worker(mode: Mode, endpoints: string[], counter: string, key: string, ms: number) {
  const [host, port] = counter.split(":");
  const store = new Redis({ host, port: Number(port) });
  const locker = New({ backend: "redis", mode, endpoints });
  let count = 0;
  const until = performance.now() + ms;
  while (performance.now() < until) {
    const lease = await locker.lock(key);
    await store.set(key, Number(await store.get(key)) + 1);
    await lease.release();
    count++;
  }
  await locker.close();
  store.disconnect();
  return count;
}

if (process.argv[2] === "worker") {
  const [, , , mode, endpoints, counter, key, ms] = process.argv;
  const counts = await Promise.all(
    [0, 1].map(() => worker(mode as Mode, endpoints.split(","), counter, key, Number(ms))),
  );
  console.log(`COUNT ${counts[0] + counts[1]}`);
  process.exit(0);
}

const seconds = Number(process.argv[2] ?? 5);
const [single, counter, cluster] = await Promise.all([
  RedisServer.start(),
  RedisServer.start(),
  RedisClusterServers.start(),
]);
const probe = new Redis({ host: "127.0.0.1", port: counter.port });
const script = new URL(import.meta.url).pathname;
const rates: Record<Mode, number[]> = { single: [], cluster: [] };
try {
  for (const mode of ["single", "cluster", "single", "cluster"] as const) {
    const endpoints = mode === "single"
      ? [single.endpoint]
      : cluster.servers.map((s) => s.endpoint);
    const key = `/bench/cluster-handoff/${crypto.randomUUID()}`;
    const children = [0, 1, 2, 3].map(() =>
      runScript(script, [
        "worker",
        mode,
        endpoints.join(","),
        counter.endpoint,
        key,
        String(seconds * 1000),
      ])
    );
    const counts = await Promise.all(children.map(async (child) => {
      const [, n] = await child.waitFor(/COUNT (\d+)/, seconds * 1000 + 30_000);
      await child.exited;
      return Number(n);
    }));
    const total = counts.reduce((a, b) => a + b, 0);
    const counted = Number(await probe.get(key));
    if (counted !== total) {
      throw new Error(`${mode}: ${total} hand-offs, but the counter says ${counted}`);
    }
    rates[mode].push(total / seconds);
    console.log(
      `${mode}: ${total} hand-offs in ${seconds} s (${(total / seconds).toFixed(0)}/s); ` +
        `counter ${counted}, no update lost`,
    );
  }
} finally {
  probe.disconnect();
  await Promise.all([single.stop(), counter.stop(), cluster.stop()]);
}
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
console.log(
  `\nRedis hand-offs/s, 4 processes x 2 workers, one key, through New(): one server ${
    mean(rates.single).toFixed(0)
  }, a three-master Cluster ${mean(rates.cluster).toFixed(0)}: ${
    (mean(rates.cluster) / mean(rates.single)).toFixed(2)
  }x`,
);
