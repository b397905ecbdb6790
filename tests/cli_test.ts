// The genesis-lock CLI end to end: real servers, the CLI in child processes
// of the runtime under test, shell commands as the locked work.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { New } from "../mod.ts";
import { EXIT, parseDuration } from "../cli.ts";
import { type Child, EtcdCluster, RedisServer, runScript, tempDir } from "./_servers.ts";
import { prefix, sleep, until, within } from "./_util.ts";

const cli = new URL("../cli.ts", import.meta.url).pathname;

/** Runs the CLI; resolves its exit code and everything it printed. */
async function runCli(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number | null; output: string }> {
  const child = runScript(cli, args, env);
  const code = await child.exited;
  return { code, output: child.output };
}

/** A file the locked commands append to, to see their order. */
function journal() {
  const dir = tempDir("cli");
  const path = join(dir.path, "journal");
  writeFileSync(path, "");
  return {
    path,
    lines: () => readFileSync(path, "utf8").split("\n").filter(Boolean),
    remove: dir.remove,
  };
}

interface Target {
  backend: "etcd" | "redis";
  endpoints: () => string;
  /** The shortest TTL flag the backend honours closely. */
  shortTtl: string;
}

function behaviours(target: Target) {
  const flags = () => ["--backend", target.backend, "--endpoints", target.endpoints()];

  it("runs the commands of two CLIs on one key one after the other", async () => {
    const key = prefix("cli-serial");
    const log = journal();
    try {
      const script = (id: string) =>
        `echo start-${id} >> ${log.path}; sleep 0.3; echo end-${id} >> ${log.path}`;
      const [a, b] = await Promise.all([
        runCli([...flags(), key, "--", "sh", "-c", script("a")]),
        runCli([...flags(), key, "--", "sh", "-c", script("b")]),
      ]);
      assert.equal(a.code, 0, a.output);
      assert.equal(b.code, 0, b.output);
      const lines = log.lines();
      assert.equal(lines.length, 4, lines.join(" "));
      // Each start is followed by its own end: the two never overlap.
      assert.equal(lines[1], lines[0].replace("start", "end"), lines.join(" "));
      assert.equal(lines[3], lines[2].replace("start", "end"), lines.join(" "));
    } finally {
      log.remove();
    }
  });

  it("exits with the command's exit code, and 128 + N when signal N killed it", async () => {
    const key = prefix("cli-code");
    assert.equal((await runCli([...flags(), key, "--", "sh", "-c", "exit 7"])).code, 7);
    const killed = await runCli([...flags(), key, "--", "sh", "-c", "kill -KILL $$"]);
    assert.equal(killed.code, 128 + 9, killed.output);
  });

  it("passes LOCK_KEY, LOCK_HELD and a LOCK_TOKEN that rises from one run to the next", async () => {
    const key = prefix("cli-token");
    const print = ["sh", "-c", 'echo "TOKEN=$LOCK_TOKEN KEY=$LOCK_KEY HELD=$LOCK_HELD"'];
    const first = await runCli([...flags(), key, "--", ...print]);
    const second = await runCli([...flags(), key, "--", ...print]);
    const token = (run: { output: string }) => {
      const match = /TOKEN=(\d+) KEY=(\S+) HELD=1/.exec(run.output);
      assert.ok(match, run.output);
      assert.equal(match[2], key);
      return BigInt(match[1]);
    };
    assert.ok(token(second) > token(first), `${token(first)} then ${token(second)}`);
  });

  it("--try on a held key exits at once with the busy code; --timeout with its own", async () => {
    const key = prefix("cli-busy");
    const locker = New({ backend: target.backend, endpoints: [target.endpoints()] });
    const held = await locker.lock(key);
    try {
      const started = performance.now();
      const busy = await runCli([...flags(), "--try", key, "--", "true"]);
      assert.equal(busy.code, EXIT.busy, busy.output);
      assert.match(busy.output, /is held elsewhere/);
      const custom = await runCli([
        ...flags(),
        "--try",
        "--conflict-exit-code",
        "3",
        key,
        "--",
        "true",
      ]);
      assert.equal(custom.code, 3, custom.output);
      const timed = await runCli([...flags(), "--timeout", "300ms", key, "--", "true"]);
      assert.equal(timed.code, EXIT.timedOut, timed.output);
      assert.match(timed.output, /timed out after 300 ms/);
      // Three CLI runs, each a runtime start and one connection: seconds, not a wait.
      assert.ok(performance.now() - started < 15_000);
    } finally {
      await held.release();
      await locker.close();
    }
  });

  it("passes SIGTERM to the command and releases the lock when it exits", async () => {
    const key = prefix("cli-term");
    const log = journal();
    const script = `trap 'echo got-term >> ${log.path}; exit 0' TERM; echo ready >> ${log.path}; ` +
      "while :; do sleep 0.05; done";
    const child = runScript(cli, [...flags(), "--ttl", "30s", key, "--", "sh", "-c", script]);
    const locker = New({ backend: target.backend, endpoints: [target.endpoints()] });
    try {
      await until(() => log.lines().includes("ready"), 15_000, "the command to start");
      child.signal("SIGTERM");
      const code = await within(child.exited, 10_000, "still running");
      assert.equal(code, 0, child.output);
      assert.ok(log.lines().includes("got-term"), log.lines().join(" "));
      // Released at once, not after the 30 s TTL.
      const lease = await locker.tryLock(key);
      assert.ok(lease, "the lock was not released");
      await lease.release();
    } finally {
      await child.stop();
      await locker.close();
      log.remove();
    }
  });

  it("kills the command of a CLI paused past its TTL once it resumes; the waiter ran only after the loss", async () => {
    const key = prefix("cli-paused");
    const log = journal();
    const holder = runScript(cli, [
      ...flags(),
      "--ttl",
      target.shortTtl,
      "--kill-after",
      "1s",
      key,
      "--",
      "sh",
      "-c",
      `trap 'echo a-term >> ${log.path}; exit 1' TERM; echo a-start >> ${log.path}; ` +
      "while :; do sleep 0.05; done",
    ]);
    let waiter: Child | undefined;
    try {
      await until(() => log.lines().includes("a-start"), 15_000, "the holder's command to start");
      waiter = runScript(cli, [
        ...flags(),
        "--timeout",
        "30s",
        key,
        "--",
        "sh",
        "-c",
        `echo b-start >> ${log.path}`,
      ]);
      await sleep(1_500);
      assert.ok(!log.lines().includes("b-start"), "the waiter ran while the holder held the lock");
      holder.signal("SIGSTOP");
      const stoppedAt = performance.now();
      await until(() => log.lines().includes("b-start"), 20_000, "the waiter to run");
      const waited = performance.now() - stoppedAt;
      assert.ok(waited >= 500, `the waiter ran ${waited.toFixed(0)} ms after the holder paused`);
      assert.equal(await waiter.exited, 0, waiter.output);
      holder.signal("SIGCONT");
      const code = await within(holder.exited, 10_000, "still running");
      assert.equal(code, EXIT.lost, holder.output);
      assert.ok(log.lines().includes("a-term"), `the holder's command was not stopped`);
      assert.match(holder.output, /genesis-lock: Lost lock .*: stopping the command/);
      assert.doesNotMatch(holder.output, /\n\s+at /, "a stack trace");
    } finally {
      await holder.stop();
      await waiter?.stop();
      log.remove();
    }
  });

  it("prints the holder with status, as text and as JSON", async () => {
    const key = prefix("cli-status");
    const locker = New({ backend: target.backend, endpoints: [target.endpoints()] });
    const held = await locker.lock(key);
    try {
      const text = await runCli(["status", ...flags(), key]);
      assert.equal(text.code, 0, text.output);
      assert.match(text.output, new RegExp(`token: +${held.token}\\b`));
      assert.match(text.output, /held: +yes/);
      const json = await runCli(["status", ...flags(), "--json", key]);
      const status = JSON.parse(json.output.trim().split("\n").at(-1)!);
      assert.equal(status.key, key);
      assert.equal(status.holder.token, String(held.token));
      assert.ok(status.holder.ttl > 0 && status.holder.ttl <= 10_000, json.output);
      await held.release();
      const free = await runCli(["status", ...flags(), "--json", key]);
      assert.equal(JSON.parse(free.output.trim().split("\n").at(-1)!).holder, undefined);
    } finally {
      await held.release();
      await locker.close();
    }
  });
}

