// Redis: our locker, redis-semaphore and Redlock against the raw-client floor
// (SET NX PX, then the compare-and-delete script by SHA), in four groups:
// uncontended acquire+release, tryLock on a held key, 64 workers on 64 keys,
// 8 workers on one key.
//
//   npx deno task bench          # both backends
//   npx deno bench --allow-all bench/redis_bench.ts
//
// Starts its own redis-server (from PATH) on a free loopback port. For the
// side-by-side run with processes, Bun, hand-offs and scale, see compare.ts.

import { defineGroups, startServer } from "./_groups.ts";

await defineGroups("redis", await startServer("redis"));
