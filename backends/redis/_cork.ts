// One socket write per tick: the commands a tick sends to one Redis go out together.

import process from "node:process";
import type { Client } from "./_connection.ts";

/** The part of a Node socket that corking needs (ioredis `client.stream`). */
interface Corkable {
  cork(): void;
  uncork(): void;
}

/**
 * Corks a connection's socket for the rest of the current tick, so that the
 * commands written to it meanwhile leave in one `writev` instead of one
 * `send` each. ioredis writes every command at once; with 64 workers woken by
 * one batch of replies, that is 64 system calls where one does, and on this
 * machine a send costs more client CPU than the whole library's share of a
 * cycle. The socket is uncorked by `process.nextTick`, which runs once the
 * microtasks queued so far are done (Deno, Bun and Node alike): a lone
 * command waits for no timer and no I/O poll. A Cluster client is left
 * alone: its commands go to the node sockets it picks per slot.
 */
export class Corker {
  #corked: Corkable[] = [];
  readonly #uncork = () => {
    const corked = this.#corked;
    this.#corked = [];
    for (const stream of corked) stream.uncork();
  };

  /** Corks `client`'s socket until the end of this tick, once. */
  cork(client: Client): void {
    const stream = (client as { stream?: Corkable }).stream;
    if (stream === undefined || typeof stream.cork !== "function") return;
    const corked = this.#corked;
    if (corked.includes(stream)) return;
    if (corked.length === 0) process.nextTick(this.#uncork);
    stream.cork();
    corked.push(stream);
  }
}
