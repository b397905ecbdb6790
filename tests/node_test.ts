// Node users get this library through JSR's npm compatibility: the demo,
// bundled to JavaScript, must run on the machine's Node against every backend.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { mkdtempSync, rmSync } from "node:fs";
import { Child, EtcdCluster, RedisServer, requireBinary } from "./_servers.ts";

const root = new URL("..", import.meta.url).pathname;

describe("the bundled demo on Node", () => {
  // Inside node_modules, so Node resolves the bundle's bare "etcd3" and "ioredis"
  // imports from the repository's own install.
  let out: string;
  let demo: string;
  let cli: string;
  let etcd: EtcdCluster;
  let redis: RedisServer;
  before(async () => {
    requireBinary("node");
    out = mkdtempSync(join(root, "node_modules", ".genesis-node-"));
    execFileSync(join(root, "node_modules/.bin/deno"), [
      "bundle",
      "--external",
      "etcd3",
      "--external",
      "ioredis",
      "--outdir",
      out,
      join(root, "examples/demo.ts"),
      join(root, "cli.ts"),
    ], { cwd: root, stdio: "pipe" });
    demo = join(out, "examples", "demo.js");
    cli = join(out, "cli.js");
    [etcd, redis] = await Promise.all([EtcdCluster.start(), RedisServer.start()]);
  });
  after(async () => {
    await Promise.all([etcd?.stop(), redis?.stop()]);
    rmSync(out, { recursive: true, force: true });
  });

  it("runs the CLI: a command under the lock, its exit code, its token", async () => {
    const child = new Child("node", [
      cli,
      "--backend",
      "redis",
      "--endpoints",
      redis.endpoint,
      "/node/cli",
      "--",
      "sh",
      "-c",
      'echo "token $LOCK_TOKEN"; exit 5',
    ], { cwd: root });
    assert.equal(await child.exited, 5, child.output);
    assert.match(child.output, /token \d+/);
  });

  for (const backend of ["memory", "etcd", "redis"]) {
    it(`counts exactly under the ${backend} lock`, async () => {
      const endpoints = backend === "etcd"
        ? etcd.endpoints.join(",")
        : backend === "redis"
        ? redis.endpoint
        : "";
      const args = [demo, "--backend", backend, "--workers", "4", "--rounds", "10"];
      if (endpoints) args.push("--endpoints", endpoints);
      const child = new Child("node", args, { cwd: root });
      const code = await child.exited;
      assert.equal(code, 0, child.output);
      assert.match(
        child.output,
        new RegExp(`with the ${backend} lock: .* = 40 \\(expected 40, lost 0\\)`),
      );
      assert.match(child.output, /strictly increasing/);
    });
  }
});
