// etcd: our locker and npm etcd3's own Lock against the raw-client floor (a
// put-if-absent transaction on a lease granted beforehand, then a delete
// fenced by the put's revision), in four groups: uncontended acquire+release,
// tryLock on a held key, 64 workers on 64 keys, 8 workers on one key.
//
//   npx deno task bench          # both backends
//   npx deno bench --allow-all bench/etcd_bench.ts
//
// Starts its own etcd (from PATH) on a free loopback port. For the
// side-by-side run with processes, Bun, hand-offs and scale, see compare.ts.

import { defineGroups, startServer } from "./_groups.ts";

await defineGroups("etcd", await startServer("etcd"));
