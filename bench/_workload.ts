// What one benchmark child process does: it opens one contender, warms it
// up, runs one scenario's workers until the window closes, and writes what it
// measured (and, if asked, the server's counters around the window) to a
// JSON file for compare.ts. Runs under Deno and Bun alike.

import { readFileSync, writeFileSync } from "node:fs";
import process from "node:process";
import { Etcd3 } from "etcd3";
import { Cluster, Redis } from "ioredis";
import { type Locker, New } from "../mod.ts";
import { createRedisLocker } from "../backends/redis.ts";
import { type BenchBackend, type Held, keyOf, open } from "./_contenders.ts";

/** The scenarios, as compare.ts names them on the command line. */
export type Scenario = "single" | "keys64" | "one-key-8" | "procs" | "saturate" | "scale";

/** What the parent tells a child. */
export interface Job {
  backend: BenchBackend;
  contender: string;
  scenario: Scenario;
  /** `host:port`; for a Redis Cluster (scale run only), its masters, comma-separated. */
  endpoint: string;
  /** Window length, ms. */
  ms: number;
  /** The key (or key prefix) of this run, fresh per run. */
  run: string;
  /** Index of this process among the scenario's processes. */
  process: number;
  /** Workers in this process. */
  workers: number;
  /** Whether this process reads the server's counters around the window. */
  counters: boolean;
  /** Scale run: locks to hold, acquire+release cycles for the leak check, lockers for reuse. */
  scale?: { locks: number; cycles: number; lockers: number; ttl: number };
  /** Where to write the result. */
  out: string;
}

/** The server's counters that compare.ts turns into cost per cycle. */
export type Counters = Record<string, number>;

/** What a child writes. */
export interface Outcome {
  /** Cycles (acquire+release) completed inside the window, per worker. */
  perWorker: number[];
  /** Client CPU (user+system) of this process during the window, ms. */
  cpuMs: number;
  /** Contention scenarios: [acquiredAt, releaseStartedAt, waitMs, worker] per acquisition. */
  acquisitions?: number[];
  before?: Counters;
  after?: Counters;
  scale?: Record<string, number | string>;
}

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** A full GC where the runtime allows one (Deno with --expose-gc, Bun). */
function fullGc(): void {
  const bun = (globalThis as { Bun?: { gc(force: boolean): void } }).Bun;
  if (bun) return bun.gc(true);
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("No full GC: run Deno with --v8-flags=--expose-gc");
  gc();
  gc();
}

/** Heap samples (after a full GC) while the scale run's locks are held, besides the first. */
const HEAP_SAMPLES = 4;

async function heapAfterGc(): Promise<number> {
  // Let finalizers and pending callbacks run, then collect twice.
  await sleep(50);
  fullGc();
  await sleep(50);
  fullGc();
  return process.memoryUsage().heapUsed;
}

/** Reads the counters a cycle costs the server: its CPU, and its calls, commits and fsyncs. */
export async function readCounters(backend: BenchBackend, endpoint: string): Promise<Counters> {
  if (endpoint.includes(",")) {
    // A cluster: every node's counters summed, and each node's scripts apart.
    const nodes = endpoint.split(",");
    const each = await Promise.all(nodes.map((node) => readCounters(backend, node)));
    const sum: Counters = {};
    for (const [i, c] of each.entries()) {
      for (const [k, v] of Object.entries(c)) sum[k] = (sum[k] ?? 0) + v;
      sum[`scripts_node${i}`] = c.scripts;
    }
    return sum;
  }
  if (backend === "redis") {
    const [host, port] = endpoint.split(":");
    const redis = new Redis({ host, port: Number(port), lazyConnect: true });
    try {
      await redis.connect();
      return parseRedisInfo(await redis.info("all"));
    } finally {
      redis.disconnect();
    }
  }
  const response = await fetch(`http://${endpoint}/metrics`);
  return parseEtcdMetrics(await response.text());
}

function parseRedisInfo(info: string): Counters {
  const counters: Counters = {};
  for (const line of info.split("\r\n")) {
    const cpu = line.match(/^used_cpu_(sys|user):([\d.]+)/);
    if (cpu) counters[`cpu_${cpu[1]}`] = Number(cpu[2]);
    const cmd = line.match(/^cmdstat_(\w+):calls=(\d+),usec=(\d+)/);
    if (cmd) {
      counters[`calls_${cmd[1]}`] = Number(cmd[2]);
      counters[`usec_${cmd[1]}`] = Number(cmd[3]);
    }
  }
  counters.cpuSeconds = (counters.cpu_sys ?? 0) + (counters.cpu_user ?? 0);
  // Scripts, however they are sent; the commands inside them are counted apart.
  counters.scripts = (counters.calls_evalsha ?? 0) + (counters.calls_eval ?? 0) +
    (counters.calls_evalsha_ro ?? 0) + (counters.calls_eval_ro ?? 0) +
    (counters.calls_fcall ?? 0);
  return counters;
}

