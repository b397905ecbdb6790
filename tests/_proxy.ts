// A loopback TCP proxy for fault tests: it forwards to one server and can
// delay traffic (a slow link), hold it (a silent partition: nothing is
// forwarded and nothing is closed, as when packets stop), or cut every
// connection. Test-only code.

import { createServer, type Server, Socket } from "node:net";

/** One direction of one connection: chunks in order, each sent at its time. */
class Pipe {
  readonly #to: Socket;
  #queue: { chunk: Uint8Array | string; at: number }[] = [];
  #timer?: ReturnType<typeof setTimeout>;
  readonly #proxy: TcpProxy;
  /** Whether this pipe carries replies (server to client). */
  readonly #replies: boolean;

  constructor(to: Socket, proxy: TcpProxy, replies: boolean) {
    this.#to = to;
    this.#proxy = proxy;
    this.#replies = replies;
  }

  push(chunk: Uint8Array | string) {
    this.#queue.push({ chunk, at: performance.now() + this.#proxy.delayMs });
    this.flush();
  }

  /** Sends what is due, unless traffic is held; schedules the rest. */
  flush() {
    clearTimeout(this.#timer);
    const held = this.#proxy.held === "both" || (this.#proxy.held === "replies" && this.#replies);
    if (held || this.#to.destroyed) return;
    const now = performance.now();
    while (this.#queue.length > 0 && this.#queue[0].at <= now) {
      this.#to.write(this.#queue.shift()!.chunk);
    }
    if (this.#queue.length > 0) {
      this.#timer = setTimeout(() => this.flush(), this.#queue[0].at - now);
    }
  }

  stop() {
    clearTimeout(this.#timer);
    this.#queue = [];
  }
}

/** A proxy on a free loopback port in front of `target` (`host:port`). */
export class TcpProxy implements AsyncDisposable {
  readonly #server: Server;
  readonly #target: { host: string; port: number };
  readonly #connections = new Set<{ client: Socket; server: Socket; pipes: Pipe[] }>();
  /** Added to every chunk, both ways. */
  delayMs = 0;
  /** What is not forwarded now (it is kept, and sent on `release()`). */
  held: "none" | "both" | "replies" = "none";
  port = 0;

  private constructor(target: string) {
    const [host, port] = target.split(":");
    this.#target = { host, port: Number(port) };
    this.#server = createServer((client) => this.#accept(client));
  }

  /** Starts a proxy to `target` (`host:port`). */
  static async start(target: string): Promise<TcpProxy> {
    const proxy = new TcpProxy(target);
    await new Promise<void>((resolve, reject) => {
      proxy.#server.once("error", reject);
      proxy.#server.listen(0, "127.0.0.1", () => resolve());
    });
    proxy.port = (proxy.#server.address() as { port: number }).port;
    return proxy;
  }

  /** `127.0.0.1:port`, to give a client instead of the server's. */
  get endpoint(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** How many client connections are open through the proxy. */
  get connections(): number {
    return this.#connections.size;
  }

  #accept(client: Socket) {
    const server = new Socket();
    const up = new Pipe(server, this, false);
    const down = new Pipe(client, this, true);
    const connection = { client, server, pipes: [up, down] };
    this.#connections.add(connection);
    const end = () => {
      if (!this.#connections.delete(connection)) return;
      up.stop();
      down.stop();
      client.destroy();
      server.destroy();
    };
    client.on("data", (chunk) => up.push(chunk));
    server.on("data", (chunk) => down.push(chunk));
    for (const socket of [client, server]) {
      socket.on("error", end);
      socket.on("close", end);
    }
    server.connect(this.#target.port, this.#target.host);
  }

  /**
   * Holds traffic from now on: all of it (a silent partition), or only the
   * replies (requests reach the server and are applied; their answers wait).
   */
  hold(what: "both" | "replies" = "both"): void {
    this.held = what;
  }

  /** Forwards again, starting with what was held. */
  release(): void {
    this.held = "none";
    for (const connection of this.#connections) {
      for (const pipe of connection.pipes) pipe.flush();
    }
  }

  /** Closes every connection through the proxy (new ones are still accepted). */
  cut(): void {
    for (const connection of [...this.#connections]) {
      connection.client.destroy();
      connection.server.destroy();
    }
  }

  /** Stops listening and closes every connection. */
  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
