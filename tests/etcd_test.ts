import { after, before, describe } from "./_bdd.ts";
import { Etcd3 } from "etcd3";
import { New } from "../mod.ts";
import { conformance } from "./_conformance.ts";
import { EtcdCluster } from "./_servers.ts";

let cluster: EtcdCluster;
let probe: Etcd3;

describe("etcd backend", () => {
  before(async () => {
    cluster = await EtcdCluster.start();
    probe = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  });
  after(async () => {
    probe.close();
    await cluster.stop();
  });

  conformance({
    name: "etcd",
    locker: (options) => New({ backend: "etcd", endpoints: cluster.endpoints, ...options }),
    // The test cluster's short election timeout lets etcd grant 1 s leases.
    shortTtl: 1_000,
    fifoAcrossLockers: true,
    leftovers: (keyPrefix) => probe.getAll().prefix(keyPrefix).count(),
  });
});
