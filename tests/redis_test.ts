import { after, before, describe } from "./_bdd.ts";
import { Redis } from "ioredis";
import { New } from "../mod.ts";
import { conformance } from "./_conformance.ts";
import { RedisServer } from "./_servers.ts";

let server: RedisServer;
let probe: Redis;

/** Lock keys (not fencing counters, which outlive locks by design) under a prefix. */
async function lockKeys(keyPrefix: string): Promise<number> {
  const keys = await probe.keys(`lock:{${keyPrefix}*`);
  return keys.filter((k) => !k.endsWith(":fence")).length;
}

describe("redis backend", () => {
  before(async () => {
    server = await RedisServer.start();
    probe = new Redis({ host: "127.0.0.1", port: server.port });
  });
  after(async () => {
    probe.disconnect();
    await server.stop();
  });

  conformance({
    name: "redis",
    locker: (options) => New({ backend: "redis", endpoints: [server.endpoint], ...options }),
    shortTtl: 300,
    fifoAcrossLockers: false,
    leftovers: lockKeys,
  });
});
