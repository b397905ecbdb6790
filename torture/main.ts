/**
 * The torture run: workers in separate Deno and Bun processes contend for one
 * lock and do a read-modify-write on a fenced resource, while faults are
 * injected on a schedule; then a verdict on what the resource logged.
 *
 *     deno task torture --backend etcd|redis|redlock --minutes 0.5
 *
 * Exits 0 only when there were no violations. Every server, proxy and worker
 * runs on 127.0.0.1 and is stopped at the end.
 *
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { Etcd3 } from "etcd3";
import { Redis } from "ioredis";
import { TcpProxy } from "../tests/_proxy.ts";
import { Child as Process, EtcdCluster, RedisServer } from "../tests/_servers.ts";
import { clock, Resource, type Section, type WorkerEvent } from "./resource.ts";

type BackendName = "etcd" | "redis" | "redlock";

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    backend: { type: "string", default: "etcd" },
    minutes: { type: "string", default: "1" },
    workers: { type: "string", default: "6" },
    ttl: { type: "string", default: "3000" },
    faults: { type: "string" }, // a comma-separated subset of the fault kinds, to chase one
    verbose: { type: "boolean" },
  },
});
const backend = values.backend as BackendName;
if (!["etcd", "redis", "redlock"].includes(backend)) {
  console.error(`torture: --backend takes etcd, redis or redlock, received ${values.backend}`);
  process.exit(64);
}
const minutes = Number(values.minutes);
const workerCount = Number(values.workers);
const ttl = Number(values.ttl);
if (!(minutes > 0) || !(workerCount >= 2) || !(ttl >= 1000)) {
  console.error("torture: --minutes > 0, --workers >= 2 and --ttl >= 1000 (ms)");
  process.exit(64);
}

const root = new URL("..", import.meta.url).pathname;
const bin = `${root}node_modules/.bin`;
const key = `/torture/${crypto.randomUUID().slice(0, 8)}`;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A fault injected once: what, when, against whom, and whether locks must survive it. */
interface Fault {
  kind: string;
  start: number;
  end: number;
  /** Signals sent or actions taken. */
  actions: number;
  /** The worker the fault was aimed at (paused, killed, cut off), if any. */
  target?: string;
  /** An outage shorter than the TTL: no other worker may lose its lock in it. */
  survivable: boolean;
}

/** The servers of one backend, with what the faults need of them. */
interface Cluster {
  /** Endpoints for every worker but w0. */
  endpoints: string[];
  /** Endpoints for w0, through proxies that can cut it off. */
  proxied: string[];
  proxies: TcpProxy[];
  faults: Record<string, () => Promise<Omit<Fault, "kind" | "start" | "end">>>;
  leftovers(): Promise<number>;
  stop(): Promise<void>;
}

const workers = new Map<string, Process>();

function spawnWorker(id: string, cluster: Cluster, resource: Resource): Process {
  const endpoints = (id === "w0" ? cluster.proxied : cluster.endpoints).join(",");
  const args = [id, backend === "redlock" ? "redis" : backend, endpoints, key, String(ttl)];
  args.push(String(resource.port));
  const script = `${root}torture/worker.ts`;
  // Deno and Bun take turns, so both runtimes' clients contend on one lock.
  const child = Number(id.slice(1)) % 2 === 0
    ? new Process(`${bin}/deno`, ["run", "--allow-all", script, ...args])
    : new Process(`${bin}/bun`, [script, ...args]);
  workers.set(id, child);
  return child;
}

/** Waits until some worker holds the lock, and names it. */
async function currentHolder(resource: Resource): Promise<string | undefined> {
  for (let i = 0; i < 100 && resource.holder === undefined; i++) await sleep(20);
  return resource.holder;
}

function holderFaults(resource: Resource, cluster: () => Cluster) {
  return {
    "pause holder past ttl": async () => {
      const target = await currentHolder(resource);
      const child = target && workers.get(target);
      if (!child) return { actions: 0, survivable: false };
      child.signal("SIGSTOP");
      await sleep(ttl * 1.5);
      child.signal("SIGCONT");
      return { actions: 2, target, survivable: false };
    },
    "kill holder": async () => {
      const target = await currentHolder(resource);
      const child = target && workers.get(target);
      if (!child) return { actions: 0, survivable: false };
      child.signal("SIGKILL");
      await child.exited;
      spawnWorker(target, cluster(), resource);
      await sleep(ttl);
      return { actions: 1, target, survivable: false };
    },
    "partition a client": async () => {
      // Cut w0 off while it holds the lock, if it comes to hold it soon.
      for (let i = 0; i < 150 && resource.holder !== "w0"; i++) await sleep(20);
      const proxies = cluster().proxies;
      for (const proxy of proxies) proxy.hold();
      await sleep(ttl * 1.5);
      for (const proxy of proxies) proxy.release();
      return { actions: 1, target: "w0", survivable: false };
    },
  };
}

