// One socket write per tick: the commands a tick sends to one Redis go out together.

import process from "node:process";
import { Cluster } from "ioredis";
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
 * command waits for no timer and no I/O poll. On a Cluster every master's
 * socket is corked, since a tick's commands go to the nodes that serve
 * their slots: a renewal pass of 3,000 locks over 3 masters (a script per
 * slot, ~1,000 a master) reached each master in ~450 socket reads, and
 * corked in ~12 (as many as the server's 16 KB read buffer needs).
 */
export class Corker {
  #corked: Corkable[] = [];
  /** The Clusters whose masters are corked this tick. */
  #clusters: Cluster[] = [];
  readonly #uncork = () => {
    const corked = this.#corked;
    this.#corked = [];
    this.#clusters = [];
    for (const stream of corked) stream.uncork();
  };

  /** Corks `client`'s socket (a Cluster's: its masters') until the end of this tick, once. */
  cork(client: Client): void {
    if (!(client instanceof Cluster)) return this.#cork(client);
    if (this.#clusters.includes(client)) return;
    for (const node of client.nodes("master")) this.#cork(node);
    // Once the first socket is corked, so that the uncork clears the list.
    if (this.#corked.length > 0) this.#clusters.push(client);
  }

  #cork(client: Client): void {
    const stream = (client as { stream?: Corkable }).stream;
    if (stream === undefined || typeof stream.cork !== "function") return;
    const corked = this.#corked;
    if (corked.includes(stream)) return;
    if (corked.length === 0) process.nextTick(this.#uncork);
    stream.cork();
    corked.push(stream);
  }
}