export function parseEtcdMetrics(text: string): Counters {
  const sum = (name: string, labels = "") => {
    let total = 0;
    for (const line of text.split("\n")) {
      if (!line.startsWith(name) || !line.includes(labels)) continue;
      const rest = line.slice(name.length);
      if (rest[0] !== " " && rest[0] !== "{") continue;
      total += Number(line.slice(line.lastIndexOf(" ") + 1));
    }
    return total;
  };
  return {
    cpuSeconds: sum("process_cpu_seconds_total"),
    commits: sum("etcd_server_proposals_committed_total"),
    walFsyncs: sum("etcd_disk_wal_fsync_duration_seconds_count"),
    backendCommits: sum("etcd_disk_backend_commit_duration_seconds_count"),
    keepaliveMessages: sum("grpc_server_msg_received_total", 'grpc_method="LeaseKeepAlive"'),
    keepaliveStreams: sum("grpc_server_started_total", 'grpc_method="LeaseKeepAlive"'),
    txns: sum("grpc_server_started_total", 'grpc_method="Txn"'),
    revokes: sum("grpc_server_started_total", 'grpc_method="LeaseRevoke"'),
  };
}

/** Established TCP connections the server at `endpoint` has (Linux /proc/net/tcp). */
function serverConnections(endpoint: string): number {
  const port = Number(endpoint.split(":")[1]).toString(16).toUpperCase().padStart(4, "0");
  let count = 0;
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (local?.endsWith(`:${port}`) && state === "01") count++;
    }
  }
  return count;
}

/**
 * Says READY on stdout, then reads the epoch ms at which the window opens
 * from stdin: the parent sends it once every process of the scenario is ready.
 */
function ready(): Promise<number> {
  return new Promise((resolve) => {
    let heard = "";
    process.stdin.on("data", (chunk) => {
      heard += String(chunk);
      if (heard.includes("\n")) {
        process.stdin.pause();
        resolve(Number(heard.trim()));
      }
    });
    process.stdout.write("READY\n");
  });
}

/** Runs `job` and writes its outcome. */
export async function runJob(job: Job): Promise<void> {
  const outcome = job.scenario === "scale" ? await runScale(job) : await runCycles(job);
  writeFileSync(job.out, JSON.stringify(outcome));
}

async function runCycles(job: Job): Promise<Outcome> {
  const c = await open(job.backend, job.contender, job.endpoint);
  const contended = job.scenario === "one-key-8" || job.scenario === "procs";
  const keyFor = (w: number) =>
    keyOf(job.contender, contended ? job.run : `${job.run}/${job.process}-${w}`);
  const workers = Array.from({ length: job.workers }, (_, w) => w);
  // Warm up: connect, and (ours on etcd) grant the session lease, before the window.
  for (const w of contended ? [0] : workers) await (await c.lock(keyFor(w))).release();
  const startAt = await ready();
  await sleep(startAt - now());
  const before = job.counters ? await readCounters(job.backend, job.endpoint) : undefined;
  const end = startAt + job.ms;
  const cpu = process.cpuUsage();
  const acquisitions: number[] = [];
  const perWorker = await Promise.all(workers.map(async (w) => {
    const key = keyFor(w);
    const id = job.process * job.workers + w;
    let count = 0;
    while (now() < end) {
      const asked = now();
      const held: Held = await c.lock(key);
      const acquired = now();
      if (acquired > end) {
        await held.release();
        break;
      }
      count++;
      if (contended) acquisitions.push(acquired, now(), acquired - asked, id);
      await held.release();
    }
    return count;
  }));
  const used = process.cpuUsage(cpu);
  const after = job.counters ? await readCounters(job.backend, job.endpoint) : undefined;
  await c.close();
  return {
    perWorker,
    cpuMs: (used.user + used.system) / 1000,
    acquisitions: contended ? acquisitions : undefined,
    before,
    after,
  };
}

/**
 * The scale run, for our locker: reuse (many lockers, one config), heap over
 * many cycles, heap and renewal traffic while many locks are held, and what
 * close() does with them.
 */
