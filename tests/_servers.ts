// Real servers for the tests: etcd and redis-server started from PATH as child
// processes, on free loopback ports, in temporary folders, stopped by PID.
// A missing binary fails the run and names the Debian package to install.

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { sleep } from "./_util.ts";

const PACKAGES: Record<string, string> = {
  etcd: "etcd-server",
  etcdctl: "etcd-client",
  "redis-server": "redis-server",
  "redis-cli": "redis-tools (a dependency of redis-server)",
  node: "nodejs",
  openssl: "openssl",
};

/** The path of `binary`, or an error that says which package installs it. */
export function requireBinary(binary: string): string {
  try {
    return execFileSync("sh", ["-c", `command -v ${binary}`], { encoding: "utf8" }).trim();
  } catch {
    throw new Error(
      `${binary} is not on the PATH: install the Debian package ${PACKAGES[binary] ?? binary} ` +
        `(apt-get install ${PACKAGES[binary] ?? binary}); .ci/run does`,
    );
  }
}

/**
 * Runs a TypeScript file in a child process of the runtime running the tests
 * (Deno or Bun).
 */
export function runScript(script: string, args: string[], env: Record<string, string> = {}): Child {
  const deno = (globalThis as { Deno?: unknown }).Deno !== undefined;
  const runtimeArgs = deno ? ["run", "--allow-all", script, ...args] : [script, ...args];
  return new Child(process.execPath, runtimeArgs, { env });
}

/** A free TCP port on 127.0.0.1 (free when asked; the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/**
 * A free port at most 55535 whose port + 10000 is free too: a Redis Cluster
 * node listens for its bus there, and ports stop at 65535.
 */
export async function freeClusterPort(): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const port = await freePort();
    if (port <= 55535 && await isFree(port + 10_000)) return port;
  }
  throw new Error("No free port pair (port, port + 10000) at or below 55535");
}

function isFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.unref();
    server.on("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

/** A temporary folder, removed by the returned function. */
export function tempDir(label: string): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), `genesis-lock-${label}-`));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** A child process that can be paused, resumed and stopped by PID. */
export class Child {
  readonly #process: ChildProcess;
  readonly exited: Promise<number | null>;
  #output = "";

