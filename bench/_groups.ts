// The four `deno bench` groups every backend gets, each with the raw-client
// floor as its baseline, so every figure `deno bench` prints is a ratio
// measured in one run. Also the one-time set-up: a server of our own on a
// free loopback port, stopped when the bench process unloads.

import process from "node:process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EtcdCluster, RedisServer } from "../tests/_servers.ts";
import { type BenchBackend, CONTENDERS, keyOf, LABELS, open } from "./_contenders.ts";

/** Starts a server for `backend` and returns its endpoint; it dies with this process. */
export async function startServer(backend: BenchBackend): Promise<string> {
  if (backend === "redis") {
    const server = await RedisServer.start();
    globalThis.addEventListener("unload", () => {
      // unload allows no await: kill by PID at once, then drop the folder.
      if (server.child) process.kill(server.child.pid, "SIGKILL");
      rmSync(server.dir, { recursive: true, force: true });
    });
    return server.endpoint;
  }
  // The cluster's data folder is private to it: start it under a folder of
  // our own (tmpdir() reads TMPDIR), which unload can remove.
  const own = mkdtempSync(join(tmpdir(), "genesis-lock-bench-"));
  const before = process.env.TMPDIR;
  process.env.TMPDIR = own;
  const cluster = await EtcdCluster.start().finally(() => {
    if (before === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = before;
  });
  globalThis.addEventListener("unload", () => {
    for (const member of cluster.members) {
      if (member.child) process.kill(member.child.pid, "SIGKILL");
    }
    rmSync(own, { recursive: true, force: true });
  });
  return cluster.endpoints[0];
}

// BENCH_ITERATIONS=N runs each bench exactly N times (with no warm-up
// beyond that), for a smoke run on a busy machine; unset, deno bench decides.
const ITERATIONS = Number(process.env.BENCH_ITERATIONS) || undefined;

/** Registers the four groups for every contender of `backend`. */
export async function defineGroups(backend: BenchBackend, endpoint: string): Promise<void> {
  for (const name of CONTENDERS[backend]) {
    const c = await open(backend, name, endpoint);
    // A second instance holds the tryLock key, so the attempt goes to the
    // server and finds it taken (our lockers get a client of their own).
    const holder = await open(backend, name, endpoint, { dialTimeout: 4_999 });
    const own = keyOf(name, "uncontended");
    const held = keyOf(name, "held");
    const many = Array.from({ length: 64 }, (_, i) => keyOf(name, `many/${i}`));
    const one = keyOf(name, "one");
    await holder.lock(held);
    // Warm the connection (and our session lease) before measuring.
    await (await c.lock(own)).release();
    const baseline = name === "floor";
    const n = ITERATIONS;
    const label = `${backend} ${LABELS[name]}`;

    Deno.bench({
      name: label,
      group: `${backend}: uncontended acquire+release`,
      baseline,
      n,
      async fn() {
        await (await c.lock(own)).release();
      },
    });
    Deno.bench({
      name: label,
      group: `${backend}: tryLock on a held key`,
      baseline,
      n,
      async fn() {
        if (await c.tryLock(held)) throw new Error(`${label} took a held lock`);
      },
    });
    Deno.bench({
      name: label,
      group: `${backend}: 64 workers on 64 keys (one iteration = 64 cycles)`,
      baseline,
      n,
      async fn() {
        await Promise.all(many.map(async (key) => await (await c.lock(key)).release()));
      },
    });
    Deno.bench({
      name: label,
      group: `${backend}: 8 workers on one key (one iteration = 8 hand-offs)`,
      baseline,
      n,
      async fn() {
        await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map(async () => {
          await (await c.lock(one)).release();
        }));
      },
    });
  }
}