async function etcdCluster(resource: Resource): Promise<Cluster> {
  const etcd = await EtcdCluster.start({ members: 3 });
  const proxies = await Promise.all(etcd.endpoints.map((e) => TcpProxy.start(e)));
  const probe = new Etcd3({ hosts: etcd.endpoints.map((e) => `http://${e}`) });
  const cluster: Cluster = {
    endpoints: etcd.endpoints,
    proxied: proxies.map((p) => p.endpoint),
    proxies,
    faults: {
      ...holderFaults(resource, () => cluster),
      "restart the leader": async () => {
        const leader = etcd.leader();
        await etcd.killMember(leader);
        await sleep(1_000);
        await etcd.startMember(leader);
        return { actions: 2, survivable: true };
      },
      "restart a follower": async () => {
        const follower = (etcd.leader() + 1) % 3;
        await etcd.killMember(follower);
        await sleep(1_000);
        await etcd.startMember(follower);
        return { actions: 2, survivable: true };
      },
    },
    leftovers: () => probe.getAll().prefix(`${key}/`).count(),
    async stop() {
      probe.close();
      await Promise.all(proxies.map((p) => p.close()));
      await etcd.stop();
    },
  };
  return cluster;
}

async function redisCluster(resource: Resource, count: number): Promise<Cluster> {
  // AOF with fsync on every write: a restart keeps the lock and its fencing counter.
  const args = ["--appendonly", "yes", "--appendfsync", "always"];
  const servers = await Promise.all(
    Array.from({ length: count }, () => RedisServer.start({ args })),
  );
  const proxies = await Promise.all(servers.map((s) => TcpProxy.start(s.endpoint)));
  const probes = servers.map((s) => new Redis({ host: "127.0.0.1", port: s.port }));
  const stall = async (server: RedisServer, ms: number) => {
    server.child?.signal("SIGSTOP");
    await sleep(ms);
    server.child?.signal("SIGCONT");
  };
  const faults: Cluster["faults"] = count === 1
    ? {
      "restart the server": async () => {
        await servers[0].shutdown();
        await sleep(300);
        await servers[0].restart();
        return { actions: 2, survivable: true };
      },
      "stall the server": async () => {
        await stall(servers[0], 1_000);
        return { actions: 2, survivable: true };
      },
      "kill subscriber connections": async () => {
        servers[0].cli(["CLIENT", "KILL", "TYPE", "pubsub"]);
        await sleep(500);
        return { actions: 1, survivable: true };
      },
    }
    : {
      "stop one instance": async () => {
        await stall(servers[Math.floor(Math.random() * count)], ttl * 2);
        return { actions: 2, survivable: true };
      },
    };
  const cluster: Cluster = {
    endpoints: servers.map((s) => s.endpoint),
    proxied: proxies.map((p) => p.endpoint),
    proxies,
    faults: { ...holderFaults(resource, () => cluster), ...faults },
    async leftovers() {
      const counts = await Promise.all(probes.map((p) => p.exists(`lock:{${key}}`)));
      return counts.reduce((a, b) => a + b, 0);
    },
    async stop() {
      for (const probe of probes) probe.disconnect();
      await Promise.all(proxies.map((p) => p.close()));
      await Promise.all(servers.map((s) => s.stop()));
    },
  };
  return cluster;
}

interface Row {
  runs: number;
  actions: number;
  acquisitions: number;
  stale: number;
  lost: number;
  /** lock() calls that failed (a timeout, an unreachable server): workers try again. */
  failed: number;
  violations: number;
}

/** Which fault window a time falls in (a window lasts until ttl after the fault ended). */
function windowOf(faults: Fault[], at: number): Fault | undefined {
  return faults.find((f) => at >= f.start && at <= f.end + ttl);
}