describe("CLI on etcd", () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
  });
  after(async () => {
    await cluster.stop();
  });

  behaviours({ backend: "etcd", endpoints: () => cluster.endpoints[0], shortTtl: "2s" });

  it("and etcdctl lock exclude each other, in both directions", async () => {
    const key = prefix("cli-etcdctl");
    const log = journal();
    try {
      const held = (id: string) =>
        `echo start-${id} >> ${log.path}; sleep 0.5; echo end-${id} >> ${log.path}`;
      // The CLI first, etcdctl waiting; then etcdctl first, the CLI waiting.
      const ours = runCli(["--endpoints", cluster.endpoints[0], key, "--", "sh", "-c", held("a")]);
      await until(() => log.lines().includes("start-a"), 15_000, "the CLI's command");
      const theirs = cluster.spawnEtcdctl(["lock", key, "--", "sh", "-c", held("b")]);
      await until(() => log.lines().includes("start-b"), 15_000, "etcdctl's command");
      const ours2 = runCli(["--endpoints", cluster.endpoints[0], key, "--", "sh", "-c", held("c")]);
      assert.equal((await ours).code, 0);
      assert.equal(await theirs.exited, 0, theirs.output);
      assert.equal((await ours2).code, 0);
      assert.deepEqual(log.lines(), [
        "start-a",
        "end-a",
        "start-b",
        "end-b",
        "start-c",
        "end-c",
      ]);
    } finally {
      log.remove();
    }
  });
});

