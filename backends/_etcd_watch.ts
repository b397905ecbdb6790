// One etcd watch stream per locker, driven directly on npm:etcd3's raw
// WatchClient. npm:etcd3's own WatchManager tears its stream down whenever
// the last watch is cancelled (so every held lock would open a new gRPC
// stream), re-arms reconnect timers after close(), and can leave a stream
// running past client.close(). Here the stream opens on first use, stays open
// while the locker lives, and is cancelled by close().
//
// A broken stream (etcd restarted, a connection cut) is reopened with a short
// backoff, and every watch is created on it again from the revision after the
// last one it delivered, so no event is lost and its owner notices nothing.
// etcd numbers watches per stream, from 0 on each new one: a watch is known by
// its own object, and its ID counts only on the stream that gave it, so a
// watch cancelled late can never cancel another that reused its number.

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
  /**
   * etcd cancelled the watch after creating it (its history was compacted):
   * no more events come. A broken stream is not reported: the watch resumes.
   */
  onError(error: Error): void;
  /**
   * etcd refused to create it. Without this handler, only `created` says so.
   */
  onRefused?(error: Error): void;
}

/** A watch: created on the server soon, resumed after every stream break. */
export interface Watch {
  /**
   * Resolves the revision etcd created the watch at (events come after it),
   * the first time it is created; rejects if etcd refused it or the hub closed.
   */
  readonly created: Promise<string>;
  /** Stops the watch. Idempotent; never throws. */
  cancel(): void;
}

/** Why etcd refused or ended a watch, as an error (`cancel_reason` is etcd's text). */
export class WatchCanceledError extends Error {
  constructor(reason: string) {
    super(reason || "the watch was canceled by etcd");
    this.name = "WatchCanceledError";
  }
}

/**
 * One watch, for as long as its owner wants it, across streams. A class,
 * and `created` made only when asked for: a held lock keeps one for as long
 * as it is held, and 10,000 of them are what its memory costs.
 */
class Entry implements Watch {
  readonly key: Buffer;
  readonly handlers: WatchHandlers;
  readonly #hub: WatchHub;
  /** Where a (re)creation starts: undefined until first created if asked "from now". */
  next?: string;
  /** Its ID on the current stream, once that stream created it. */
  id?: string;
  cancelled = false;
  /** Whether etcd created it once (its owner was told, through `created`). */
  made = false;
  /** How the first creation went, once known: the revision, or why not. */
  #outcome?: { revision: string } | { error: Error };
  #created?: Promise<string>;
  #settle?: { resolve(revision: string): void; reject(error: Error): void };

  constructor(hub: WatchHub, key: Buffer, next: string | undefined, handlers: WatchHandlers) {
    this.#hub = hub;
    this.key = key;
    this.next = next;
    this.handlers = handlers;
  }

  get created(): Promise<string> {
    if (this.#created === undefined) {
      const outcome = this.#outcome;
      this.#created = outcome === undefined
        ? new Promise((resolve, reject) => this.#settle = { resolve, reject })
        : "error" in outcome
        ? Promise.reject(outcome.error)
        : Promise.resolve(outcome.revision);
      this.#created.catch(() => {}); // an owner that gave up need not listen
    }
    return this.#created;
  }

  resolve(revision: string) {
    if (this.#outcome !== undefined) return;
    this.#outcome = { revision };
    this.#settle?.resolve(revision);
    this.#settle = undefined;
  }

  reject(error: Error) {
    if (this.#outcome !== undefined) return;
    this.#outcome = { error };
    this.#settle?.reject(error);
    this.#settle = undefined;
  }

  cancel(): void {
    this.#hub.cancel(this);
  }
}

/** What one stream knows: its creates awaiting an answer, and its watches by ID. */
interface Line {
  readonly stream: Stream;
  /** Creates sent on this stream and not yet answered; etcd answers them in order. */
  readonly pending: Entry[];
  readonly byId: Map<string, Entry>;
}

/** The first reconnect comes this soon after a break, then twice as late each time. */
const RECONNECT_MIN = 50;
/** ...up to this: a restart costs a waiter at most about this much extra. */
const RECONNECT_MAX = 1_000;

/** How long close() waits for a stream still opening. */
const CLOSE_WAIT = 1_000;

/** The watch stream of one locker. */
export class WatchHub {
  readonly #client: Etcd3;
  readonly #watches = new Set<Entry>();
  #line?: Line;
  #opening?: Promise<void>;
  #attempt = 0;
  #timer?: ReturnType<typeof setTimeout>;
  #closed = false;

  constructor(client: Etcd3) {
    this.#client = client;
  }

  /**
   * Watches `key` from `startRevision` (inclusive), or from now, until
   * cancelled. The watch survives stream breaks; see {@linkcode Watch.created}.
   */
  watch(key: Buffer, startRevision: string | undefined, handlers: WatchHandlers): Watch {
    const entry = new Entry(this, key, startRevision, handlers);
    if (this.#closed) {
      entry.cancelled = true;
      entry.reject(new Error("the watch stream is closed"));
      return entry;
    }
    this.#watches.add(entry);
    if (this.#line) this.#create(this.#line, entry);
    else this.#connect();
    return entry;
  }

  #create(line: Line, entry: Entry) {
    line.pending.push(entry);
    this.#write(line, {
      create_request: entry.next === undefined
        ? { key: entry.key }
        : { key: entry.key, start_revision: entry.next },
    });
  }

  /** Stops `entry` (its own `cancel()`). */
  cancel(entry: Entry): void {
    if (entry.cancelled) return;
    entry.cancelled = true;
    this.#watches.delete(entry);
    const line = this.#line;
    // Only the stream that gave this ID may take it back: a later stream may
    // have given the same number to another watch.
    if (line === undefined || entry.id === undefined || line.byId.get(entry.id) !== entry) return;
    line.byId.delete(entry.id);
    this.#write(line, { cancel_request: { watch_id: entry.id } });
  }

  #write(line: Line, request: IWatchRequest) {
    try {
      line.stream.write(request);
    } catch {
      this.#broken(line);
    }
  }

