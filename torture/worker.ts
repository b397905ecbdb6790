// One torture worker, in its own process (Deno or Bun): lock, read the
// counter, sleep 0-20 ms, write counter + 1 with the lease's token, release;
// until SIGTERM. Usage: worker.ts ID BACKEND ENDPOINTS KEY TTL RESOURCE_PORT.

import process from "node:process";
import { type Backend, type Lease, New } from "../mod.ts";
import { clock } from "./resource.ts";

const [id, backend, endpoints, key, ttl, port] = process.argv.slice(2);
const base = `http://127.0.0.1:${port}`;

async function post(path: string, body: Record<string, string | number>): Promise<Response> {
  const response = await fetch(`${base}${path}`, {
    method: "POST",
    body: JSON.stringify({ worker: id, ...body }),
  });
  await response.body?.cancel();
  return response;
}

async function report(kind: string, detail = ""): Promise<void> {
  await post("/event", { kind, detail }).catch(() => {});
}

process.on("unhandledRejection", (reason) => {
  void report("unhandled", String(reason));
});

let stopping = false;
process.on("SIGTERM", () => stopping = true);

const locker = New({
  backend: backend as Backend,
  endpoints: endpoints.split(","),
  ttl: Number(ttl),
  retryInterval: 100,
});

async function once(): Promise<void> {
  let lease: Lease;
  try {
    lease = await locker.lock(key, { timeout: 5_000 });
  } catch (error) {
    // During faults a wait can time out or a server can be unreachable: try again.
    await report("error", (error as Error).name + ": " + (error as Error).message);
    await new Promise((resolve) => setTimeout(resolve, 100));
    return;
  }
  lease.signal.addEventListener("abort", () => {
    void report("lost", String((lease.signal.reason as Error)?.message));
  }, { once: true });
  await report("acquired", String(lease.token));
  try {
    const read = await fetch(`${base}/read`, {
      method: "POST",
      body: JSON.stringify({ worker: id, token: String(lease.token) }),
    });
    const { counter } = await read.json() as { counter: number };
    await new Promise((resolve) => setTimeout(resolve, Math.random() * 20));
    if (lease.signal.aborted) {
      await report("skipped", "the lock was lost before the write");
    } else {
      const checkedAt = clock();
      await post("/write", { token: String(lease.token), value: counter + 1, checkedAt });
    }
  } finally {
    const lost = lease.signal.aborted;
    await lease.release().catch(() => {});
    if (!lost) await report("released");
  }
}

while (!stopping) await once();
await locker.close().catch(() => {});
console.log("STOPPED");
process.exit(0);
