// etcd with authentication and with TLS, on servers the tests configure.

import { after, before, describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { LockAuthError, LockConnectionError, LockError, LockPermissionError, New } from "../mod.ts";
import { EtcdCluster, makeCerts, type TestCerts } from "./_servers.ts";
import { assertExitsAfterClose } from "./_scenarios.ts";
import { prefix } from "./_util.ts";

const ROOT = "root-pw-9f1c";
const PASSWORD = "app-Secret-7d3e";
const WRONG = "not-the-Password-5b2a";

/** Everything a caller or a log could see of an error, cause and hidden fields included. */
function everything(error: unknown): string {
  return inspect(error, { depth: Infinity, showHidden: true }) + String(error) +
    JSON.stringify(error);
}

// npm:etcd3 exchanges the password for a token through a gRPC client it makes
// for the purpose and never closes; that client's timers are unref'd (the exit
// test below shows they do not hold the process), but Deno's sanitizer counts them.
describe("etcd with authentication", { sanitizeOps: false, sanitizeResources: false }, () => {
  let cluster: EtcdCluster;
  before(async () => {
    cluster = await EtcdCluster.start();
    cluster.etcdctl(["user", "add", `root:${ROOT}`]);
    cluster.etcdctl(["auth", "enable"]);
    const root = [`--user=root:${ROOT}`];
    cluster.etcdctl(["role", "add", "locker"], root);
    cluster.etcdctl(
      ["role", "grant-permission", "locker", "--prefix=true", "readwrite", "/app/"],
      root,
    );
    cluster.etcdctl(["user", "add", `app:${PASSWORD}`], root);
    cluster.etcdctl(["user", "grant-role", "app", "locker"], root);
  });
  after(async () => {
    await cluster.stop();
  });

  it("locks with the right password", async () => {
    const locker = New({ endpoints: cluster.endpoints, username: "app", password: PASSWORD });
    const lease = await locker.lock(`/app${prefix()}`);
    assert.ok(lease.token > 0n);
    await locker.close();
  });

  it("rejects a wrong password with a LockAuthError at once, naming the user and not the password", async () => {
    const locker = New({ endpoints: cluster.endpoints, username: "app", password: WRONG });
    const started = performance.now();
    const error = await locker.lock(`/app${prefix()}`).catch((e) => e);
    const elapsed = performance.now() - started;
    assert.ok(error instanceof LockAuthError, inspect(error));
    assert.match(error.message, /etcd rejected the credentials of user "app"/);
    assert.ok(elapsed < 1_000, `took ${elapsed.toFixed(0)} ms: retried?`);
    const seen = everything(error);
    assert.ok(!seen.includes(WRONG), `the password is in the error:\n${seen}`);
    // A second call makes one new attempt and fails the same way, just as fast.
    const again = performance.now();
    await assert.rejects(locker.tryLock(`/app${prefix()}`), LockAuthError);
    assert.ok(performance.now() - again < 1_000);
    await locker.close();
  });

  it("lets the process exit by itself after close()", async () => {
    const target = {
      backend: "etcd" as const,
      endpoints: cluster.endpoints,
      env: { GENESIS_USERNAME: "app", GENESIS_PASSWORD: PASSWORD },
    };
    await assertExitsAfterClose(target, "exit", `/app${prefix()}`);
  });

  it("rejects a key outside the user's role with a LockPermissionError", async () => {
    const locker = New({ endpoints: cluster.endpoints, username: "app", password: PASSWORD });
    const key = `/other${prefix()}`;
    const error = await locker.lock(key).catch((e) => e);
    assert.ok(error instanceof LockPermissionError, inspect(error));
    assert.equal(
      error.message,
      `Cannot acquire lock ${JSON.stringify(key)}: permission denied by etcd`,
    );
    assert.ok(!everything(error).includes(PASSWORD));
    // The locker still works for keys the role allows.
    const lease = await locker.lock(`/app${prefix()}`);
    await lease.release();
    await locker.close();
  });
});

describe("etcd over TLS", () => {
  let cluster: EtcdCluster;
  let certs: TestCerts;
  before(async () => {
    certs = makeCerts();
    cluster = await EtcdCluster.start({ tls: { cert: certs.cert, key: certs.key, ca: certs.ca } });
  });
  after(async () => {
    await cluster.stop();
    certs.remove();
  });

  it("locks over TLS when given the CA that signed the server's certificate", async () => {
    const tls = { ca: certs.caPem, serverName: "localhost" };
    const locker = New({ endpoints: cluster.endpoints, tls });
    const name = prefix("tls");
    const lease = await locker.lock(name);
    const other = New({ endpoints: cluster.endpoints, tls, ttl: 5_000 });
    assert.equal(await other.tryLock(name), undefined);
    await lease.release();
    await Promise.all([locker.close(), other.close()]);
  });
});

describe("etcd over mutual TLS", () => {
  let cluster: EtcdCluster;
  let certs: TestCerts;
  before(async () => {
    certs = makeCerts();
    cluster = await EtcdCluster.start({
      tls: { cert: certs.cert, key: certs.key, ca: certs.ca, clientCertAuth: true },
    });
  });
  after(async () => {
    await cluster.stop();
    certs.remove();
  });

  it("locks with a client certificate the server's CA signed", async () => {
    // The test certificate is valid for both ends (serverAuth and clientAuth).
    const locker = New({
      endpoints: cluster.endpoints,
      tls: { ca: certs.caPem, cert: certs.certPem, key: certs.keyPem, serverName: "localhost" },
    });
    const lease = await locker.lock(prefix("mtls"));
    assert.ok(lease.token > 0n);
    await locker.close();
  });
});

// grpc-js leaves unref'd reconnect timers behind a channel whose connect
// failed (see etcd_test.ts); they do not hold the process open.
describe("etcd over TLS, refused", { sanitizeOps: false, sanitizeResources: false }, () => {
  let cluster: EtcdCluster;
  let certs: TestCerts;
  before(async () => {
    certs = makeCerts();
    cluster = await EtcdCluster.start({ tls: { cert: certs.cert, key: certs.key, ca: certs.ca } });
  });
  after(async () => {
    await cluster.stop();
    certs.remove();
  });

  it("refuses a server certificate that no trusted CA signed", async () => {
    const locker = New({
      endpoints: cluster.endpoints,
      tls: { serverName: "localhost" },
      dialTimeout: 1_000,
    });
    const error = await locker.lock(prefix("untrusted")).catch((e) => e);
    assert.ok(error instanceof LockConnectionError, inspect(error));
    await locker.close();
  });

  it("says to set tls.serverName when the runtime refuses an IP address as server name", async () => {
    // Deno's and Bun's TLS refuse an IP as SNI name; grpc-js always sends the host.
    const locker = New({
      endpoints: cluster.endpoints,
      tls: { ca: certs.caPem },
      dialTimeout: 1_000,
    });
    const error = await locker.lock(prefix("ip")).catch((e) => e);
    assert.ok(error instanceof LockConnectionError, inspect(error));
    assert.match(error.message, /set tls\.serverName to a DNS name in the server's certificate/);
    await locker.close();
  });

  it("is refused without a client certificate by a server that demands one", async () => {
    const strict = await EtcdCluster.start({
      tls: { cert: certs.cert, key: certs.key, ca: certs.ca, clientCertAuth: true },
    });
    try {
      const locker = New({
        endpoints: strict.endpoints,
        tls: { ca: certs.caPem, serverName: "localhost" },
        dialTimeout: 1_000,
      });
      const error = await locker.lock(prefix("no-cert")).catch((e) => e);
      assert.ok(error instanceof LockConnectionError, inspect(error));
      await locker.close();
    } finally {
      await strict.stop();
    }
  });

  it("fails to speak plain gRPC to a TLS server", async () => {
    const locker = New({ endpoints: cluster.endpoints, dialTimeout: 1_000 });
    const error = await locker.lock(prefix("plain")).catch((e) => e);
    assert.ok(error instanceof LockError, inspect(error));
    await locker.close();
  });
});
