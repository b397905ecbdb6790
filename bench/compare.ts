// The side-by-side comparison: @genesis/lock, its peers and the raw-client
// floors, on Redis and etcd, under Deno and Bun, in one process tree and one
// run. Writes BENCHMARKS.md and BENCHMARKS.svg.
//
//   npx deno task bench:compare                    # the full run (alone on the machine)
//   npx deno task bench:compare --seconds 1 --backend redis --runtimes deno --smoke
//   npx bun bench/compare.ts --help
//
// Every measurement runs in a child process of its own (one contender, one
// scenario, one runtime), so no contender inherits another's heap, timers or
// JIT state; the parent only starts the servers, pins, and reports.

import { spawn, spawnSync } from "node:child_process";
import { cpus, release, tmpdir, totalmem } from "node:os";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { EtcdCluster, RedisClusterServers, RedisServer } from "../tests/_servers.ts";
import { type BenchBackend, CONTENDERS, LABELS } from "./_contenders.ts";
import {
  type Counters,
  type Job,
  type Outcome,
  parseEtcdMetrics,
  runJob,
  type Scenario,
} from "./_workload.ts";

const HELP = `bench/compare.ts: @genesis/lock beside its peers and the raw-client floors

  --backend redis|etcd|all   backends to run (all)
  --runtimes deno,bun        runtimes the measuring processes use (deno,bun)
  --seconds N                window of each measurement (10)
  --scenarios LIST           single,keys64,one-key-8,procs,saturate,scale (all)
  --scale-locks N            locks held in the scale run (10000)
  --scale-seconds N          how long they are held (60)
  --scale-cycles N           acquire+release cycles of the heap-growth check (100000)
  --rounds N                 measure each contender N times, interleaved; report the median (1)
  --unpinned                 do not pin to one CPU (pinned with taskset -apc 0 when available)
  --smoke                    say at the top of BENCHMARKS.md that these are not measured figures
  --out FILE                 where to write the report (BENCHMARKS.md; the chart beside it)
`;

const root = new URL("..", import.meta.url).pathname;
const script = new URL(import.meta.url).pathname;

// A child: run one job and exit.
if (process.argv.includes("--job")) {
  const job = JSON.parse(readFileSync(process.argv[process.argv.indexOf("--job") + 1], "utf8"));
  await runJob(job as Job);
  process.exit(0);
}

interface Args {
  backends: BenchBackend[];
  runtimes: string[];
  seconds: number;
  scenarios: Scenario[];
  scaleLocks: number;
  scaleSeconds: number;
  scaleCycles: number;
  rounds: number;
  pinned: boolean;
  smoke: boolean;
  out: string;
}

function parseArgs(argv: string[]): Args {
  const value = (flag: string, fallback: string) => {
    const i = argv.indexOf(flag);
    return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1] : fallback;
  };
  const number = (flag: string, fallback: number) => {
    const n = Number(value(flag, String(fallback)));
    if (!(n > 0)) throw new RangeError(`${flag} must be a positive number: received "${n}"`);
    return n;
  };
  const backend = value("--backend", "all");
  if (!["redis", "etcd", "all"].includes(backend)) {
    throw new RangeError(`--backend must be redis, etcd or all: received "${backend}"`);
  }
  const runtimes = value("--runtimes", "deno,bun").split(",");
  for (const r of runtimes) {
    if (r !== "deno" && r !== "bun") throw new RangeError(`Unknown runtime "${r}"`);
  }
  const scenarios = value("--scenarios", "single,keys64,one-key-8,procs,saturate,scale").split(",");
  for (const s of scenarios) if (!(s in SCENARIOS)) throw new RangeError(`Unknown scenario "${s}"`);
  return {
    backends: backend === "all" ? ["redis", "etcd"] : [backend as BenchBackend],
    runtimes,
    seconds: number("--seconds", 10),
    scenarios: scenarios as Scenario[],
    scaleLocks: number("--scale-locks", 10_000),
    scaleSeconds: number("--scale-seconds", 60),
    scaleCycles: number("--scale-cycles", 100_000),
    rounds: Math.round(number("--rounds", 1)),
    pinned: !argv.includes("--unpinned"),
    smoke: argv.includes("--smoke"),
    out: value("--out", join(root, "BENCHMARKS.md")),
  };
}

/** Processes and workers per process of each scenario. */
const SCENARIOS: Record<Scenario, { title: string; processes: number; workers: number }> = {
  single: { title: "1 worker on 1 key (uncontended)", processes: 1, workers: 1 },
  keys64: { title: "64 workers on 64 keys, one process", processes: 1, workers: 64 },
  "one-key-8": { title: "8 workers on 1 key, one process", processes: 1, workers: 8 },
  procs: { title: "4 processes × 2 workers on 1 key", processes: 4, workers: 2 },
  saturate: {
    title: "4 processes × 64 workers on 256 keys (the server's capacity)",
    processes: 4,
    workers: 64,
  },
  scale: { title: "scale: many held locks", processes: 1, workers: 1 },
};

/** The command that runs a TypeScript file under `runtime`. */
function runtimeCommand(runtime: string): string[] {
  const running = (globalThis as { Bun?: unknown }).Bun ? "bun" : "deno";
  const binary = running === runtime ? process.execPath : join(root, "node_modules/.bin", runtime);
  // Deno exposes a full GC only with this flag; Bun has Bun.gc.
  return runtime === "deno"
    ? [binary, "run", "--allow-all", "--v8-flags=--expose-gc", script]
    : [binary, script];
}

/**
 * The reference row of the etcd tables: etcd's Go client and its
 * `concurrency.Mutex` (bench/go/mutex.go), built for this run, offline, in
 * GOPATH mode against Debian's golang-etcd-server-dev. Without Go or that
 * package the row is not measured, and the report and the progress output
 * say so.
 */
