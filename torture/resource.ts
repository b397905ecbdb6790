// The fenced resource of the torture run: an HTTP server on 127.0.0.1 that
// keeps a counter and the highest fencing token it has accepted, rejects a
// write that carries a lower one, and logs every critical section as
// [token, enter, exit] on one monotonic clock (see clock()). Workers report their
// acquisitions, losses and unhandled rejections here too, so one process
// sees every event on one clock.

import { createServer, type IncomingMessage, type Server } from "node:http";

/**
 * Milliseconds on a clock every process of the run shares: each process's
 * monotonic clock from its start, placed on the wall clock once. Wall-clock
 * steps during the run do not move it.
 */
export function clock(): number {
  return performance.timeOrigin + performance.now();
}

/** One critical section: from the read under the lock to the write. */
export interface Section {
  worker: string;
  token: bigint;
  enter: number;
  exit: number;
  accepted: boolean;
  /** When the worker last saw `lease.signal` not aborted, before it wrote. */
  checkedAt: number;
}

/** Something a worker reported. */
export interface WorkerEvent {
  worker: string;
  kind: "acquired" | "released" | "lost" | "skipped" | "error" | "unhandled";
  detail: string;
  at: number;
}

/** The resource's state and its log. */
export class Resource {
  counter = 0;
  highest = -1n;
  readonly sections: Section[] = [];
  readonly events: WorkerEvent[] = [];
  readonly #open = new Map<string, { token: bigint; enter: number }>();
  /** The worker whose acquisition came last and has not released or lost since. */
  holder?: string;
  readonly #server: Server;
  port = 0;

  constructor() {
    this.#server = createServer(async (request, response) => {
      try {
        const body = JSON.parse(await readBody(request) || "{}");
        const reply = this.#handle(request.url ?? "", body);
        response.writeHead(reply.status, { "content-type": "application/json" });
        response.end(JSON.stringify(reply.body));
      } catch (error) {
        response.writeHead(400);
        response.end(JSON.stringify({ error: String(error) }));
      }
    });
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.port = (this.#server.address() as { port: number }).port;
  }

  close(): Promise<void> {
    this.#server.closeAllConnections?.();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }

  #handle(url: string, body: Record<string, string>): { status: number; body: unknown } {
    const now = clock();
    switch (url) {
      case "/read": {
        this.#open.set(body.worker, { token: BigInt(body.token), enter: now });
        return { status: 200, body: { counter: this.counter } };
      }
      case "/write": {
        const token = BigInt(body.token);
        const open = this.#open.get(body.worker);
        this.#open.delete(body.worker);
        const accepted = token > this.highest;
        if (accepted) {
          this.highest = token;
          this.counter = Number(body.value);
        }
        this.sections.push({
          worker: body.worker,
          token,
          enter: open?.token === token ? open.enter : now,
          exit: now,
          accepted,
          checkedAt: Number(body.checkedAt),
        });
        return { status: accepted ? 200 : 409, body: { accepted } };
      }
      case "/event": {
        const kind = body.kind as WorkerEvent["kind"];
        this.events.push({ worker: body.worker, kind, detail: body.detail ?? "", at: now });
        if (kind === "acquired") this.holder = body.worker;
        else if ((kind === "released" || kind === "lost") && this.holder === body.worker) {
          this.holder = undefined;
        }
        return { status: 200, body: {} };
      }
      case "/state":
        return {
          status: 200,
          body: { counter: this.counter, highest: String(this.highest), holder: this.holder },
        };
    }
    return { status: 404, body: {} };
  }
}

function readBody(request: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    request.setEncoding("utf8");
    request.on("data", (chunk) => text += chunk);
    request.on("end", () => resolve(text));
    request.on("error", reject);
  });
}