/** The verdict: every violation found, with the fault it happened under. */
function judge(resource: Resource, faults: Fault[], leftovers: number, exitCodes: number[]) {
  const violations: { at: number; what: string }[] = [];
  const accepted = resource.sections.filter((s) => s.accepted).sort((a, b) => a.enter - b.enter);
  for (let i = 1; i < accepted.length; i++) {
    const [before, after] = [accepted[i - 1], accepted[i]];
    if (after.enter < before.exit) {
      violations.push({
        at: after.enter,
        what: `critical sections overlap: ${before.worker} (token ${before.token}) and ` +
          `${after.worker} (token ${after.token})`,
      });
    }
  }
  if (resource.counter !== accepted.length) {
    violations.push({
      at: clock(),
      what: `the counter is ${resource.counter} after ${accepted.length} accepted writes`,
    });
  }
  const acquired = resource.events.filter((e) => e.kind === "acquired");
  for (const section of resource.sections.filter((s: Section) => !s.accepted)) {
    // A stale write is fencing at work, unless its worker still believed it held
    // the lock after a competitor had acquired it: the signal came too late.
    const competitor = acquired.find((e) =>
      e.worker !== section.worker && BigInt(e.detail) > section.token && e.at < section.checkedAt
    );
    if (competitor) {
      violations.push({
        at: section.checkedAt,
        what: `${section.worker} (token ${section.token}) still believed it held the lock after ` +
          `${competitor.worker} acquired it (token ${competitor.detail})`,
      });
    }
  }
  for (const event of resource.events) {
    if (event.kind === "unhandled") {
      violations.push({
        at: event.at,
        what: `unhandled rejection in ${event.worker}: ${event.detail}`,
      });
    }
    if (event.kind !== "lost") continue;
    const fault = windowOf(faults, event.at);
    if (fault?.survivable && fault.target !== event.worker) {
      violations.push({
        at: event.at,
        what: `${event.worker} lost its lock in an outage shorter than the TTL ` +
          `(${fault.kind}): ${event.detail}`,
      });
    }
  }
  if (leftovers > 0) {
    violations.push({
      at: clock(),
      what: `${leftovers} lock key(s) left on the server after the run`,
    });
  }
  exitCodes.forEach((code, i) => {
    if (code !== 0) violations.push({ at: clock(), what: `worker ${i} exited with ${code}` });
  });
  return violations;
}

function table(resource: Resource, faults: Fault[], violations: { at: number; what: string }[]) {
  const rows = new Map<string, Row>();
  const row = (kind: string) => {
    let r = rows.get(kind);
    if (!r) {
      rows.set(
        kind,
        r = { runs: 0, actions: 0, acquisitions: 0, stale: 0, lost: 0, failed: 0, violations: 0 },
      );
    }
    return r;
  };
  row("(no fault)");
  for (const fault of faults) {
    const r = row(fault.kind);
    r.runs++;
    r.actions += fault.actions;
  }
  const kindAt = (at: number) => windowOf(faults, at)?.kind ?? "(no fault)";
  const count = (events: WorkerEvent[], field: keyof Row) => {
    for (const e of events) row(kindAt(e.at))[field]++;
  };
  count(resource.events.filter((e) => e.kind === "acquired"), "acquisitions");
  count(resource.events.filter((e) => e.kind === "lost"), "lost");
  count(resource.events.filter((e) => e.kind === "error"), "failed");
  for (const s of resource.sections.filter((s) => !s.accepted)) row(kindAt(s.exit)).stale++;
  for (const v of violations) row(kindAt(v.at)).violations++;
  const total: Row = {
    runs: 0,
    actions: 0,
    acquisitions: 0,
    stale: 0,
    lost: 0,
    failed: 0,
    violations: 0,
  };
  for (const r of rows.values()) {
    for (const k of Object.keys(total) as (keyof Row)[]) total[k] += r[k];
  }
  const lines = [
    `| fault (${backend}) | runs | faults injected | acquisitions | stale writes rejected | locks lost | lock() calls failed | violations |`,
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const [kind, r] of [...rows, ["total", total] as const]) {
    lines.push(
      `| ${kind} | ${r.runs} | ${r.actions} | ${r.acquisitions} | ${r.stale} | ${r.lost} | ${r.failed} | ${r.violations} |`,
    );
  }
  return lines.join("\n");
}