describe("CLI on Redis", () => {
  let server: RedisServer;
  before(async () => {
    server = await RedisServer.start();
  });
  after(async () => {
    await server.stop();
  });

  behaviours({ backend: "redis", endpoints: () => server.endpoint, shortTtl: "1s" });
});

describe("CLI through a Redis restart", () => {
  let server: RedisServer;
  before(async () => {
    server = await RedisServer.start({ args: ["--appendonly", "yes", "--appendfsync", "always"] });
  });
  after(async () => {
    await server.stop();
  });

  it("does not stop the command for an outage the lease outlives", async () => {
    const key = prefix("cli-restart");
    const log = journal();
    try {
      const script = `echo start >> ${log.path}; sleep 4; echo end >> ${log.path}`;
      const run = runCli([
        "--backend",
        "redis",
        "--endpoints",
        server.endpoint,
        "--ttl",
        "5s",
        key,
        "--",
        "sh",
        "-c",
        script,
      ]);
      await until(() => log.lines().includes("start"), 15_000, "the command to start");
      await server.shutdown(); // SIGTERM: the AOF keeps the lock key
      await sleep(1_500); // a renewal (every 5 s / 3) fails meanwhile
      await server.restart();
      const { code, output } = await run;
      assert.equal(code, 0, output);
      assert.deepEqual(log.lines(), ["start", "end"]);
    } finally {
      log.remove();
    }
  });
});

