// Redis: cross-process hand-offs per second on one key, 4 processes x 2
// workers, for @genesis/lock against the raw-client floor, measured side by
// side in one run.
//
//   npx deno run --allow-all bench/redis_handoff.ts [seconds per round]
//
// Raw floor: each worker retries SET NX PX in a tight loop (no sleep, no
// notification) and releases with a compare-and-delete script; the only
// faster hand-off is none at all. @genesis/lock: lock() (pub/sub wake-up,
// 100 ms fallback poll) and release(). Each worker holds the lock for an
// INCR of a shared counter, so every hand-off does real work under the lock.

import process from "node:process";
import { Redis } from "ioredis";
import { New } from "../mod.ts";
import { runScript } from "../tests/_servers.ts";

const COMPARE_AND_DELETE =
  "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

async function worker(mode: string, endpoint: string, key: string, ms: number): Promise<number> {
  const [host, port] = endpoint.split(":");
  const counter = new Redis({ host, port: Number(port) });
  let count = 0;
  const until = performance.now() + ms;
  if (mode === "raw") {
    const raw = new Redis({ host, port: Number(port) });
    while (performance.now() < until) {
      const token = crypto.randomUUID();
      if ((await raw.set(`raw:${key}`, token, "PX", 10_000, "NX")) !== "OK") continue;
      await counter.incr(`count:${key}`);
      await raw.eval(COMPARE_AND_DELETE, 1, `raw:${key}`, token);
      count++;
    }
    raw.disconnect();
  } else {
    const locker = New({ backend: "redis", endpoints: [endpoint] });
    while (performance.now() < until) {
      const lease = await locker.lock(key);
      await counter.incr(`count:${key}`);
      await lease.release();
      count++;
    }
    await locker.close();
  }
  counter.disconnect();
  return count;
}

if (process.argv[2] === "worker") {
  const [, , , mode, endpoint, key, ms] = process.argv;
  const cpu = process.cpuUsage();
  const counts = await Promise.all([0, 1].map(() => worker(mode, endpoint, key, Number(ms))));
  const used = process.cpuUsage(cpu);
  console.log(`COUNT ${counts[0] + counts[1]} CPU ${Math.round((used.user + used.system) / 1000)}`);
} else {
  const { RedisServer } = await import("../tests/_servers.ts");
  const server = await RedisServer.start();
  const probe = new Redis({ host: "127.0.0.1", port: server.port });
  const seconds = Number(process.argv[2] ?? 5);
  const script = new URL(import.meta.url).pathname;
  const rates: Record<string, number[]> = { raw: [], ours: [] };
  const commands: Record<string, number[]> = { raw: [], ours: [] };
  const cpus: Record<string, number[]> = { raw: [], ours: [] };
  const processed = async () =>
    Number((await probe.info("stats")).match(/total_commands_processed:(\d+)/)![1]);
  try {
    for (const mode of ["raw", "ours", "raw", "ours"]) {
      const key = `/bench/handoff/${crypto.randomUUID()}`;
      const before = await processed();
      const children = [0, 1, 2, 3].map(() =>
        runScript(script, ["worker", mode, server.endpoint, key, String(seconds * 1000)])
      );
      const results = await Promise.all(children.map(async (child) => {
        const [, n, cpu] = await child.waitFor(/COUNT (\d+) CPU (\d+)/, seconds * 1000 + 30_000);
        await child.exited;
        return { count: Number(n), cpu: Number(cpu) };
      }));
      const total = results.reduce((a, r) => a + r.count, 0);
      const cpu = results.reduce((a, r) => a + r.cpu, 0);
      const perHandoff = (await processed() - before) / total;
      commands[mode].push(perHandoff);
      cpus[mode].push(cpu / total);
      const counted = Number(await probe.get(`count:${key}`));
      if (counted !== total) {
        throw new Error(`${mode}: ${total} hand-offs but ${counted} increments`);
      }
      rates[mode].push(total / seconds);
      console.log(
        `${mode}: ${total} hand-offs in ${seconds} s (${(total / seconds).toFixed(0)}/s)`,
      );
    }
  } finally {
    probe.disconnect();
    await server.stop();
  }
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const raw = mean(rates.raw);
  const ours = mean(rates.ours);
  console.log(
    `\nhand-offs/s, 4 processes x 2 workers, one key: raw floor ${raw.toFixed(0)}, ` +
      `@genesis/lock ${ours.toFixed(0)}: ${(ours / raw).toFixed(2)}x the floor`,
  );
  console.log(
    `Redis commands per hand-off: raw ${mean(commands.raw).toFixed(1)}, ` +
      `@genesis/lock ${mean(commands.ours).toFixed(1)}; client CPU ms per hand-off: ` +
      `raw ${mean(cpus.raw).toFixed(2)}, @genesis/lock ${mean(cpus.ours).toFixed(2)}`,
  );
}
