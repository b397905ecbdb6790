// Cross-process scenarios that every server backend must pass, each run in a
// child process of the runtime under test (tests/fixtures/holder.ts).

import assert from "node:assert/strict";
import { type Backend, type Lease, type Locker, New } from "../mod.ts";
import { runScript } from "./_servers.ts";
import { prefix, sleep, until, within } from "./_util.ts";

const fixture = new URL("./fixtures/holder.ts", import.meta.url).pathname;

/** Where the child connects, and as whom. */
export interface Target {
  backend: Backend;
  endpoints: string[];
  /** GENESIS_USERNAME / GENESIS_PASSWORD for the child, if any. */
  env?: Record<string, string>;
}

/**
 * Runs the fixture in `mode` ("exit" or "refused") and asserts that, once it
 * printed CLOSED, the process ends by itself: close() left nothing running.
 */
export async function assertExitsAfterClose(
  target: Target,
  mode: "exit" | "refused",
  key = prefix(mode),
): Promise<void> {
  const child = runScript(
    fixture,
    [mode, target.backend, target.endpoints.join(","), key, "5000"],
    target.env,
  );
  await child.waitFor(/CLOSED/, 20_000);
  const code = await within(child.exited, 5_000, "still running");
  if (code === "still running") await child.stop();
  assert.equal(code, 0, `the process did not exit after close():\n${child.output}`);
}

/**
 * A holder in a child process with a 1 s lease is stopped (SIGSTOP) past
 * its TTL: another locker acquires with a greater token, and after SIGCONT
 * the child's first output is the loss, never a tick that still believes.
 */
export async function assertPausedHolderLoses(target: Target, lost: RegExp): Promise<void> {
  const name = prefix("paused");
  const child = runScript(
    fixture,
    ["hold", target.backend, target.endpoints.join(","), name, "1000"],
    target.env,
  );
  try {
    const [, token] = await child.waitFor(/HELD (\d+)/, 20_000);
    await child.waitFor(/TICK false/);
    child.signal("SIGSTOP");
    await sleep(100); // let the pipe deliver what the child printed before it stopped
    const mark = child.output.length;
    const locker = New({ backend: target.backend, endpoints: target.endpoints });
    const started = performance.now();
    const lease = await locker.lock(name, { timeout: 10_000 });
    const waited = performance.now() - started;
    assert.ok(lease.token > BigInt(token), `token ${lease.token} after ${token}`);
    assert.ok(
      waited < 5_000,
      `the paused holder's 1 s lease kept the lock ${waited.toFixed(0)} ms`,
    );
    child.signal("SIGCONT");
    await child.waitFor(/LOST/, 5_000);
    const resumed = child.output.slice(mark).trim().split("\n");
    assert.match(resumed[0], lost, resumed.join("\n"));
    assert.ok(!resumed.includes("TICK false"), "the paused holder still believed it held the lock");
    await lease.release();
    await locker.close();
  } finally {
    await child.stop();
  }
}

/** What {@linkcode assertKeptThroughFailover} needs of the failover test. */
export interface FailedOver {
  /** The server that now serves the lock's key. */
  promoted: { cli(args: string[]): string };
  /** What the new server is called in messages ("master", "primary"). */
  role: string;
  name: string;
  lease: Lease;
  holder: Locker;
  competitor: Locker;
  /** When the old server was killed (`performance.now()`), and the lease's ttl. */
  killedAt: number;
  ttl: number;
}

/**
 * After a Redis failover: a renewal reaches the promoted server (the key's
 * PTTL rises), a competitor stays out past the deadline the last renewal
 * before the kill gave, and the next holder's token is greater. Closes both
 * lockers.
 */
export async function assertKeptThroughFailover(f: FailedOver): Promise<void> {
  const key = `lock:{${f.name}}`;
  // (Between two samples: a renewal just before the first would leave nothing to rise.)
  let last = Number(f.promoted.cli(["PTTL", key]));
  await until(
    () => {
      const now = Number(f.promoted.cli(["PTTL", key]));
      const rose = now > last + 100;
      last = now;
      return rose;
    },
    15_000,
    `a renewal on the new ${f.role}`,
  );
  assert.equal(await f.competitor.tryLock(f.name), undefined);
  // Past the deadline of the last renewal before the kill: renewed since, so still held.
  const wait = f.ttl - (performance.now() - f.killedAt) + 500;
  if (wait > 0) await sleep(wait);
  assert.equal(f.lease.signal.aborted, false, String(f.lease.signal.reason));
  assert.equal(await f.competitor.tryLock(f.name), undefined);
  await f.lease.release();
  const next = await f.competitor.lock(f.name, { timeout: 10_000 });
  assert.ok(next.token > f.lease.token, `${next.token} after ${f.lease.token}`);
  await next.release();
  await Promise.all([f.holder.close(), f.competitor.close()]);
}
