import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { LeaseClock, type Renewal } from "../_lease_clock.ts";
import { sleep, until } from "./_util.ts";

/** A clock whose renewals answer from a script, recording what happened. */
function scripted(answers: (() => Renewal)[], options: { period?: number; ttl?: number } = {}) {
  const ttl = options.ttl ?? 200;
  const events: string[] = [];
  let calls = 0;
  const clock = new LeaseClock({
    deadline: performance.now() + ttl,
    period: options.period ?? 40,
    retry: 10,
    renew: () => {
      const answer = (answers[calls] ?? answers[answers.length - 1])();
      calls++;
      events.push("ok" in answer ? (answer.ok ? "renewed" : "failed") : "refused");
      return Promise.resolve(answer);
    },
    lapse: (detail) => events.push(`lost: ${detail}`),
    expired: "ran out",
  });
  return { clock, events, calls: () => calls };
}

describe("LeaseClock", () => {
  it("renews every period and keeps the lease past its first deadline", async () => {
    const { clock, events } = scripted([() => ({ ok: true, deadline: performance.now() + 200 })]);
    await sleep(450);
    assert.equal(clock.ended, false);
    assert.ok(events.filter((e) => e === "renewed").length >= 5, events.join(","));
    clock.stop();
  });

  it("loses the lease at its deadline when no renewal is confirmed, retrying meanwhile", async () => {
    const started = performance.now();
    const { clock, events } = scripted([() => ({ ok: false })], { ttl: 150 });
    await until(() => clock.ended, 1_000, "the loss");
    const at = performance.now() - started;
    assert.ok(at >= 145 && at < 500, `lost after ${at.toFixed(0)} ms`);
    assert.equal(events.at(-1), "lost: ran out");
    // After the first failure, retries come every 10 ms, not every period.
    assert.ok(events.filter((e) => e === "failed").length >= 5, events.join(","));
  });

  it("says in the loss why the last renewal before the deadline was not confirmed", async () => {
    const { clock, events } = scripted([
      () => ({ ok: false, why: "the first went unanswered" }),
      () => ({ ok: true, deadline: performance.now() + 60 }),
      () => ({ ok: false, why: "0 of 1 replicas acknowledged" }),
    ], { ttl: 150 });
    await until(() => clock.ended, 1_000, "the loss");
    assert.equal(events.at(-1), "lost: ran out (0 of 1 replicas acknowledged)");
  });

  it("loses the lease at once when the server refuses a renewal", async () => {
    const { clock, events } = scripted([
      () => ({ ok: true, deadline: performance.now() + 200 }),
      () => ({ lost: "its key was deleted" }),
    ]);
    await until(() => clock.ended, 1_000, "the loss");
    assert.deepEqual(events, ["renewed", "refused", "lost: its key was deleted"]);
  });

  it("decides an overdue loss on check(), before any timer runs", () => {
    const events: string[] = [];
    const clock = new LeaseClock({
      deadline: performance.now() - 1,
      period: 1_000,
      retry: 1_000,
      lapse: (detail) => events.push(detail),
      expired: "ran out",
    });
    assert.equal(clock.check(), true);
    assert.deepEqual(events, ["ran out"]);
    assert.equal(clock.check(), true, "a second check reports the same loss");
    assert.deepEqual(events, ["ran out"], "and does not lapse twice");
  });

  it("stops renewing on stopRenewing() and runs out at its deadline", async () => {
    const { clock, events, calls } = scripted([() => ({
      ok: true,
      deadline: performance.now() + 100,
    })], { ttl: 100, period: 20 });
    clock.stopRenewing();
    await clock.renewNow(); // the deadline now counts from here
    const renewedAt = performance.now();
    await until(() => clock.ended, 1_000, "the loss");
    const at = performance.now() - renewedAt;
    assert.equal(calls(), 1, "renewed only when told to");
    assert.ok(at >= 95 && at < 500, `lost ${at.toFixed(0)} ms after the last renewal`);
    assert.equal(events.at(-1), "lost: ran out");
  });

  it("reports nothing after stop()", async () => {
    const { clock, events } = scripted([() => ({ ok: false })], { ttl: 50 });
    clock.stop();
    await sleep(100);
    assert.deepEqual(events, []);
    assert.equal(clock.check(), true);
  });
});