  constructor(
    command: string,
    args: string[],
    options: { cwd?: string; env?: Record<string, string> } = {},
  ) {
    this.#process = spawn(command, args, {
      cwd: options.cwd,
      env: { ...process.env, ...options.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const keep = (chunk: unknown) => {
      this.#output = (this.#output + String(chunk)).slice(-20_000);
    };
    this.#process.stdout?.on("data", keep);
    this.#process.stderr?.on("data", keep);
    this.exited = new Promise((resolve) => {
      this.#process.on("exit", (code, signal) => resolve(code ?? (signal ? -1 : null)));
      this.#process.on("error", () => resolve(null));
    });
  }

  /** The PID. */
  get pid(): number {
    return this.#process.pid!;
  }

  /** The last 20,000 characters of stdout and stderr. */
  get output(): string {
    return this.#output;
  }

  /** Resolves when the output contains `pattern`; fails after `ms`. */
  async waitFor(pattern: RegExp, ms = 10_000): Promise<RegExpMatchArray> {
    const deadline = performance.now() + ms;
    for (;;) {
      const match = this.#output.match(pattern);
      if (match) return match;
      if (performance.now() > deadline) {
        throw new Error(
          `No ${pattern} from PID ${this.pid} within ${ms} ms; output:\n${this.#output}`,
        );
      }
      await sleep(10);
    }
  }

  /** Sends `signal` to the process. */
  signal(signal: NodeJS.Signals): void {
    try {
      process.kill(this.pid, signal);
    } catch {
      // Already gone.
    }
  }

  /** Stops the process (SIGTERM, then SIGKILL after `graceMs`) and waits for it. */
  async stop(graceMs = 3_000): Promise<void> {
    this.signal("SIGCONT");
    this.signal("SIGTERM");
    const timer = setTimeout(() => this.signal("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

async function waitFor(what: string, ready: () => boolean, child: Child, ms = 20_000) {
  const deadline = performance.now() + ms;
  let exited = false;
  child.exited.then(() => exited = true);
  while (!ready()) {
    if (exited) throw new Error(`${what} exited at start:\n${child.output}`);
    if (performance.now() > deadline) {
      throw new Error(`${what} was not ready after ${ms} ms:\n${child.output}`);
    }
    await sleep(25);
  }
}

/** A throwaway CA and a server certificate for 127.0.0.1, made by openssl. */
export interface TestCerts {
  dir: string;
  ca: string;
  cert: string;
  key: string;
  caPem: string;
  certPem: string;
  keyPem: string;
  remove(): void;
}

/** Makes a CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost) with openssl. */
export function makeCerts(): TestCerts {
  requireBinary("openssl");
  const dir = tempDir("tls");
  const path = (name: string) => join(dir.path, name);
  const run = (args: string[]) =>
    execFileSync("openssl", args, { stdio: ["ignore", "pipe", "pipe"] });
  run([
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=genesis-lock test CA",
    "-keyout",
    path("ca.key"),
    "-out",
    path("ca.pem"),
  ]);
  run([
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-subj",
    "/CN=127.0.0.1",
    "-keyout",
    path("server.key"),
    "-out",
    path("server.csr"),
  ]);
  writeFileSync(
    path("san.cnf"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
  );
  run([
    "x509",
    "-req",
    "-in",
    path("server.csr"),
    "-CA",
    path("ca.pem"),
    "-CAkey",
    path("ca.key"),
    "-CAcreateserial",
    "-days",
    "2",
    "-extfile",
    path("san.cnf"),
    "-out",
    path("server.pem"),
  ]);
  return {
    dir: dir.path,
    ca: path("ca.pem"),
    cert: path("server.pem"),
    key: path("server.key"),
    caPem: readFileSync(path("ca.pem"), "utf8"),
    certPem: readFileSync(path("server.pem"), "utf8"),
    keyPem: readFileSync(path("server.key"), "utf8"),
    remove: dir.remove,
  };
}

/** One etcd member of a test cluster. */
export interface EtcdMember {
  name: string;
  clientPort: number;
  peerPort: number;
  endpoint: string;
  child?: Child;
}

/** Options of {@linkcode startEtcd}. */
export interface EtcdOptions {
  /** How many members (1 or 3). */
  members?: number;
  /**
   * Client TLS: the server's certificate and key files, and the CA that
   * signed them; with `clientCertAuth`, clients must show a certificate that
   * CA signed.
   */
  tls?: { cert: string; key: string; ca: string; clientCertAuth?: boolean };
}

/**
 * One reading of etcd's /metrics on every member in `endpoints`: the sum of
 * counter `name` over the series whose labels include `label`.
 */
export async function etcdMetrics(
  endpoints: string[],
): Promise<(name: string, label: string) => number> {
  const texts = await Promise.all(
    endpoints.map(async (endpoint) => await (await fetch(`http://${endpoint}/metrics`)).text()),
  );
  const lines = texts.flatMap((text) => text.split("\n"));
  return (name, label) => {
    let total = 0;
    for (const line of lines) {
      if (line.startsWith(`${name}{`) && line.includes(label)) {
        total += Number(line.slice(line.lastIndexOf(" ") + 1));
      }
    }
    return total;
  };
}

/** A test etcd cluster on loopback. */
export class EtcdCluster implements AsyncDisposable {
  readonly members: EtcdMember[];
  readonly #dir = tempDir("etcd");
  readonly #options: EtcdOptions;

  private constructor(members: EtcdMember[], options: EtcdOptions) {
    this.members = members;
    this.#options = options;
  }

  /** Starts a cluster and waits until every member answers. */
  static async start(options: EtcdOptions = {}): Promise<EtcdCluster> {
    requireBinary("etcd");
    requireBinary("etcdctl");
    const count = options.members ?? 1;
    const scheme = options.tls ? "https" : "http";
    const members: EtcdMember[] = [];
    for (let i = 0; i < count; i++) {
      const clientPort = await freePort();
      const peerPort = await freePort();
      members.push({
        name: `m${i}`,
        clientPort,
        peerPort,
        endpoint: `${scheme}://127.0.0.1:${clientPort}`,
      });
    }
    const cluster = new EtcdCluster(members, options);
    try {
      await Promise.all(members.map((_, i) => cluster.startMember(i, "new")));
    } catch (error) {
      await cluster.stop();
      throw error;
    }
    return cluster;
  }

  /** `host:port` of every member. */
  get endpoints(): string[] {
    return this.members.map((m) => `127.0.0.1:${m.clientPort}`);
  }

  /** Starts member `i` (again): `state` is "new" for a fresh cluster, "existing" for a restart. */
  async startMember(i: number, state: "new" | "existing" = "existing"): Promise<void> {
    const member = this.members[i];
    const scheme = this.#options.tls ? "https" : "http";
    const cluster = this.members.map((m) => `${m.name}=http://127.0.0.1:${m.peerPort}`).join(",");
    const args = [
      "--name",
      member.name,
      "--data-dir",
      join(this.#dir.path, member.name),
      "--listen-client-urls",
      `${scheme}://127.0.0.1:${member.clientPort}`,
      "--advertise-client-urls",
      `${scheme}://127.0.0.1:${member.clientPort}`,
      "--listen-peer-urls",
      `http://127.0.0.1:${member.peerPort}`,
      "--initial-advertise-peer-urls",
      `http://127.0.0.1:${member.peerPort}`,
      "--initial-cluster",
      cluster,
      "--initial-cluster-state",
      state,
      "--initial-cluster-token",
      `t-${this.#dir.path.slice(-6)}`,
      // Faster elections than the defaults keep the failover tests short.
      "--heartbeat-interval",
      "50",
      "--election-timeout",
      "500",
      "--log-level",
      "info", // readiness is read from the log
      "--logger",
      "zap",
    ];
    const tls = this.#options.tls;
    if (tls) {
      args.push("--cert-file", tls.cert, "--key-file", tls.key);
      // etcd 3.4 demands a client certificate whenever it has a trusted CA file.
      if (tls.clientCertAuth) args.push("--trusted-ca-file", tls.ca, "--client-cert-auth");
    }
    member.child = new Child("etcd", args);
    const child = member.child;
    await waitFor(
      `etcd ${member.name}`,
      () =>
        /serving client traffic/.test(child.output) &&
        /published local member to cluster/.test(child.output),
      child,
    );
  }

  /** Runs etcdctl against the cluster and returns its stdout. */
  etcdctl(args: string[], extra: string[] = []): string {
    const tls = this.#options.tls;
    const flags = [`--endpoints=${this.members.map((m) => m.endpoint).join(",")}`, ...extra];
    if (tls) flags.push(`--cacert=${tls.ca}`);
    return execFileSync("etcdctl", [...flags, ...args], {
      encoding: "utf8",
      env: { ...process.env, ETCDCTL_API: "3" },
      stdio: ["ignore", "pipe", "pipe"],
    });
  }

  /** Starts a long-running etcdctl (such as `lock NAME`) against the cluster. */
  spawnEtcdctl(args: string[]): Child {
    const tls = this.#options.tls;
    const flags = [`--endpoints=${this.members.map((m) => m.endpoint).join(",")}`];
    if (tls) flags.push(`--cacert=${tls.ca}`);
    return new Child("etcdctl", [...flags, ...args], { env: { ETCDCTL_API: "3" } });
  }

  /** The index of the current leader, asked of the members that are up. */
  leader(): number {
    const up = this.members.filter((m) => m.child !== undefined).map((m) => m.endpoint);
    const out = execFileSync("etcdctl", [
      `--endpoints=${up.join(",")}`,
      "endpoint",
      "status",
      "-w",
      "json",
    ], {
      encoding: "utf8",
      env: { ...process.env, ETCDCTL_API: "3" },
    });
    const statuses = JSON.parse(out) as {
      Endpoint: string;
      Status: { header: { member_id: number }; leader: number };
    }[];
    const leader = statuses.find((s) => s.Status.header.member_id === s.Status.leader);
    if (!leader) throw new Error(`No leader among ${up.join(", ")}`);
    return this.members.findIndex((m) => m.endpoint === leader.Endpoint);
  }

  /** Stops member `i` (SIGKILL: a crash, not a clean leave). */
  async killMember(i: number): Promise<void> {
    const child = this.members[i].child;
    child?.signal("SIGKILL");
    await child?.exited;
    this.members[i].child = undefined;
  }

  /** Stops every member and removes the data. */
  async stop(): Promise<void> {
    // SIGKILL, not a graceful stop: a graceful etcd sends HTTP/2 GOAWAY on every
    // open connection, and Deno's nghttp2 has aborted the whole test process
    // on one (an assertion in find_stream_on_goaway_func, seen once in about
    // ten runs, on the idle channels npm:etcd3 leaves after authenticating).
    await Promise.all(this.members.map((_, i) => this.killMember(i)));
    this.#dir.remove();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** Options of {@linkcode RedisServer.start}. */
export interface RedisOptions {
  /** Extra redis-server arguments, such as `["--appendonly", "yes"]`. */
  args?: string[];
  /** TLS only, on the port: the server's certificate and key, and the CA. */
  tls?: { cert: string; key: string; ca: string };
  /** The port, if not any free one. */
  port?: number;
}

/** A redis-server on a free loopback port, in a temporary folder. */
export class RedisServer implements AsyncDisposable {
  readonly port: number;
  readonly #dir = tempDir("redis");
  readonly #options: RedisOptions;
  child?: Child;

  private constructor(port: number, options: RedisOptions) {
    this.port = port;
    this.#options = options;
  }

  /** Starts a server and waits until it accepts connections. */
  static async start(options: RedisOptions = {}): Promise<RedisServer> {
    requireBinary("redis-server");
    const server = new RedisServer(options.port ?? await freePort(), options);
    try {
      await server.restart();
    } catch (error) {
      await server.stop();
      throw error;
    }
    return server;
  }

  /** `127.0.0.1:port`. */
  get endpoint(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** The data folder (for AOF and RDB files). */
  get dir(): string {
    return this.#dir.path;
  }

  /** Starts the server (again, after stop() or kill()), with the same data folder. */
  async restart(): Promise<void> {
    const tls = this.#options.tls;
    const port = tls
      ? [
        "--port",
        "0",
        "--tls-port",
        String(this.port),
        "--tls-cert-file",
        tls.cert,
        "--tls-key-file",
        tls.key,
        "--tls-ca-cert-file",
        tls.ca,
        "--tls-auth-clients",
        "no",
      ]
      : ["--port", String(this.port)];
    const child = new Child("redis-server", [
      ...port,
      "--bind",
      "127.0.0.1",
      "--dir",
      this.#dir.path,
      "--save",
      "",
      "--appendonly",
      "no",
      ...(this.#options.args ?? []),
    ]);
    this.child = child;
    await waitFor("redis-server", () => /Ready to accept connections/.test(child.output), child);
  }

  /** Stops the server: SIGTERM (it writes its AOF) or SIGKILL (a crash). */
  async shutdown(signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    if (signal === "SIGKILL") {
      child.signal("SIGKILL");
      await child.exited;
    } else {
      await child.stop();
    }
  }

  /** Runs redis-cli against the server and returns its output. */
  cli(args: string[]): string {
    requireBinary("redis-cli");
    return execFileSync("redis-cli", ["-h", "127.0.0.1", "-p", String(this.port), ...args], {
      encoding: "utf8",
    }).trim();
  }

  /** Calls of each command since start or the last CONFIG RESETSTAT, from INFO commandstats. */
  commandCalls(): Record<string, number> {
    const calls: Record<string, number> = {};
    for (const match of this.cli(["INFO", "commandstats"]).matchAll(/cmdstat_(\w+):calls=(\d+)/g)) {
      calls[match[1]] = Number(match[2]);
    }
    return calls;
  }

  /** Stops the server and removes its folder. */
  async stop(): Promise<void> {
    await this.shutdown();
    this.#dir.remove();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** Options of {@linkcode RedisClusterServers.start}. */
export interface RedisClusterOptions {
  /** Replicas per master (0 or 1). */
  replicas?: number;
}

/** A Redis Cluster of three masters (with `replicas` each) on loopback, made with redis-cli. */
export class RedisClusterServers implements AsyncDisposable {
  readonly servers: RedisServer[];

  private constructor(servers: RedisServer[]) {
    this.servers = servers;
  }

  /** Starts cluster-enabled servers, joins them, and waits for cluster_state:ok. */
  static async start(options: RedisClusterOptions = {}): Promise<RedisClusterServers> {
    requireBinary("redis-cli");
    const replicas = options.replicas ?? 0;
    const args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];
    // With replicas, a master is failed over 2 s after it stops answering
    // (not 15 s); without, a busy node is never taken for a failed one.
    if (replicas > 0) args.push("--cluster-node-timeout", "2000");
    const servers: RedisServer[] = [];
    const cluster = new RedisClusterServers(servers);
    try {
      // One at a time: each port pair is checked free just before its server takes it.
      for (let i = 0; i < 3 * (1 + replicas); i++) {
        servers.push(await RedisServer.start({ args, port: await freeClusterPort() }));
      }
      execFileSync("redis-cli", [
        "--cluster",
        "create",
        ...servers.map((s) => s.endpoint),
        "--cluster-replicas",
        String(replicas),
        "--cluster-yes",
      ], { stdio: "pipe" });
      const deadline = performance.now() + 30_000;
      while (!cluster.#settled()) {
        if (performance.now() > deadline) {
          throw new Error("The Redis Cluster did not reach cluster_state:ok on every node");
        }
        await sleep(100);
      }
    } catch (error) {
      await cluster.stop();
      throw error;
    }
    return cluster;
  }

  /** Every running node says cluster_state:ok, and every replica's link to its master is up. */
  #settled(): boolean {
    return this.servers.filter((s) => s.child !== undefined).every((s) => {
      if (!s.cli(["CLUSTER", "INFO"]).includes("cluster_state:ok")) return false;
      const replication = s.cli(["INFO", "replication"]);
      return !replication.includes("role:slave") || replication.includes("master_link_status:up");
    });
  }

  /** The seed nodes, as ioredis's Cluster takes them. */
  get nodes(): { host: string; port: number }[] {
    return this.servers.map((s) => ({ host: "127.0.0.1", port: s.port }));
  }

  /** The seed nodes as `host:port`. */
  get endpoints(): string[] {
    return this.servers.map((s) => s.endpoint);
  }

  /** The server that is master of `slot` now, asked of a running node. */
  masterOf(slot: number): RedisServer {
    const asker = this.servers.find((s) => s.child !== undefined)!;
    const line = asker.cli(["CLUSTER", "NODES"]).split("\n").find((l) => {
      const fields = l.split(" ");
      return fields[2].includes("master") && !fields[2].includes("fail") &&
        fields.slice(8).some((range) => {
          const [from, to] = range.split("-").map(Number);
          return slot >= from && slot <= (to ?? from);
        });
    });
    const port = Number(line?.split(" ")[1].split("@")[0].split(":")[1]);
    const server = this.servers.find((s) => s.port === port);
    if (!server) throw new Error(`No master serves slot ${slot}`);
    return server;
  }

  async stop(): Promise<void> {
    await Promise.all(this.servers.map((s) => s.stop()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** Options of {@linkcode RedisSentinels.start}. */
export interface RedisSentinelOptions {
  /** The master group name. */
  masterName?: string;
  /** How long a silent primary takes to count as down. */
  downAfterMs?: number;
  /** How many replicas (1 or more). */
  replicas?: number;
  /** The Sentinels' `requirepass` (they use it with each other too). */
  sentinelPassword?: string;
}

/**
 * A primary, its replicas (one unless told) and three Sentinels (quorum 2) on
 * loopback. After a failover a replica is the primary; `primary` and
 * `replica` follow.
 */
export class RedisSentinels implements AsyncDisposable {
  readonly masterName: string;
  /** The data servers, the first started as primary. */
  readonly servers: RedisServer[];
  readonly sentinels: Child[] = [];
  readonly sentinelPorts: number[] = [];
  readonly #dir = tempDir("sentinel");
  /** redis-cli's arguments to authenticate to a Sentinel. */
  readonly #auth: string[];

  private constructor(masterName: string, servers: RedisServer[], password?: string) {
    this.masterName = masterName;
    this.servers = servers;
    this.#auth = password ? ["--no-auth-warning", "-a", password] : [];
  }

  static async start(options: RedisSentinelOptions = {}): Promise<RedisSentinels> {
    requireBinary("redis-server");
    const masterName = options.masterName ?? "locks";
    const primary = await RedisServer.start();
    const servers = [primary];
    const setup = new RedisSentinels(masterName, servers, options.sentinelPassword);
    const replicas = options.replicas ?? 1;
    try {
      for (let i = 0; i < replicas; i++) {
        servers.push(
          await RedisServer.start({ args: ["--replicaof", "127.0.0.1", String(primary.port)] }),
        );
      }
      await setup.#until(
        () =>
          servers.slice(1).every((s) =>
            s.cli(["INFO", "replication"]).includes("master_link_status:up")
          ),
        "the replicas to sync",
      );
      for (let i = 0; i < 3; i++) {
        const port = await freePort();
        const file = join(setup.#dir.path, `sentinel-${i}.conf`);
        writeFileSync(
          file,
          [
            `port ${port}`,
            "bind 127.0.0.1",
            `dir ${setup.#dir.path}`,
            `sentinel monitor ${masterName} 127.0.0.1 ${primary.port} 2`,
            `sentinel down-after-milliseconds ${masterName} ${options.downAfterMs ?? 1_000}`,
            `sentinel failover-timeout ${masterName} 10000`,
            `sentinel parallel-syncs ${masterName} 1`,
            ...(options.sentinelPassword
              ? [
                `requirepass ${options.sentinelPassword}`,
                `sentinel sentinel-pass ${options.sentinelPassword}`,
              ]
              : []),
            "",
          ].join("\n"),
        );
        const child = new Child("redis-server", [file, "--sentinel"]);
        setup.sentinels.push(child);
        setup.sentinelPorts.push(port);
        await child.waitFor(/\+monitor master/);
      }
      // Each Sentinel has found the replica and the other Sentinels.
      await setup.#until(
        () =>
          setup.sentinelPorts.every((port) => {
            const info = cliAt(port, [...setup.#auth, "SENTINEL", "MASTER", masterName]);
            return info.includes(`num-slaves\n${replicas}\n`) &&
              /num-other-sentinels\n2\n/.test(info);
          }),
        "the Sentinels to find the replica and each other",
      );
    } catch (error) {
      await setup.stop();
      throw error;
    }
    return setup;
  }

  async #until(ready: () => boolean, what: string, ms = 30_000): Promise<void> {
    const deadline = performance.now() + ms;
    while (!ready()) {
      if (performance.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
      await sleep(100);
    }
  }

  /** The Sentinels, as `host:port`. */
  get endpoints(): string[] {
    return this.sentinelPorts.map((port) => `127.0.0.1:${port}`);
  }

  /** The port the Sentinels name as primary now. */
  primaryPort(): number {
    for (const port of this.sentinelPorts) {
      try {
        const reply = cliAt(port, [
          ...this.#auth,
          "SENTINEL",
          "GET-MASTER-ADDR-BY-NAME",
          this.masterName,
        ]);
        return Number(reply.split("\n")[1]);
      } catch {
        // That Sentinel is down: ask the next.
      }
    }
    throw new Error("No Sentinel answered");
  }

  /** The data server the Sentinels name as primary now. */
  get primary(): RedisServer {
    const port = this.primaryPort();
    return this.servers.find((s) => s.port === port)!;
  }

  /** A data server other than the primary. */
  get replica(): RedisServer {
    const port = this.primaryPort();
    return this.servers.find((s) => s.port !== port)!;
  }

  /** Waits until every replica of the primary now has its link to it up. */
  async replicasSynced(ms = 30_000): Promise<void> {
    await this.#until(
      () => {
        const port = this.primaryPort();
        const primary = this.servers.find((s) => s.port === port)!;
        const info = primary.cli(["INFO", "replication"]);
        const online = (info.match(/state=online/g) ?? []).length;
        return online === this.servers.filter((s) => s.child !== undefined).length - 1;
      },
      "the replicas to follow the primary",
      ms,
    );
  }

  /** Waits until the Sentinels name a primary other than `port`, and it accepts writes. */
  async failedOverFrom(port: number, ms = 30_000): Promise<RedisServer> {
    await this.#until(
      () => {
        const now = this.primaryPort();
        if (now === port) return false;
        const server = this.servers.find((s) => s.port === now);
        return server?.cli(["INFO", "replication"]).includes("role:master") ?? false;
      },
      `a failover away from port ${port}`,
      ms,
    );
    return this.primary;
  }

  async stop(): Promise<void> {
    await Promise.all(this.sentinels.map((child) => child.stop()));
    await Promise.all(this.servers.map((s) => s.stop()));
    this.#dir.remove();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** redis-cli against a port on loopback. */
function cliAt(port: number, args: string[]): string {
  return execFileSync("redis-cli", ["-h", "127.0.0.1", "-p", String(port), ...args], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
  }).trim();
}