async function main(): Promise<number> {
  const resource = new Resource();
  await resource.start();
  const cluster = backend === "etcd"
    ? await etcdCluster(resource)
    : await redisCluster(resource, backend === "redlock" ? 3 : 1);
  const faults: Fault[] = [];
  const started = clock();
  const deadline = started + minutes * 60_000;
  let exitCodes: number[] = [];
  try {
    for (let i = 0; i < workerCount; i++) spawnWorker(`w${i}`, cluster, resource);
    // The backend's own faults and the holder faults take turns.
    const theirs = Object.keys(holderFaults(resource, () => cluster));
    const own = Object.keys(cluster.faults).filter((k) => !theirs.includes(k));
    const chosen = values.faults?.split(",");
    const kinds = chosen ?? Array.from(
      { length: Math.max(own.length, theirs.length) * 2 },
      (_, i) => i % 2 === 0 ? theirs[(i / 2) % theirs.length] : own[((i - 1) / 2) % own.length],
    );
    // A progress line: rewritten in place on a terminal, every 10 s in a log.
    const tty = process.stderr.isTTY === true;
    const progress = setInterval(() => {
      const acquisitions = resource.events.filter((e) => e.kind === "acquired").length;
      const line = `torture ${backend}: ${((clock() - started) / 1000).toFixed(0)}/${
        (minutes * 60).toFixed(0)
      } s, ${acquisitions} acquisitions, ${faults.length} faults, counter ${resource.counter}`;
      process.stderr.write(tty ? `\r${line}   ` : `${line}\n`);
    }, tty ? 1_000 : 10_000);
    try {
      for (let i = 0; clock() < deadline; i++) {
        // Calm for longer than a TTL, so each fault's window (until ttl after it) is its own.
        await sleep(Math.min(ttl + 500, Math.max(0, deadline - clock())));
        if (clock() + ttl * 2.5 > deadline) break; // no fault that the run cannot see out
        const kind = kinds[i % kinds.length];
        const start = clock();
        const done = await cluster.faults[kind]();
        if (done.actions > 0) faults.push({ kind, start, end: clock(), ...done });
        if (values.verbose) {
          const next = resource.events.find((e) => e.kind === "acquired" && e.at > start);
          console.error(
            `\n${kind}: ${(clock() - start).toFixed(0)} ms; first acquisition after its start: ${
              next ? `${(next.at - start).toFixed(0)} ms` : "none yet"
            }`,
          );
        }
      }
      while (clock() < deadline) await sleep(100);
    } finally {
      clearInterval(progress);
      if (tty) process.stderr.write("\n");
    }
    // Stop the workers: each finishes its round, releases and closes.
    const children = [...workers.values()];
    for (const child of children) child.signal("SIGTERM");
    exitCodes = await Promise.all(children.map(async (child) => {
      const timer = setTimeout(() => child.signal("SIGKILL"), 15_000);
      const code = await child.exited;
      clearTimeout(timer);
      return code ?? -1;
    }));
    // A killed worker's key outlives it by its TTL.
    await sleep(ttl + 1_000);
    const leftovers = await cluster.leftovers();
    const violations = judge(resource, faults, leftovers, exitCodes);
    console.log(table(resource, faults, violations));
    const accepted = resource.sections.filter((s) => s.accepted).length;
    console.log(
      `counter ${resource.counter}, accepted writes ${accepted}, workers ${workerCount} ` +
        `(Deno and Bun), ttl ${ttl} ms, ${minutes} min`,
    );
    for (const v of violations.slice(0, 20)) console.log(`VIOLATION: ${v.what}`);
    if (values.verbose) {
      // What the workers' calls failed with, most frequent first.
      const errors = new Map<string, number>();
      for (const e of resource.events.filter((e) => e.kind === "error")) {
        const text = e.detail.replace(/"[^"]*"/g, '"…"').replace(/\d+(\.\d+)?/g, "N");
        errors.set(text, (errors.get(text) ?? 0) + 1);
      }
      for (const [text, n] of [...errors].sort((a, b) => b[1] - a[1]).slice(0, 10)) {
        console.log(`${n}x ${text}`);
      }
    }
    console.log(violations.length === 0 ? "0 violations" : `${violations.length} violations`);
    return violations.length === 0 ? 0 : 1;
  } finally {
    for (const child of workers.values()) await child.stop(1_000);
    await cluster.stop();
    await resource.close();
  }
}

process.exit(await main());