describe("CLI and secrets", () => {
  let server: RedisServer;
  before(async () => {
    server = await RedisServer.start({ args: ["--requirepass", "cli-Secret-pw"] });
  });
  after(async () => {
    await server.stop();
  });

  it("never shows the password: not with --verbose, not on a refusal, not to the command", async () => {
    const key = prefix("cli-secret");
    const flags = ["--backend", "redis", "--endpoints", server.endpoint];
    const ok = await runCli([...flags, "--verbose", key, "--", "sh", "-c", "env"], {
      GENESIS_LOCK_PASSWORD: "cli-Secret-pw",
    });
    assert.equal(ok.code, 0, ok.output);
    assert.match(ok.output, /LOCK_HELD=1/);
    assert.match(ok.output, /holding lock/);
    assert.doesNotMatch(ok.output, /cli-Secret-pw/);
    const refused = await runCli([...flags, key, "--", "true"], {
      GENESIS_LOCK_PASSWORD: "cli-Wrong-pw",
    });
    assert.equal(refused.code, EXIT.denied, refused.output);
    assert.doesNotMatch(refused.output, /cli-Wrong-pw|cli-Secret-pw/);
    assert.doesNotMatch(refused.output, /\n\s+at /, "a stack trace");
  });
});

describe("CLI usage", () => {
  it("reads durations as 500ms, 10s, 1.5s, 2m and 1h, and refuses a bare number", () => {
    assert.equal(parseDuration("500ms", "--ttl"), 500);
    assert.equal(parseDuration("10s", "--ttl"), 10_000);
    assert.equal(parseDuration("1.5s", "--ttl"), 1_500);
    assert.equal(parseDuration("2m", "--ttl"), 120_000);
    assert.equal(parseDuration("1h", "--ttl"), 3_600_000);
    assert.throws(() => parseDuration("10", "--ttl"), /Invalid --ttl: expected a duration/);
  });

  it("exits 64 with one line for a bad flag, a missing command or a bad duration", async () => {
    for (
      const args of [
        ["--bogus", "/k", "--", "true"],
        ["--backend", "memory", "/k"],
        ["--backend", "memory", "--ttl", "ten", "/k", "--", "true"],
        ["--backend", "nosuch", "/k", "--", "true"],
      ]
    ) {
      const run = await runCli(args);
      assert.equal(run.code, EXIT.usage, `${args.join(" ")}: ${run.output}`);
      assert.match(run.output, /^genesis-lock: .+\n/);
      assert.doesNotMatch(run.output, /\n\s+at /, "a stack trace");
    }
  });

  it("exits 69 with what was tried and how to go on when no server answers", async () => {
    const run = await runCli([
      "--backend",
      "redis",
      "--endpoints",
      "127.0.0.1:1",
      "/k",
      "--",
      "true",
    ]);
    assert.equal(run.code, EXIT.unavailable, run.output);
    assert.match(run.output, /127\.0\.0\.1:1.*--backend memory/);
  });

  it("the demo, too, reports a bad flag or an unreachable server in one line, with no stack trace", async () => {
    const demo = new URL("../examples/demo.ts", import.meta.url).pathname;
    for (
      const [args, expected] of [
        [["--backend", "nosuch"], /Invalid option "backend"/],
        [["--bogus"], /Unknown option '--bogus'/],
        [["--backend", "redis", "--endpoints", "127.0.0.1:1"], /127\.0\.0\.1:1.*--backend memory/],
      ] as const
    ) {
      const child = runScript(demo, [...args]);
      const code = await child.exited;
      assert.equal(code, 1, child.output);
      const lines = child.output.trim().split("\n");
      assert.equal(lines.length, 1, child.output);
      assert.match(lines[0], /^demo: /);
      assert.match(lines[0], expected);
    }
  });

  it("documents every flag and exit code in --help", async () => {
    const run = await runCli(["--help"]);
    assert.equal(run.code, 0);
    for (
      const flag of ["--backend", "--endpoints", "--ttl", "--try", "--timeout", "--kill-after"]
    ) {
      assert.ok(run.output.includes(flag), flag);
    }
    for (const code of Object.values(EXIT)) {
      assert.ok(run.output.includes(` ${code} `) || run.output.includes(`${code}:`), String(code));
    }
  });
});