async function runScale(job: Job): Promise<Outcome> {
  const scale = job.scale!;
  const result: Record<string, number | string> = {};
  const options = { backend: job.backend, endpoints: [job.endpoint], ttl: scale.ttl };

  const nodes = job.endpoint.split(",");
  const cluster = nodes.length > 1
    ? new Cluster(nodes.map((n) => ({ host: n.split(":")[0], port: Number(n.split(":")[1]) })))
    : undefined;
  if (!cluster) {
    // Reuse: lockers with one config share one client, so one connection.
    // They take the default ttl: a thousand lockers starting at once on a
    // busy pinned core can take longer than the scale run's short lease to
    // acquire (their locks are then rightly lost), and what this counts is
    // connections, not renewals.
    const idle = serverConnections(job.endpoint);
    const reuse = { backend: job.backend, endpoints: [job.endpoint] };
    const lockers: Locker[] = Array.from({ length: scale.lockers }, () => New(reuse));
    await Promise.all(lockers.map(async (l, i) => {
      const lease = await l.tryLock(keyOf("ours", `${job.run}/reuse/${i}`));
      await lease?.release();
    }));
    result.lockers = scale.lockers;
    result.connectionsOpened = serverConnections(job.endpoint) - idle;
    await Promise.all(lockers.map((l) => l.close()));
  }

  // Heap over cycles: a full GC before and after; growth per cycle should be ~0.
  // On a cluster the locker is on a Cluster client of our own, as a user would pass it.
  const locker = cluster ? createRedisLocker(cluster, { ttl: scale.ttl }) : New(options);
  const cycleKey = keyOf("ours", `${job.run}/cycles`);
  await (await locker.lock(cycleKey)).release();
  const heap0 = await heapAfterGc();
  for (let i = 0; i < scale.cycles; i++) await (await locker.lock(cycleKey)).release();
  const heap1 = await heapAfterGc();
  result.cycles = scale.cycles;
  result.heapGrowthBytesPerCycle = (heap1 - heap0) / scale.cycles;

  // Hold many locks: heap per held lock, and renewal calls per pass.
  const prefix = `${job.run}/held/`;
  const keys = Array.from({ length: scale.locks }, (_, i) => keyOf("ours", `${prefix}${i}`));
  for (let i = 0; i < keys.length; i += 500) {
    await Promise.all(keys.slice(i, i + 500).map((key) => locker.lock(key)));
  }
  // Sampled while the locks are held, not once: a sample taken while a
  // renewal pass is in flight counts its commands too (a Cluster's ~5,000
  // scripts measured 3.5 KB per lock once in three runs, 1.5 KB otherwise).
  const heaps = [await heapAfterGc()];
  result.locks = scale.locks;
  await ready();
  const before = await readCounters(job.backend, job.endpoint);
  const from = now();
  for (let i = 1; i <= HEAP_SAMPLES; i++) {
    await sleep(Math.max(0, from + (job.ms * i) / (HEAP_SAMPLES + 1) - now()));
    heaps.push(await heapAfterGc());
  }
  await sleep(Math.max(0, from + job.ms - now()));
  const after = await readCounters(job.backend, job.endpoint);
  heaps.sort((a, b) => a - b);
  const median = heaps[heaps.length >> 1];
  result.heapSamples = heaps.length;
  result.heapBytesPerHeldLock = (median - heap1) / scale.locks;
  result.heapBytesPerHeldLockMax = (heaps[heaps.length - 1] - heap1) / scale.locks;
  result.heapMiBHeld = median / 2 ** 20;
  result.heldMs = now() - from;
  result.ttl = scale.ttl;

  // close() with every lock still held.
  const closing = await readCounters(job.backend, job.endpoint);
  const t0 = now();
  try {
    await locker.close();
    result.close = "resolved";
  } catch (error) {
    result.close = `rejected: ${(error as Error)?.name}: ${(error as Error)?.message}`.slice(
      0,
      200,
    );
  }
  result.closeMs = now() - t0;
  const closed = await readCounters(job.backend, job.endpoint);
  result.closeServerCalls = job.backend === "redis"
    ? closed.scripts - closing.scripts
    : closed.txns + closed.revokes - closing.txns - closing.revokes;
  result.keysLeftAfterClose = await countKeys(job, keyOf("ours", prefix));
  cluster?.disconnect();
  return { perWorker: [], cpuMs: 0, before, after, scale: result };
}

/** How many lock keys under `prefix` are still on the server. */
async function countKeys(job: Job, prefix: string): Promise<number> {
  if (job.backend === "redis" && job.endpoint.includes(",")) {
    let count = 0;
    for (const node of job.endpoint.split(",")) {
      count += await countKeys({ ...job, endpoint: node }, prefix);
    }
    return count;
  }
  if (job.backend === "redis") {
    const [host, port] = job.endpoint.split(":");
    const redis = new Redis({ host, port: Number(port) });
    let count = 0;
    let cursor = "0";
    do {
      // The lock key of NAME is lock:{NAME} (README); its fence key ends in :fence.
      const [next, found] = await redis.scan(cursor, "MATCH", `lock:{${prefix}*}`, "COUNT", 1000);
      cursor = next;
      count += found.length;
    } while (cursor !== "0");
    await redis.quit();
    return count;
  }
  const etcd = new Etcd3({ hosts: `http://${job.endpoint}` });
  const count = await etcd.getAll().prefix(prefix).count();
  etcd.close();
  return count;
}
