import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { New, type Options } from "../mod.ts";

function rejects(options: unknown, name: "TypeError" | "RangeError", message: RegExp | string) {
  assert.throws(() => New(options as Options), (error: Error) => {
    assert.equal(error.name, name);
    if (typeof message === "string") assert.equal(error.message, message);
    else assert.match(error.message, message);
    return true;
  });
}

describe("New() options", () => {
  it("accepts no options, an empty object and zero values, without any I/O", async () => {
    for (const options of [undefined, {}, { ttl: 0, dialTimeout: 0, endpoints: [] }]) {
      const locker = New({ ...options, backend: "memory" });
      await locker.close();
    }
  });

  it("names an unknown option and lists the known ones", () => {
    rejects({ tll: 5 }, "TypeError", /^Unknown option "tll": expected one of backend, endpoints,/);
    rejects({ tls: { cafile: "x" } }, "TypeError", /^Unknown option "tls.cafile"/);
  });

  it("names a bad backend and what it received", () => {
    rejects(
      { backend: "zookeeper" },
      "TypeError",
      'Invalid option "backend": expected "etcd", "redis" or "memory", received "zookeeper"',
    );
  });

  it("names a duration of the wrong type or out of range", () => {
    rejects(
      { ttl: "10s" },
      "TypeError",
      'Invalid option "ttl": expected a number of milliseconds, received "10s"',
    );
    rejects(
      { ttl: -1 },
      "RangeError",
      /^Invalid option "ttl": expected a whole number .* received -1$/,
    );
    rejects({ dialTimeout: 1.5 }, "RangeError", /"dialTimeout".* received 1.5$/);
    rejects({ retryInterval: 2 ** 31 }, "RangeError", /"retryInterval".* received 2147483648$/);
    rejects({ ttl: NaN }, "RangeError", /"ttl".* received NaN$/);
  });

  it("names a bad endpoint by its index", () => {
    rejects(
      { endpoints: "127.0.0.1:2379" },
      "TypeError",
      /^Invalid option "endpoints": expected an array/,
    );
    rejects(
      { endpoints: ["127.0.0.1:2379", "no-port"] },
      "TypeError",
      'Invalid option "endpoints[1]": expected "host:port", received "no-port"',
    );
  });

  it("never echoes a password or a TLS key, even a mistyped one", () => {
    rejects(
      { password: 12345678 },
      "TypeError",
      'Invalid option "password": expected a string, received a number',
    );
    rejects(
      { tls: { key: 987654 } },
      "TypeError",
      'Invalid option "tls.key": expected a string, received a number',
    );
  });

  it("checks autoRenew, tls and the options object itself", () => {
    rejects(
      { autoRenew: "yes" },
      "TypeError",
      'Invalid option "autoRenew": expected a boolean, received "yes"',
    );
    rejects({ tls: "on" }, "TypeError", /^Invalid option "tls": expected a boolean or an object/);
    rejects("memory", "TypeError", 'Invalid options: expected an object, received "memory"');
    rejects([], "TypeError", "Invalid options: expected an object, received an array");
  });
});