  /** Opens a stream and creates every live watch on it. */
  #connect() {
    if (this.#closed || this.#line || this.#opening || this.#timer !== undefined) return;
    if (this.#watches.size === 0) return;
    this.#opening = this.#client.watchClient.watch().then((stream) => {
      this.#opening = undefined;
      if (this.#closed) return endStream(stream);
      const line: Line = { stream, pending: [], byId: new Map() };
      this.#line = line;
      stream.on("data", (response) => this.#receive(line, response));
      stream.on("error", () => this.#broken(line));
      stream.on("end", () => this.#broken(line));
      for (const entry of this.#watches) this.#create(line, entry);
    }, () => {
      this.#opening = undefined;
      this.#retry();
    });
  }

  #retry() {
    if (this.#closed || this.#watches.size === 0) return;
    const wait = Math.min(RECONNECT_MAX, RECONNECT_MIN * 2 ** this.#attempt++);
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#connect();
    }, wait);
  }

  #receive(line: Line, response: IWatchResponse) {
    if (line !== this.#line) return;
    if (response.created) {
      const entry = line.pending.shift();
      if (entry === undefined) return;
      this.#attempt = 0; // the stream works
      if (response.canceled) {
        this.#watches.delete(entry);
        entry.cancelled = true;
        const error = new WatchCanceledError(response.cancel_reason);
        // Refused at once: the owner learns it from `created` (and
        // onRefused); refused on a resume (its history compacted
        // meanwhile): from onError.
        if (entry.made) return entry.handlers.onError(error);
        entry.reject(error);
        entry.handlers.onRefused?.(error);
        return;
      }
      const id = response.watch_id;
      if (entry.cancelled) {
        this.#write(line, { cancel_request: { watch_id: id } });
        return;
      }
      entry.id = id;
      entry.made = true;
      line.byId.set(id, entry);
      entry.next ??= String(BigInt(response.header.revision) + 1n);
      entry.resolve(response.header.revision);
      return;
    }
    const entry = line.byId.get(response.watch_id);
    if (entry === undefined) return;
    if (response.canceled) {
      line.byId.delete(response.watch_id);
      this.#watches.delete(entry);
      entry.cancelled = true;
      entry.handlers.onError(new WatchCanceledError(response.cancel_reason));
      return;
    }
    const events = response.events;
    if (events.length === 0) return;
    // A resumed watch starts after the last event it delivered.
    const last = BigInt(events[events.length - 1].kv.mod_revision) + 1n;
    if (last > BigInt(entry.next!)) entry.next = String(last);
    entry.handlers.onEvents(events);
  }

  #broken(line: Line) {
    if (line !== this.#line) return;
    this.#line = undefined;
    endStream(line.stream);
    for (const entry of this.#watches) entry.id = undefined;
    this.#retry();
  }

  /** Cancels the stream; every watch not yet created rejects. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const line = this.#line;
    this.#line = undefined;
    if (line) endStream(line.stream);
    const error = new Error("the watch stream was closed");
    for (const entry of this.#watches) {
      entry.cancelled = true;
      entry.reject(error);
    }
    this.#watches.clear();
    // A stream still opening is ended as it arrives; close() waits for that
    // only a little (opening can hang on a token exchange with an etcd that
    // does not answer).
    const opening = this.#opening;
    if (opening === undefined) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      opening,
      new Promise((resolve) => timer = setTimeout(resolve, CLOSE_WAIT)),
    ]);
    clearTimeout(timer);
  }
}