const GO_MUTEX = "go-mutex";
const GO_SOURCES = "/usr/share/gocode";
/** The scenarios the Go row runs in: every one where the peers run. */
const GO_SCENARIOS: Scenario[] = ["single", "keys64", "one-key-8", "procs"];
let goMutex: { binary?: string; note: string } = { note: "not asked for (no etcd scenario)" };

function buildGoMutex(dir: string): { binary?: string; note: string } {
  const install = "apt-get install golang-go golang-etcd-server-dev";
  const go = spawnSync("go", ["version"], { encoding: "utf8" });
  if (go.status !== 0) return { note: `not measured: no \`go\` on PATH (${install})` };
  if (!existsSync(join(GO_SOURCES, "src/go.etcd.io/etcd/clientv3/concurrency"))) {
    return { note: `not measured: no etcd Go client under ${GO_SOURCES} (${install})` };
  }
  const binary = join(dir, GO_MUTEX);
  const build = spawnSync("go", ["build", "-o", binary, join(root, "bench/go/mutex.go")], {
    encoding: "utf8",
    env: {
      ...process.env,
      GO111MODULE: "off",
      GOPATH: GO_SOURCES,
      GOCACHE: join(dir, "go-cache"),
      GOPROXY: "off",
    },
  });
  if (build.status !== 0) {
    return { note: `not measured: go build failed: ${(build.stderr || "").slice(0, 300)}` };
  }
  const client = spawnSync("dpkg-query", ["-W", "-f", "${Version}", "golang-etcd-server-dev"], {
    encoding: "utf8",
  });
  return {
    binary,
    note: `${go.stdout.trim().replace(/^go version /, "")}, etcd Go client ${
      client.status === 0 ? client.stdout.trim() : "(version unknown)"
    } (Debian golang-etcd-server-dev), built offline in GOPATH mode`,
  };
}

function version(command: string, args: string[]): string {
  const run = spawnSync(command, args, { encoding: "utf8" });
  return (run.stdout || run.stderr || "not found").split("\n")[0].trim();
}

function packageVersion(name: string): string {
  try {
    return JSON.parse(readFileSync(join(root, "node_modules", name, "package.json"), "utf8"))
      .version;
  } catch {
    return "not installed";
  }
}

/**
 * Whether a run is too short to quote: asked for, or under 10 s of
 * measurement per contender and scenario (the window times the rounds).
 */
function smoke(args: { smoke: boolean; seconds: number; rounds: number }): boolean {
  return args.smoke || args.seconds * args.rounds < 10;
}

/**
 * The CPU time the hypervisor gave other guests ("steal", /proc/stat) and
 * all CPU time, in ticks, of CPU 0 when pinned or of every CPU; undefined
 * where /proc/stat is not there. On a shared host, stolen time slows every
 * figure of a window alike, and runs with much of it are not comparable
 * with quiet ones.
 */
function cpuTicks(pinned: boolean): { steal: number; total: number } | undefined {
  try {
    const name = pinned ? "cpu0" : "cpu";
    const row = readFileSync("/proc/stat", "utf8").split("\n")
      .find((l) => l.startsWith(`${name} `));
    if (row === undefined) return undefined;
    const fields = row.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is in user).
    return { steal: fields[7] ?? 0, total: fields.slice(0, 8).reduce((a, b) => a + b, 0) };
  } catch {
    return undefined;
  }
}

/** The share of `to - from` that was stolen, in %. */
function stolenShare(
  from?: { steal: number; total: number },
  to?: { steal: number; total: number },
): number | undefined {
  if (from === undefined || to === undefined || to.total <= from.total) return undefined;
  return (100 * (to.steal - from.steal)) / (to.total - from.total);
}

/** Pins `pid` (every thread) to CPU 0, or to every CPU when unpinned; false without taskset. */
function pin(pid: number, pinned: boolean): boolean {
  const cpusList = pinned ? "0" : `0-${cpus().length - 1}`;
  const run = spawnSync("taskset", ["-apc", cpusList, String(pid)], { stdio: "ignore" });
  return run.status === 0;
}

let progressTotal = 0;
let progressDone = 0;
function progress(what: string): void {
  const line = `[${++progressDone}/${progressTotal}] ${what}`;
  if (process.stderr.isTTY) process.stderr.write(`\r\x1b[2K${line}`);
  else process.stderr.write(`${line}\n`);
}

/** Runs one process of a job and waits for its outcome file. */
async function child(
  runtime: string,
  job: Job,
  dir: string,
  start: Promise<number>,
  ready: () => void,
): Promise<Outcome> {
  const file = join(dir, `job-${job.process}-${crypto.randomUUID()}.json`);
  writeFileSync(file, JSON.stringify(job));
  const [command, ...args] = job.contender === GO_MUTEX
    ? [goMutex.binary!]
    : runtimeCommand(runtime);
  const proc = spawn(command, [...args, "--job", file], { stdio: ["pipe", "pipe", "pipe"] });
  let errors = "";
  proc.stderr?.on("data", (chunk) => errors = (errors + String(chunk)).slice(-4_000));
  const exited = new Promise<number | null>((resolve) => proc.on("exit", resolve));
  // The child says READY once warmed up (for the scale run: once its locks are
  // held, which on etcd takes minutes); the window opens when all are.
  const setUp = setTimeout(() => proc.kill("SIGKILL"), 20 * 60_000);
  let said = "";
  await new Promise<void>((resolve) => {
    proc.stdout?.on("data", (chunk) => {
      said += String(chunk);
      if (said.includes("READY")) resolve();
    });
    exited.then(() => resolve());
  });
  clearTimeout(setUp);
  ready();
  proc.stdin?.write(`${await start}\n`);
  proc.stdin?.end();
  // A stuck child must not stall an hour-long run: it gets its window plus two minutes.
  const timer = setTimeout(() => proc.kill("SIGKILL"), job.ms + 120_000);
  const code = await exited.finally(() => clearTimeout(timer));
  if (code !== 0) {
    throw new Error(`${runtime} ${job.contender} ${job.scenario} exited ${code}:\n${errors}`);
  }
  const outcome = JSON.parse(readFileSync(job.out, "utf8")) as Outcome & {
    metricsBefore?: string;
    metricsAfter?: string;
  };
  // The Go child hands over etcd's /metrics text as it read it.
  if (outcome.metricsBefore !== undefined) outcome.before = parseEtcdMetrics(outcome.metricsBefore);
  if (outcome.metricsAfter !== undefined) outcome.after = parseEtcdMetrics(outcome.metricsAfter);
  return outcome;
}

