// The shared Locker's own helpers, without a server.

import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import process from "node:process";
import { abortable } from "../_locker.ts";
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
