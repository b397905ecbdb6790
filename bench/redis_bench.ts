// Redis: uncontended acquire + release, against the raw-client floor.
//
//   npx deno bench --allow-all bench/redis_bench.ts
//
// Starts its own redis-server (from PATH) on a free port. The baseline is the
// least a safe Redis lock does per acquisition: SET NX PX with a random token,
// then a compare-and-delete script.

import process from "node:process";
import { Redis } from "ioredis";
import { New } from "../mod.ts";
import { RedisServer } from "../tests/_servers.ts";

const server = await RedisServer.start();
globalThis.addEventListener("unload", () => {
  if (server.child) process.kill(server.child.pid, "SIGKILL");
});

const raw = new Redis({ host: "127.0.0.1", port: server.port });
const locker = New({ backend: "redis", endpoints: [server.endpoint] });
const COMPARE_AND_DELETE =
  "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

await (await locker.lock("/bench/ours")).release();
await raw.ping();

Deno.bench({
  name: "raw ioredis: SET NX PX + compare-and-delete EVAL",
  group: "uncontended acquire+release",
  baseline: true,
  async fn() {
    const token = crypto.randomUUID();
    if ((await raw.set("bench:raw", token, "PX", 10_000, "NX")) !== "OK") throw new Error("held");
    await raw.eval(COMPARE_AND_DELETE, 1, "bench:raw", token);
  },
});

Deno.bench({
  name: "@genesis/lock redis: lock() + release()",
  group: "uncontended acquire+release",
  async fn() {
    const lease = await locker.lock("/bench/ours");
    await lease.release();
  },
});