/** One measurement the run makes. */
interface Step {
  backend: BenchBackend;
  runtime: string;
  scenario: Scenario;
  contender: string;
  data: DataDir;
}

/** One measured row: a contender in a scenario under a runtime. */
interface Row {
  data?: DataDir;
  /** The headline figure of every round, ascending, when there were several. */
  rounds?: number[];
  backend: BenchBackend;
  runtime: string;
  scenario: Scenario;
  contender: string;
  rate: number;
  cpuUsPerCycle: number;
  perWorker: number[];
  server: Record<string, number>;
  handoffs?: {
    toOtherWorker: number;
    toOtherProcess: number;
    waitP50: number;
    waitP99: number;
    overlaps: number;
  };
  scale?: Record<string, number | string>;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

/** Server cost per cycle from the counters around the window. */
function serverCost(
  backend: BenchBackend,
  before?: Counters,
  after?: Counters,
  cycles = 1,
): Record<string, number> {
  if (!before || !after || cycles === 0) return {};
  const d = (k: string) => ((after[k] ?? 0) - (before[k] ?? 0)) / cycles;
  return backend === "redis"
    ? { cpuUs: d("cpuSeconds") * 1e6, scripts: d("scripts"), calls: d("calls_set") }
    : {
      cpuUs: d("cpuSeconds") * 1e6,
      commits: d("commits"),
      fsyncs: d("walFsyncs"),
      txns: d("txns"),
    };
}

async function measure(
  args: Args,
  backend: BenchBackend,
  endpoint: string,
  runtime: string,
  scenario: Scenario,
  contender: string,
  dir: string,
): Promise<Row> {
  const shape = SCENARIOS[scenario];
  const seconds = scenario === "scale" ? args.scaleSeconds : args.seconds;
  const run = `${scenario}/${crypto.randomUUID()}`;
  const jobs = Array.from({ length: shape.processes }, (_, i): Job => ({
    backend,
    contender,
    scenario,
    endpoint,
    ms: seconds * 1000,
    run,
    process: i,
    workers: shape.workers,
    counters: i === 0,
    scale: scenario === "scale"
      ? { locks: args.scaleLocks, cycles: args.scaleCycles, lockers: 1_000, ttl: 3_000 }
      : undefined,
    out: join(dir, `out-${i}-${crypto.randomUUID()}.json`),
  }));
  // Every process warms up, then all start together, 100 ms after the last is ready.
  let open = (_: number) => {};
  const start = new Promise<number>((resolve) => open = resolve);
  let waiting = jobs.length;
  const ready = () => {
    if (--waiting === 0) open(performance.timeOrigin + performance.now() + 100);
  };
  const outcomes = await Promise.all(jobs.map((job) => child(runtime, job, dir, start, ready)));
  const perWorker = outcomes.flatMap((o) => o.perWorker);
  const cycles = perWorker.reduce((a, b) => a + b, 0);
  const cpuMs = outcomes.reduce((a, o) => a + o.cpuMs, 0);
  const row: Row = {
    backend,
    runtime,
    scenario,
    contender,
    rate: cycles / seconds,
    cpuUsPerCycle: cycles ? (cpuMs * 1000) / cycles : NaN,
    perWorker,
    server: serverCost(backend, outcomes[0].before, outcomes[0].after, cycles),
    scale: outcomes[0].scale,
  };
  if (scenario === "scale") {
    const before = outcomes[0].before!, after = outcomes[0].after!;
    const s = row.scale!;
    const heldSeconds = Number(s.heldMs) / 1000;
    // A pass is one renewal interval, ttl / 3.
    const passes = heldSeconds / (Number(s.ttl) / 3000);
    const renewals = backend === "redis"
      ? after.scripts - before.scripts
      : after.keepaliveMessages - before.keepaliveMessages;
    s.renewalCallsPerPass = renewals / passes;
    const perNode = Object.keys(after).filter((k) => k.startsWith("scripts_node"));
    if (perNode.length > 0) {
      s.nodes = perNode.length;
      s.renewalCallsPerNodePerPassMax = Math.max(...perNode.map((k) => after[k] - before[k])) /
        passes;
    }
    s.renewalCallsPerLockPerSecond = renewals / heldSeconds / Number(s.locks);
    if (backend === "etcd") {
      s.keepaliveStreamsOpened = after.keepaliveStreams - before.keepaliveStreams;
    }
    s.serverCpuPercentWhileHeld = ((after.cpuSeconds - before.cpuSeconds) / heldSeconds) * 100;
  }
  if (scenario === "one-key-8" || scenario === "procs") {
    const records: number[][] = [];
    for (const o of outcomes) {
      const a = o.acquisitions ?? [];
      for (let i = 0; i < a.length; i += 4) records.push(a.slice(i, i + 4));
    }
    records.sort((x, y) => x[0] - y[0]);
    let toOtherWorker = 0, toOtherProcess = 0, overlaps = 0;
    for (let i = 1; i < records.length; i++) {
      const [acquired, , , worker] = records[i];
      const [, releasing, , previous] = records[i - 1];
      if (worker !== previous) toOtherWorker++;
      if (Math.floor(worker / shape.workers) !== Math.floor(previous / shape.workers)) {
        toOtherProcess++;
      }
      // The next holder must come after the previous one began to let go.
      if (acquired < releasing) overlaps++;
    }
    const waits = records.map((r) => r[2]).sort((a, b) => a - b);
    const n = Math.max(1, records.length - 1);
    row.handoffs = {
      toOtherWorker: toOtherWorker / n,
      toOtherProcess: toOtherProcess / n,
      waitP50: quantile(waits, 0.5),
      waitP99: quantile(waits, 0.99),
      overlaps,
    };
  }
  return row;
}

/**
 * Which server a step runs on: the default one (etcd's data on the temporary
 * folder's disk), etcd with its data on tmpfs (/dev/shm), or a Redis Cluster
 * of three masters.
 */
type DataDir = "disk" | "tmpfs" | "cluster";

async function startServer(
  backend: BenchBackend,
  pinned: boolean,
  taskset: boolean,
  data: DataDir,
) {
  if (backend === "redis" && data === "cluster") {
    const cluster = await RedisClusterServers.start();
    for (const s of cluster.servers) if (taskset && s.child) pin(s.child.pid, pinned);
    return {
      endpoint: cluster.servers.map((s) => s.endpoint).join(","),
      version: version("redis-server", ["--version"]),
      stop: () => cluster.stop(),
    };
  }
  if (backend === "redis") {
    const server = await RedisServer.start();
    if (taskset) pin(server.child!.pid, pinned);
    return {
      endpoint: server.endpoint,
      version: version("redis-server", ["--version"]),
      stop: () => server.stop(),
    };
  }
  // The cluster makes its data folder under tmpdir(), which reads TMPDIR.
  const before = process.env.TMPDIR;
  if (data === "tmpfs") process.env.TMPDIR = "/dev/shm";
  const cluster = await EtcdCluster.start().finally(() => {
    if (before === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = before;
  });
  for (const m of cluster.members) if (taskset && m.child) pin(m.child.pid, pinned);
  return {
    endpoint: cluster.endpoints[0],
    version: version("etcd", ["--version"]),
    stop: () => cluster.stop(),
  };
}

async function main(): Promise<void> {
  const args = (() => {
    if (process.argv.includes("--help")) {
      console.log(HELP);
      process.exit(0);
    }
    return parseArgs(process.argv.slice(2));
  })();

  const taskset = spawnSync("taskset", ["--version"], { stdio: "ignore" }).status === 0;
  let pinning = "taskset is not available: nothing is pinned";
  if (taskset) {
    pin(process.pid, args.pinned);
    pinning = args.pinned
      ? "pinned: this process, its children and the servers run on CPU 0 (taskset -apc 0)"
      : `unpinned (--unpinned): every process may use CPUs 0-${cpus().length - 1}`;
  }
  console.error(pinning);

  const dir = mkdtempSync(join(tmpdir(), "genesis-lock-compare-"));
  if (args.backends.includes("etcd")) {
    goMutex = buildGoMutex(dir);
    console.error(`Go concurrency.Mutex reference row: ${goMutex.note}`);
  }
  const plan: Step[] = [];
  for (const backend of args.backends) {
    for (const runtime of args.runtimes) {
      for (const scenario of args.scenarios) {
        // Scale is about our locker; saturation about the server, which the floor bounds.
        const names: readonly string[] = scenario === "scale"
          ? ["ours"]
          : scenario === "saturate"
          ? ["floor", "ours"]
          : backend === "etcd" && goMutex.binary && GO_SCENARIOS.includes(scenario)
          ? [...CONTENDERS[backend], GO_MUTEX]
          : CONTENDERS[backend];
        // Rounds interleave the contenders, so a drift in the machine hits them all alike.
        const rounds = scenario === "scale" ? 1 : args.rounds;
        for (let round = 0; round < rounds; round++) {
          for (const contender of names) {
            plan.push({ backend, runtime, scenario, contender, data: "disk" });
          }
        }
      }
    }
  }
  // Renewal batching on a Redis Cluster: one round trip per node per pass is the target.
  if (args.backends.includes("redis") && args.scenarios.includes("scale")) {
    plan.push({
      backend: "redis",
      runtime: args.runtimes[0],
      scenario: "scale",
      contender: "ours",
      data: "cluster",
    });
  }
  // For the capacity model: etcd's cost per cycle again with its data on tmpfs.
  if (args.backends.includes("etcd") && existsSync("/dev/shm")) {
    const uncontended: Scenario[] = ["single", "keys64", "saturate"];
    for (const scenario of args.scenarios.filter((s) => uncontended.includes(s))) {
      for (const contender of ["floor", "ours"]) {
        plan.push({
          backend: "etcd",
          runtime: args.runtimes[0],
          scenario,
          contender,
          data: "tmpfs",
        });
      }
    }
  }
  progressTotal = plan.length;

  const runTicks = cpuTicks(args.pinned);
  const stepSteal: number[] = [];
  const rows: Row[] = [];
  const failures: string[] = [];
  const serverVersions: Record<string, string> = {};
  try {
    const servers = [...new Set(plan.map((p) => `${p.backend}/${p.data}`))];
    for (const which of servers) {
      const [backend, data] = which.split("/") as [BenchBackend, DataDir];
      const server = await startServer(backend, args.pinned, taskset, data);
      serverVersions[backend] = server.version;
      try {
        for (const step of plan.filter((p) => `${p.backend}/${p.data}` === which)) {
          progress(
            `${step.backend}${data === "disk" ? "" : ` (${data})`} ${step.runtime} ` +
              `${step.scenario}: ${LABELS[step.contender]}`,
          );
          const stepTicks = cpuTicks(args.pinned);
          try {
            const row = await measure(
              args,
              backend,
              server.endpoint,
              step.runtime,
              step.scenario,
              step.contender,
              dir,
            );
            rows.push({ ...row, data });
            const stolen = stolenShare(stepTicks, cpuTicks(args.pinned));
            if (stolen !== undefined) stepSteal.push(stolen);
          } catch (error) {
            // One failed measurement is reported, and the run goes on.
            const message = String((error as Error)?.message ?? error).slice(0, 1_000);
            console.error(`\n${message}`);
            failures.push(
              `${which} ${step.runtime} ${step.scenario} ${step.contender}: ${message}`,
            );
          }
        }
      } finally {
        await server.stop();
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  if (process.stderr.isTTY) process.stderr.write("\n");

  const stolen = stolenShare(runTicks, cpuTicks(args.pinned));
  const steal = stolen === undefined
    ? "not known (no /proc/stat)"
    : `${fmt(stolen, 1)} % of ${args.pinned ? "CPU 0's" : "the CPUs'"} time over the run` +
      (stepSteal.length === 0 ? " " : `, ${fmt(Math.min(...stepSteal), 1)}–` +
        `${fmt(Math.max(...stepSteal), 1)} % per measurement `) +
      "(/proc/stat `steal`: time the host gave other guests; it slows every figure of a window " +
      "alike, so compare rows of one run, not runs)";
  const report = renderReport(args, medians(rows), serverVersions, pinning, failures, steal);
  const svg = args.out.replace(/\.md$/, "") + ".svg";
  writeFileSync(args.out, report.markdown);
  writeFileSync(svg, report.svg);
  // The repository's `deno fmt --check` covers Markdown and SVG: write them formatted.
  spawnSync(runtimeCommand("deno")[0], ["fmt", "--quiet", args.out, svg], { stdio: "ignore" });
  console.log(report.markdown);
  console.error(`wrote ${args.out} and its chart`);
}

// ---------------------------------------------------------------------------
// The report.

/** One row per measurement, the median of its rounds, with every round's figure kept. */
function medians(rows: Row[]): Row[] {
  const groups = new Map<string, Row[]>();
  for (const r of rows) {
    const key = [r.backend, r.data, r.runtime, r.scenario, r.contender].join("/");
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  return [...groups.values()].map((group) => {
    const sorted = [...group].sort((a, b) => headline(a) - headline(b));
    const median = sorted[Math.floor((sorted.length - 1) / 2)];
    return { ...median, rounds: sorted.map(headline) };
  });
}

/**
 * The figure a row is compared by: cycles/s, or under contention hand-offs/s
 * (acquisitions that went to another worker; across processes, to another
 * process), since a lock that lets one worker take it again and again hands
 * nothing off.
 */
function headline(r?: Row): number {
  if (!r) return NaN;
  if (!r.handoffs) return r.rate;
  const share = r.scenario === "procs" ? r.handoffs.toOtherProcess : r.handoffs.toOtherWorker;
  return r.rate * share;
}

function fmt(n: number, digits = 0): string {
  if (!Number.isFinite(n)) return "–";
  return n.toLocaleString("en-US", {
    maximumFractionDigits: digits,
    minimumFractionDigits: digits,
  });
}

function renderReport(
  args: Args,
  rows: Row[],
  serverVersions: Record<string, string>,
  pinning: string,
  failures: string[],
  steal: string,
): { markdown: string; svg: string } {
  const out: string[] = [];
  const line = (s = "") => out.push(s);
  line("# Benchmarks");
  line();
  if (smoke(args)) {
    line("> **SMOKE RUN: these are not measured figures.** This file was written by a short");
    line(
      `> run (${args.seconds} s per scenario, ${args.rounds} round${
        args.rounds === 1 ? "" : "s"
      }) on a shared, busy machine, to check the harness.`,
    );
    line("> Rerun `deno task bench:compare` alone on the machine for figures to quote.");
    line();
  }
  line(
    "Written by `bench/compare.ts` (`deno task bench:compare`). Every figure below comes from " +
      "one run: the same servers, the same machine, the contenders one after another, each in a " +
      "child process of its own.",
  );
  line();
  line(`- Date: ${new Date().toISOString()}`);
  line(`- Command: \`${["compare.ts", ...process.argv.slice(2)].join(" ")}\``);
  line(`- CPU: ${pinning}`);
  line(`- CPU stolen by the hypervisor: ${steal}`);
  line(
    `- Machine: ${cpus().length} × ${cpus()[0]?.model ?? "unknown CPU"}, ` +
      `${fmt(totalmem() / 2 ** 30, 1)} GiB, Linux ${release()}`,
  );
  line(
    `- Runtimes: ${version(runtimeCommand("deno")[0], ["--version"])}; ` +
      `Bun ${version(runtimeCommand("bun")[0], ["--version"])}`,
  );
  line(`- Servers: ${Object.values(serverVersions).join("; ")}`);
  if (args.backends.includes("etcd")) line(`- Go reference row (etcd): ${goMutex.note}`);
  line(
    `- Clients: ioredis ${packageVersion("ioredis")}, etcd3 ${packageVersion("etcd3")}, ` +
      `redis-semaphore ${packageVersion("redis-semaphore")}, @sesamecare-oss/redlock ` +
      `${packageVersion("@sesamecare-oss/redlock")}`,
  );
  line(
    `- Window: ${args.seconds} s per measurement; scale run ${args.scaleSeconds} s; ` +
      (args.rounds > 1
        ? `${args.rounds} rounds, contenders interleaved, each row the median round`
        : "one round"),
  );
  line();
  line("## How to reproduce");
  line();
  line("```sh");
  line("npm ci                                  # pinned Deno and Bun, the clients and the peers");
  line("apt-get install etcd-server etcd-client redis-server   # the servers, from PATH");
  line("apt-get install golang-go golang-etcd-server-dev       # the Go reference row (optional)");
  line("npx deno task bench:compare             # everything, pinned to CPU 0; about an hour");
  line("npx deno task bench:compare --unpinned --out BENCHMARKS-unpinned.md   # every CPU");
  line("npx deno task bench:compare --rounds 3  # each row the median of 3 interleaved rounds");
  line("npx deno task bench:compare --backend redis --runtimes bun --seconds 2 --smoke");
  line("npx deno task bench                     # the deno bench groups, floor as baseline");
  line("```");
  line();
  line("Run it alone on the machine: anything else running moves every figure.");
  line();

  for (const backend of args.backends) {
    for (const runtime of args.runtimes) {
      const mine = rows.filter((r) =>
        r.backend === backend && r.runtime === runtime && r.data === "disk"
      );
      if (mine.length === 0) continue;
      line(`## ${backend === "redis" ? "Redis" : "etcd"}, ${runtime === "deno" ? "Deno" : "Bun"}`);
      line();
      for (const scenario of args.scenarios.filter((s) => s !== "scale")) {
        const group = mine.filter((r) => r.scenario === scenario);
        if (group.length === 0) continue;
        line(`### ${SCENARIOS[scenario].title}`);
        line();
        const contended = scenario === "one-key-8" || scenario === "procs";
        const floor = headline(group.find((r) => r.contender === "floor"));
        const ours = headline(group.find((r) => r.contender === "ours"));
        const serverCols = backend === "redis"
          ? ["server CPU µs/cycle", "scripts/cycle"]
          : ["server CPU µs/cycle", "commits/cycle", "fsyncs/cycle"];
        const head = contended
          ? ["", "acquisitions/s", "hand-offs/s", "× floor", "ours ÷ it"]
          : ["", "cycles/s", "× floor", "ours ÷ it"];
        if (args.rounds > 1) head.push("rounds min–max");
        head.push("client CPU µs/cycle", ...serverCols);
        if (contended) {
          head.push("to other worker", "to other process", "wait p50 / p99 ms");
          head.push("per worker min–max", "max/min", "overlaps");
        }
        line(`| ${head.join(" | ")} |`);
        line(`| --- | ${head.slice(1).map(() => "---:").join(" | ")} |`);
        for (const r of group) {
          const cells = [LABELS[r.contender], fmt(r.rate)];
          if (contended) cells.push(fmt(headline(r)));
          cells.push(
            fmt(headline(r) / floor, 2),
            r.contender === "ours" ? "" : fmt(ours / headline(r), 2),
          );
          if (args.rounds > 1) {
            const all = r.rounds ?? [];
            cells.push(`${fmt(all[0] ?? NaN)}–${fmt(all[all.length - 1] ?? NaN)}`);
          }
          cells.push(
            fmt(r.cpuUsPerCycle),
            fmt(r.server.cpuUs ?? NaN),
          );
          if (backend === "redis") cells.push(fmt(r.server.scripts ?? NaN, 2));
          else cells.push(fmt(r.server.commits ?? NaN, 2), fmt(r.server.fsyncs ?? NaN, 2));
          if (contended && r.handoffs) {
            const min = Math.min(...r.perWorker), max = Math.max(...r.perWorker);
            cells.push(
              `${fmt(r.handoffs.toOtherWorker * 100)} %`,
              scenario === "procs" ? `${fmt(r.handoffs.toOtherProcess * 100)} %` : "–",
              `${fmt(r.handoffs.waitP50, 1)} / ${fmt(r.handoffs.waitP99, 1)}`,
              `${fmt(min)}–${fmt(max)}`,
              min === 0 ? "∞" : fmt(max / min, 2),
              String(r.handoffs.overlaps),
            );
          }
          line(`| ${cells.join(" | ")} |`);
        }
        line();
      }
      const scale = mine.find((r) => r.scenario === "scale")?.scale;
      if (scale) {
        line(`### Scale: @genesis/lock holding ${fmt(Number(scale.locks))} locks`);
        line();
        out.push(...scaleTable(backend, scale));
      }
    }
  }
  for (const r of rows.filter((r) => r.data === "cluster" && r.scale)) {
    line(`## Scale on a Redis Cluster of three masters (${r.runtime === "deno" ? "Deno" : "Bun"})`);
    line();
    line(
      `@genesis/lock on an ioredis \`Cluster\` (\`createRedisLocker\`), holding ` +
        `${fmt(Number(r.scale!.locks))} locks spread over the slots; the target is at most one ` +
        "round trip per node per renewal pass.",
    );
    line();
    out.push(...scaleTable("redis", r.scale!));
  }
  if (failures.length > 0) {
    line("## Measurements that failed");
    line();
    for (const f of failures) line(`- ${f.replace(/\s+/g, " ")}`);
    line();
  }
  line(capacityModel(rows));
  line(BOUNDS);
  return { markdown: out.join("\n"), svg: chart(rows, args) };
}

/** The scale run's figures, as Markdown table lines. */
function scaleTable(backend: BenchBackend, scale: Record<string, number | string>): string[] {
  const out = ["| measure | value |", "| --- | ---: |"];
  const rowOf = (name: string, value: string) => out.push(`| ${name} | ${value} |`);
  if (scale.lockers !== undefined) {
    rowOf(
      `server connections for ${fmt(Number(scale.lockers))} \`New()\` with one config`,
      fmt(Number(scale.connectionsOpened)),
    );
  }
  rowOf(
    `heap growth per cycle over ${fmt(Number(scale.cycles))} cycles (after a full GC)`,
    `${fmt(Number(scale.heapGrowthBytesPerCycle), 2)} B`,
  );
  rowOf(
    `heap per held lock (after a full GC; median of ${fmt(Number(scale.heapSamples))} samples)`,
    `${fmt(Number(scale.heapBytesPerHeldLock))} B`,
  );
  rowOf("heap per held lock, largest sample", `${fmt(Number(scale.heapBytesPerHeldLockMax))} B`);
  rowOf("heap with every lock held", `${fmt(Number(scale.heapMiBHeld), 1)} MiB`);
  rowOf(
    `renewal ${backend === "redis" ? "script calls" : "keepalive messages"} per pass ` +
      `(ttl ${fmt(Number(scale.ttl))} ms, a pass every ttl/3)`,
    fmt(Number(scale.renewalCallsPerPass), 1),
  );
  if (scale.nodes !== undefined) {
    rowOf(
      `renewal script calls per pass on the busiest of ${scale.nodes} nodes`,
      fmt(Number(scale.renewalCallsPerNodePerPassMax), 1),
    );
  }
  rowOf(
    "renewal calls per held lock per second",
    fmt(Number(scale.renewalCallsPerLockPerSecond), 3),
  );
  if (backend === "etcd") {
    rowOf("keepalive streams opened while held", fmt(Number(scale.keepaliveStreamsOpened)));
  }
  rowOf("server CPU while held", `${fmt(Number(scale.serverCpuPercentWhileHeld), 1)} %`);
  rowOf("`close()`", String(scale.close));
  rowOf("`close()` took", `${fmt(Number(scale.closeMs))} ms`);
  rowOf(
    `server calls during \`close()\` (${backend === "redis" ? "scripts" : "txns + revokes"})`,
    fmt(Number(scale.closeServerCalls)),
  );
  rowOf("lock keys left on the server after `close()`", fmt(Number(scale.keysLeftAfterClose)));
  out.push("");
  return out;
}

function capacityModel(rows: Row[]): string {
  const out: string[] = ["## Capacity model", ""];
  out.push(
    "What one acquire+release costs the server, from the server's own counters around the " +
      "window (Redis `INFO` `used_cpu_*` and `commandstats`; etcd `/metrics`: " +
      "`process_cpu_seconds_total`, `etcd_server_proposals_committed_total`, " +
      "`etcd_disk_wal_fsync_duration_seconds_count`), in the uncontended and 64-key scenarios. " +
      "The CPU ceiling is what one core of server CPU could serve if clients were not the " +
      "bottleneck (many client processes): 1,000,000 / (server CPU µs per cycle). Redis runs " +
      "commands on one thread, so that is one primary's ceiling (its I/O threads aside); a Redis " +
      "Cluster multiplies it by its masters as long as locks spread over slots (the keys of one " +
      "lock share one hash tag, so one lock lives on one master). etcd uses every core, but every " +
      "member applies every commit, so adding members adds no capacity: a cluster's ceiling is " +
      "the per-core figure times the cores of its slowest member, or its disk's, whichever is " +
      "lower (below). Measured on one pinned core with the client beside it, the per-cycle cost " +
      "includes serving a client that is often busy; treat the ceilings as an order of magnitude.",
    "",
  );
  out.push(
    "| backend | data | runtime | scenario | contender | cycles/s | server CPU busy | " +
      "server CPU µs/cycle | CPU ceiling cycles/s | per cycle |",
  );
  out.push("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |");
  for (const r of rows) {
    if (!["single", "keys64", "saturate"].includes(r.scenario)) continue;
    if (r.contender !== "floor" && r.contender !== "ours") continue;
    const cpu = r.server.cpuUs ?? NaN;
    const per = r.backend === "redis"
      ? `${fmt(r.server.scripts ?? NaN, 2)} scripts`
      : `${fmt(r.server.commits ?? NaN, 2)} commits, ${fmt(r.server.fsyncs ?? NaN, 2)} fsyncs`;
    out.push(
      `| ${r.backend} | ${r.backend === "etcd" ? r.data : "memory"} | ${r.runtime} | ` +
        `${r.scenario} | ${LABELS[r.contender]} | ${fmt(r.rate)} | ` +
        `${fmt((cpu * r.rate) / 1e4)} % | ${fmt(cpu)} | ` +
        `${fmt(1e6 / cpu)} | ${per} |`,
    );
  }
  out.push("");
  if (!rows.some((r) => r.backend === "etcd")) return out.join("\n");
  out.push(
    "etcd runs twice: with its data dir on the temporary folder's disk (every table above) and " +
      "on tmpfs (`/dev/shm`, where an fsync costs almost nothing). The difference between the " +
      "two rows is what the disk costs. The CPU ceiling counts CPU only: on a disk whose fsync " +
      "takes longer than the CPU a batch of commits costs, the disk bounds the cluster first, " +
      "and one cluster serves about (commits the disk can fsync per second × commits per fsync) " +
      "÷ commits per cycle. A Redis primary keeps no fsync on this path (no AOF here); with " +
      "`appendfsync always`, which the fencing counter needs to survive a crash, each write " +
      "costs an fsync too.",
    "",
  );
  return out.join("\n");
}

const BOUNDS = `## What bounds each figure

- **cycles/s**: cycles (acquire, then release) completed inside the window, over the window. On
  one pinned CPU the client, the server and the kernel share one core, so a cycle's client CPU
  counts against the rate; unpinned, the rate is closer to the round-trip latency.
- **× floor**: the rate over the raw-client floor's, in the same scenario and run. The Redis floor
  is \`SET key token NX PX ttl\` and a compare-and-delete script by SHA (\`EVALSHA\`, sent by
  ioredis \`defineCommand\`); the etcd floor is a put-if-absent transaction on a lease granted
  beforehand and a delete fenced by the put's revision. Under contention a floor retries at
  once, with no wait and no notification: the fastest a polling lock could go, and the most load
  it could put on the server.
- **our two scripts on raw ioredis**: our acquire script (a fenced grant: \`SET NX PX\` and the
  counter's \`INCR\` in one call) and our release script (which would hand the lock to a queued
  waiter), by SHA on a bare ioredis client, with no library layer and no waiting. Its *× floor*
  is what the protocol costs beside the floor's unfenced \`SET\`; *ours ÷ it* is what the library
  layer costs beside the protocol.
- **ours ÷ it**: @genesis/lock's rate over that contender's; above 1 means ours is faster.
- **Go concurrency.Mutex**: etcd's own Go client (v3.4, from Debian) and its \`concurrency.Mutex\`,
  each worker on a session of its own (a Mutex's key is its prefix and its session's lease ID),
  driven by \`bench/go/mutex.go\` through the same job protocol as the JavaScript children. A
  reference, not a peer: it shows what the same queue protocol costs on Go's gRPC, which spends
  much less client CPU per call than grpc-js; it is measured beside each runtime's rows.
- **client CPU µs/cycle**: user+system CPU of the measuring processes during the window
  (\`process.cpuUsage()\`), over cycles; it includes the client library and the runtime.
- **server CPU µs/cycle**, **scripts/cycle**, **commits/cycle**, **fsyncs/cycle**: the server's own
  counters, read just before and just after the window; read by one measuring process.
- **acquisitions/s** on one key, and **hand-offs/s**: the acquisitions that went to another
  worker (in one process) or to another process (4 processes × 2 workers); *× floor* and
  *ours ÷ it* compare hand-offs, since a lock that lets one worker take it again and again hands
  nothing off. *to other worker* / *to other process*: the share of consecutive acquisitions
  (ordered by acquisition time, one clock on one machine) that changed worker / process. *wait*: from the call to \`lock()\` to its lease. *per worker min–max*:
  acquisitions per worker; *max/min* above 1.5 means some workers starve. *overlaps*: an
  acquisition that began before the previous holder began its release, which a correct lock never
  shows.
- Peers run with their own defaults except the lease length (10 s for everyone) and, for
  redis-semaphore, an acquire timeout long enough never to give up. A peer that does not wait
  (npm etcd3's \`Lock\`) and a Redlock acquisition that fails after its retries are retried at once
  by the harness, as a caller that must have the lock would. redis-semaphore's \`tryAcquire\`
  sleeps its retry interval (10 ms) after a failed single attempt.
- **4 processes × 64 workers on 256 keys**: the floor and ours only, to load the server from
  many clients at once; *server CPU busy* in the capacity table says how close the server came
  to one full core. Pinned, the clients share the server's core and bound it first: run it with
  \`--unpinned\` for the server's capacity.
- **scale**: one locker of ours holds the locks with a 3 s ttl (a renewal pass every second);
  heap is \`process.memoryUsage().heapUsed\` after a full GC (Deno with \`--expose-gc\`,
  \`Bun.gc(true)\`), sampled while the locks are held (at the start, then evenly over the window;
  the row says how often): the median, and the largest beside it, since a sample taken while a
  renewal pass is in flight also counts that pass's commands; renewal calls are counted by the
  server (Redis scripts in \`commandstats\`, etcd \`LeaseKeepAlive\` messages); connections are
  the server's established sockets (\`/proc/net/tcp\`). On the Redis Cluster the calls are counted
  on every master, and the busiest master's count is shown beside the total.
`;

/** A bar chart of each contender's rate as a multiple of the floor, per scenario; no dependency. */
function chart(rows: Row[], args: Args): string {
  const groups: { title: string; bars: { label: string; ratio: number }[] }[] = [];
  for (const backend of args.backends) {
    for (const runtime of args.runtimes) {
      for (const scenario of args.scenarios.filter((s) => s !== "scale")) {
        const group = rows.filter((r) =>
          r.backend === backend && r.runtime === runtime && r.scenario === scenario &&
          r.data === "disk"
        );
        const floor = headline(group.find((r) => r.contender === "floor"));
        if (!(floor > 0)) continue;
        groups.push({
          title: `${backend}, ${runtime}: ${SCENARIOS[scenario].title}`,
          bars: group.map((r) => ({ label: LABELS[r.contender], ratio: headline(r) / floor })),
        });
      }
    }
  }
  const barHeight = 16, gap = 4, titleHeight = 22, left = 260, width = 760, scaleWidth = 420;
  const max = Math.max(1.2, ...groups.flatMap((g) => g.bars.map((b) => b.ratio)));
  const height = groups.reduce((h, g) => h + titleHeight + g.bars.length * (barHeight + gap), 40);
  const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
  const parts: string[] = [];
  let y = 30;
  parts.push(
    `<text x="10" y="18" font-weight="bold">Cycles/s (hand-offs/s on one key) as a multiple of the raw-client floor${
      smoke(args) ? " · SMOKE RUN, not measured figures" : ""
    }</text>`,
  );
  for (const g of groups) {
    parts.push(`<text x="10" y="${y + 14}" font-weight="bold">${esc(g.title)}</text>`);
    y += titleHeight;
    for (const b of g.bars) {
      const w = Math.max(1, (b.ratio / max) * scaleWidth);
      const fill = b.label === LABELS.ours
        ? "#2b6cb0"
        : b.label === LABELS.floor
        ? "#888"
        : "#d69e2e";
      parts.push(`<text x="${left - 6}" y="${y + 12}" text-anchor="end">${esc(b.label)}</text>`);
      parts.push(
        `<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" fill="${fill}"/>`,
      );
      parts.push(
        `<text x="${(left + w + 4).toFixed(1)}" y="${y + 12}">${b.ratio.toFixed(2)}×</text>`,
      );
      y += barHeight + gap;
    }
  }
  const one = left + (1 / max) * scaleWidth;
  parts.push(
    `<line x1="${one.toFixed(1)}" y1="26" x2="${one.toFixed(1)}" y2="${
      height - 6
    }" stroke="#444" stroke-dasharray="3,3"/>`,
  );
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n` +
    `${parts.join("\n")}\n</svg>\n`;
}

await main();
