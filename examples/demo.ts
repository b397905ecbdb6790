/**
 * The lost-update demo: many workers increment one counter with an await
 * between the read and the write, first with no lock, then under the lock.
 *
 *     deno task demo                                  # memory backend
 *     deno task demo --backend etcd --endpoints 127.0.0.1:2379 --workers 8
 *
 * @module
 */

import { parseArgs } from "node:util";
import process from "node:process";
import { type Backend, LockConnectionError, New } from "../mod.ts";

/** Prints one line on stderr and ends the demo: no stack trace for a newcomer's typo. */
function fail(message: string): never {
  console.error(`demo: ${message}`);
  process.exit(1);
}

let values;
try {
  ({ values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      backend: { type: "string", default: "memory" },
      endpoints: { type: "string" },
      workers: { type: "string", default: "8" },
      rounds: { type: "string", default: "25" },
    },
  }));
} catch (error) {
  fail(
    `${
      (error as Error).message.replace(/\. To specify.*$/, "")
    } (flags: --backend, --endpoints, --workers, --rounds)`,
  );
}
const workers = Number(values.workers);
const rounds = Number(values.rounds);
if (!(Number.isInteger(workers) && workers > 0 && Number.isInteger(rounds) && rounds > 0)) {
  fail(
    `--workers and --rounds take whole numbers above 0, received ${values.workers} and ${values.rounds}`,
  );
}
const options = {
  backend: values.backend as Backend,
  endpoints: values.endpoints?.split(","),
};
try {
  // Checks the options at once, and connects: a wrong flag or a missing server
  // is reported here, before any work starts.
  const probe = New(options);
  await probe.tryLock(`/demo/probe/${crypto.randomUUID()}`).then((lease) => lease?.release());
  await probe.close();
} catch (error) {
  const message = (error as Error).message;
  if (error instanceof LockConnectionError) {
    const server = options.backend === "redis" ? "redis-server" : "etcd";
    fail(
      `${message}; start ${server} there, give its address with --endpoints, or use --backend memory`,
    );
  }
  fail(message);
}

/** A read-modify-write with an await in the middle, the classic race. */
async function increment(counter: { value: number }) {
  const read = counter.value;
  await new Promise((resolve) => setTimeout(resolve, Math.random() * 2));
  counter.value = read + 1;
}

const expected = workers * rounds;

const unlocked = { value: 0 };
await Promise.all(Array.from({ length: workers }, async () => {
  for (let i = 0; i < rounds; i++) await increment(unlocked);
}));
console.log(
  `without a lock: ${workers} workers x ${rounds} increments = ${unlocked.value} (expected ${expected}, lost ${
    expected - unlocked.value
  })`,
);

const key = `/demo/counter/${crypto.randomUUID()}`;
const locked = { value: 0 };
const tokens: bigint[] = [];
// One locker per worker, as if each were its own process; equal options share one client.
const lockers = Array.from({ length: workers }, () => New(options));
const started = performance.now();
await Promise.all(lockers.map(async (locker) => {
  for (let i = 0; i < rounds; i++) {
    await locker.withLock(key, async (lease) => {
      tokens.push(lease.token);
      await increment(locked);
    }, { timeout: 30_000 });
  }
}));
const seconds = (performance.now() - started) / 1000;
await Promise.all(lockers.map((locker) => locker.close()));

const increasing = tokens.every((token, i) => i === 0 || token > tokens[i - 1]);
console.log(
  `with the ${options.backend} lock: ${workers} workers x ${rounds} increments = ${locked.value} (expected ${expected}, lost ${
    expected - locked.value
  })`,
);
console.log(
  `fencing tokens: ${tokens.slice(0, 3).join(", ")} ... ${tokens.at(-1)} (${tokens.length}, ${
    increasing ? "strictly increasing" : "NOT increasing"
  })`,
);
console.log(`throughput: ${(expected / seconds).toFixed(0)} locked increments/s`);
if (locked.value !== expected || !increasing) process.exitCode = 1;
