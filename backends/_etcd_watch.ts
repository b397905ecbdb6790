// One etcd watch stream per locker, driven directly on npm:etcd3's raw
// WatchClient. npm:etcd3's own WatchManager tears its stream down whenever
// the last watch is cancelled (so every held lock would open a new gRPC
// stream), re-arms reconnect timers after close(), and can leave a stream
// running past client.close(). Here the stream opens on first use, stays open
// while the locker lives, and is cancelled by close(); a broken stream fails
// its watches, and their owners start new ones (from a known revision, so no
// event is lost).

import type { Buffer } from "node:buffer";
import type { Etcd3, IDuplexStream, IEvent, IWatchRequest, IWatchResponse } from "etcd3";

type Stream = IDuplexStream<IWatchRequest, IWatchResponse>;

/**
 * Ends a stream at once. Half-closing first matters: npm:etcd3 counts an
 * error on a still-writable stream (such as the CANCELLED that cancel()
 * raises) against the member's circuit breaker, which opens after three.
 */
export function endStream(stream: { end(): void; cancel(): void } | undefined): void {
  if (stream === undefined) return;
  stream.end();
  stream.cancel();
}

/** What a watch reports. */
export interface WatchHandlers {
  /** The events of one response, in revision order. */
  onEvents(events: IEvent[]): void;
  /** The watch ended without being cancelled: the stream broke, or etcd cancelled it. */
  onError(error: Error): void;
}

/** An open watch. */
export interface Watch {
  /** The revision the watch was created at (events come after it). */
  readonly revision: string;
  /** Stops the watch. Idempotent; never throws. */
  cancel(): void;
}

interface Pending {
  handlers: WatchHandlers;
  resolve(watch: Watch): void;
  reject(error: Error): void;
}

/** Why etcd refused or ended a watch, as an error (`cancel_reason` is etcd's text). */
export class WatchCanceledError extends Error {
  constructor(reason: string) {
    super(reason || "the watch was canceled by etcd");
    this.name = "WatchCanceledError";
  }
}

/** The watch stream of one locker. */
export class WatchHub {
  readonly #client: Etcd3;
  #stream?: Promise<Stream>;
  #current?: Stream;
  /** Creates sent and not yet answered; etcd answers them in order. */
  #pending: Pending[] = [];
  readonly #active = new Map<string, WatchHandlers>();
  #closed = false;

  constructor(client: Etcd3) {
    this.#client = client;
  }

  /**
   * Watches `key` from `startRevision` (exclusive of earlier history), or
   * from now. Resolves once etcd has created the watch.
   */
  async watch(
    key: Buffer,
    startRevision: string | undefined,
    handlers: WatchHandlers,
  ): Promise<Watch> {
    if (this.#closed) throw new Error("the watch stream is closed");
    const stream = await this.#open();
    return new Promise<Watch>((resolve, reject) => {
      this.#pending.push({ handlers, resolve, reject });
      stream.write({
        create_request: startRevision === undefined
          ? { key }
          : { key, start_revision: startRevision },
      });
    });
  }

  #open(): Promise<Stream> {
    return this.#stream ??= this.#client.watchClient.watch().then((stream) => {
      this.#current = stream;
      stream.on("data", (response) => this.#receive(stream, response));
      stream.on("error", (error) => this.#broken(stream, error));
      stream.on("end", () => this.#broken(stream, new Error("the watch stream ended")));
      if (this.#closed) endStream(stream);
      return stream;
    }, (error) => {
      this.#stream = undefined;
      throw error;
    });
  }

  #receive(stream: Stream, response: IWatchResponse) {
    if (response.created) {
      const pending = this.#pending.shift();
      if (pending === undefined) return;
      if (response.canceled) {
        pending.reject(new WatchCanceledError(response.cancel_reason));
        return;
      }
      const id = response.watch_id;
      this.#active.set(id, pending.handlers);
      pending.resolve({
        revision: response.header.revision,
        cancel: () => {
          if (!this.#active.delete(id) || this.#closed) return;
          try {
            stream.write({ cancel_request: { watch_id: id } });
          } catch {
            // The stream is gone, and the watch with it.
          }
        },
      });
      return;
    }
    const handlers = this.#active.get(response.watch_id);
    if (handlers === undefined) return;
    if (response.canceled) {
      this.#active.delete(response.watch_id);
      handlers.onError(new WatchCanceledError(response.cancel_reason));
      return;
    }
    if (response.events.length > 0) handlers.onEvents(response.events);
  }

  #broken(stream: Stream, error: Error) {
    if (stream !== this.#current) return;
    this.#current = undefined;
    this.#stream = undefined;
    endStream(stream);
    const pending = this.#pending;
    const active = [...this.#active.values()];
    this.#pending = [];
    this.#active.clear();
    for (const p of pending) p.reject(error);
    for (const handlers of active) handlers.onError(error);
  }

  /** Cancels the stream and every watch on it. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const stream = await this.#stream?.catch(() => undefined);
    if (stream) this.#broken(stream, new Error("the watch stream was closed"));
  }
}
