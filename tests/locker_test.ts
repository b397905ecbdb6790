// The shared Locker's own helpers, without a server.

import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import process from "node:process";
import { abortable, onAbort } from "../_locker.ts";
import { sleep } from "./_util.ts";

describe("abortable()", () => {
  it("leaves no unhandled rejection behind when its signal had already aborted", async () => {
    const unhandled: unknown[] = [];
    const listener = (reason: unknown) => unhandled.push(reason);
    process.on("unhandledRejection", listener);
    try {
      const gone = AbortSignal.abort(new Error("given up"));
      let fail!: (error: Error) => void;
      const work = new Promise<void>((_, reject) => fail = reject);
      await assert.rejects(abortable(work, gone), /given up/);
      // The work it gave up on fails later, as a race it was handed does.
      fail(new Error("the abandoned work failed"));
      await sleep(20);
      assert.deepEqual(unhandled.map(String), []);
    } finally {
      process.off("unhandledRejection", listener);
    }
  });

  it("rejects with the signal's reason when it aborts first, and resolves otherwise", async () => {
    const controller = new AbortController();
    const never = new Promise<void>(() => {});
    const pending = abortable(never, controller.signal);
    controller.abort(new Error("stop"));
    await assert.rejects(pending, /stop/);
    assert.equal(await abortable(Promise.resolve(7), new AbortController().signal), 7);
  });
});

describe("onAbort()", () => {
  it("calls what still waits, once, in the order it began, and nothing after stop()", () => {
    const controller = new AbortController();
    const calls: string[] = [];
    onAbort(controller.signal, () => calls.push("first"));
    const stopped = onAbort(controller.signal, () => calls.push("stopped"));
    const twice = () => calls.push("twice");
    onAbort(controller.signal, twice);
    onAbort(controller.signal, twice);
    onAbort(new AbortController().signal, () => calls.push("another signal"));
    stopped();
    controller.abort(new Error("stop"));
    controller.abort(new Error("again"));
    assert.deepEqual(calls, ["first", "twice", "twice"]);
    // A signal that has aborted already never calls back: the caller checks.
    onAbort(controller.signal, () => calls.push("late"))();
    onAbort(AbortSignal.abort(), () => calls.push("late"));
    assert.deepEqual(calls, ["first", "twice", "twice"]);
  });
});
