// One socket write per tick: the commands a tick sends to one Redis go out together.

import process from "node:process";
import { Cluster } from "ioredis";
import type { Client } from "./_connection.ts";

/** The part of a Node socket that batching needs (ioredis `client.stream`). */
interface Writable {
  write(chunk: unknown, ...rest: unknown[]): boolean;
}

/** A socket's writes, held back until the end of the tick. */
interface Held {
  readonly stream: Writable;
  /** The socket's own `write`. */
  readonly write: Writable["write"];
  parts: string[];
  /** Whether this tick's writes are held back. */
  holding: boolean;
}

/** The socket whose writes a Corker holds back, by socket, so each is wrapped once. */
const held = new WeakMap<Writable, Held>();

/**
 * Holds back what a connection writes for the rest of the current tick, so
 * that the commands written meanwhile leave as one string in one socket
 * write instead of one `send` each. ioredis writes every command at once;
 * with 64 workers woken by one batch of replies, that is 64 system calls
 * where one does, and on this machine a send costs more client CPU than the
 * whole library's share of a cycle. The held writes go out on
 * `process.nextTick`, which runs once the microtasks queued so far are done
 * (Deno, Bun and Node alike): a lone command waits for no timer and no I/O
 * poll. On a Cluster every master's socket is held, since a tick's commands
 * go to the nodes that serve their slots: a renewal pass of 3,000 locks over
 * 3 masters (a script per slot, ~1,000 a master) reached each master in ~450
 * socket reads, and batched in ~12 (as many as the server's 16 KB read
 * buffer needs).
 *
 * The commands are joined here, not by `socket.cork()`: ioredis writes each
 * command as a string, and a corked socket hands its chunks to `_writev`,
 * which on Bun copies them into a new Buffer (a seventh of the client's CPU
 * with 64 workers) and on Deno writes them as separate buffers. Joined, 64
 * workers on 64 keys, pinned to one CPU with the server, ran 12 % faster on
 * Bun and 3 % on Deno than corked. A write that is not a plain string (a
 * Buffer, or with a callback) flushes what is held first, so the order on
 * the wire is the order of the writes.
 */
export class Corker {
  #holding: Held[] = [];
  /** The Clusters whose masters are held this tick. */
  #clusters: Cluster[] = [];
  readonly #flush = () => {
    const holding = this.#holding;
    this.#holding = [];
    this.#clusters = [];
    for (const entry of holding) {
      entry.holding = false;
      flush(entry);
    }
  };

  /** Holds back `client`'s writes (a Cluster's: its masters') until the end of this tick, once. */
  cork(client: Client): void {
    if (!(client instanceof Cluster)) return this.#cork(client);
    if (this.#clusters.includes(client)) return;
    for (const node of client.nodes("master")) this.#cork(node);
    // Once the first socket is held, so that the flush clears the list.
    if (this.#holding.length > 0) this.#clusters.push(client);
  }

  #cork(client: Client): void {
    const stream = (client as { stream?: Writable }).stream;
    if (stream === undefined || typeof stream.write !== "function") return;
    const entry = held.get(stream) ?? wrap(stream);
    if (entry.holding) return;
    if (this.#holding.length === 0) process.nextTick(this.#flush);
    entry.holding = true;
    this.#holding.push(entry);
  }
}

/** Writes what `entry` holds, as one string. */
function flush(entry: Held): void {
  const parts = entry.parts;
  if (parts.length === 0) return;
  entry.parts = [];
  entry.write.call(entry.stream, parts.length === 1 ? parts[0] : parts.join(""));
}

/** Puts a `write` on `stream` that holds plain strings back while its entry is holding. */
function wrap(stream: Writable): Held {
  const entry: Held = { stream, write: stream.write, parts: [], holding: false };
  held.set(stream, entry);
  stream.write = function (chunk: unknown, ...rest: unknown[]): boolean {
    if (entry.holding && typeof chunk === "string" && rest.length === 0) {
      entry.parts.push(chunk);
      return true;
    }
    flush(entry);
    return entry.write.call(stream, chunk, ...rest);
  };
  return entry;
}
