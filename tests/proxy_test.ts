// The fault tests' TCP proxy: it forwards, delays, holds and cuts.

import { describe, it } from "./_bdd.ts";
import assert from "node:assert/strict";
import { createConnection, createServer, type Socket } from "node:net";
import { TcpProxy } from "./_proxy.ts";
import { isPending } from "./_util.ts";

/** An echo server on a free loopback port. */
async function echoServer() {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("data", (chunk) => socket.write(chunk));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  return {
    endpoint: `127.0.0.1:${port}`,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A client socket and a promise for its next chunk of data. */
async function dial(port: number) {
  const socket = createConnection(port, "127.0.0.1");
  await new Promise<void>((resolve) => socket.once("connect", resolve));
  return {
    socket,
    ask(text: string) {
      const reply = new Promise<string>((resolve) =>
        socket.once("data", (d) => resolve(String(d)))
      );
      socket.write(text);
      return reply;
    },
  };
}

describe("TcpProxy (test tool)", () => {
  it("forwards, delays, holds (both ways or replies only) until released, and cuts connections", async () => {
    const echo = await echoServer();
    const proxy = await TcpProxy.start(echo.endpoint);
    const client = await dial(proxy.port);
    try {
      assert.equal(await client.ask("a"), "a");
      proxy.delayMs = 150;
      const started = performance.now();
      assert.equal(await client.ask("b"), "b");
      assert.ok(performance.now() - started >= 250, "a delay each way");
      proxy.delayMs = 0;
      proxy.hold();
      const held = client.ask("c");
      assert.ok(await isPending(held, 20), "held traffic was forwarded");
      proxy.release();
      assert.equal(await held, "c");
      proxy.hold("replies");
      const answered = client.ask("d");
      assert.ok(await isPending(answered, 20), "a held reply was forwarded");
      proxy.release();
      assert.equal(await answered, "d");
      const closed = new Promise((resolve) => client.socket.once("close", resolve));
      proxy.cut();
      await closed;
      assert.equal(proxy.connections, 0);
    } finally {
      client.socket.destroy();
      await proxy.close();
      await echo.close();
    }
  });
});
