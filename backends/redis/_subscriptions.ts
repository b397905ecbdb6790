// Pub/sub: one subscriber per instance, its channels shared by all waiters, kept across reconnects.

import { type Client, hangUp } from "./_connection.ts";

/** Told of each message on its channel (undefined: after a reconnect, when one may have been missed). */
export type Listener = (message?: string) => void;

/** How long a channel stays subscribed after its last waiter left. */
const SUBSCRIPTION_LINGER = 1_000;

/** A deferred: a promise and the function that resolves it. */
interface Pending {
  promise: Promise<void>;
  resolve(): void;
}

/**
 * One subscriber connection's channels, shared by every waiter on one
 * instance. A channel counts as subscribed only once the server confirmed it
 * on the current connection; every reconnect subscribes every wanted channel
 * again and then wakes its waiters, since a release may have gone unheard.
 */
export class Subscriptions {
  readonly #make: () => Client;
  /** Sharded pub/sub (SSUBSCRIBE, "smessage"): a Cluster whose servers have it. */
  readonly sharded: boolean;
  #subscriber?: Client;
  readonly #listeners = new Map<string, Set<Listener>>();
  /** Channels nobody listens to any more, unsubscribed after a moment unless wanted again. */
  readonly #idle = new Map<string, ReturnType<typeof setTimeout>>();
  /** Channels the server confirmed on the current connection. */
  readonly #confirmed = new Set<string>();
  /** Channels whose SUBSCRIBE is in flight on the current connection. */
  readonly #sent = new Set<string>();
  /** One confirmation to wait for per channel, however many waiters ask. */
  readonly #pending = new Map<string, Pending>();
  /** Counts connections, so an answer from an old one is not taken for the current one. */
  #generation = 0;

  constructor(make: () => Client, sharded = false) {
    this.#make = make;
    this.sharded = sharded;
  }

  #connection(): Client {
    if (this.#subscriber === undefined) {
      const subscriber = this.#make();
      subscriber.on("error", () => {}); // waiters fall back to polling; commands report errors
      subscriber.on(
        this.sharded ? "smessage" : "message",
        (channel: string, message: string) => this.#wake(channel, message),
      );
      subscriber.on("ready", () => {
        for (const channel of this.#wanted()) this.#send(channel, true);
      });
      subscriber.on("close", () => {
        // The server forgets a connection's subscriptions with it.
        this.#generation++;
        this.#confirmed.clear();
        this.#sent.clear();
        this.#settleAll();
      });
      this.#subscriber = subscriber;
    }
    return this.#subscriber;
  }

  #wanted(): string[] {
    return [...this.#listeners.keys(), ...this.#idle.keys()];
  }

  #wake(channel: string, message?: string) {
    for (const listener of this.#listeners.get(channel) ?? []) listener(message);
  }

  /**
   * Sends SUBSCRIBE if the connection is ready and none is in flight; a
   * connection not ready yet subscribes on its "ready". After a reconnect
   * (`again`) the confirmation wakes the channel's waiters to try at once.
   */
  #send(channel: string, again = false) {
    const subscriber = this.#connection();
    if (subscriber.status !== "ready" || this.#sent.has(channel)) return;
    this.#sent.add(channel);
    const generation = this.#generation;
    (this.sharded ? subscriber.ssubscribe(channel) : subscriber.subscribe(channel)).then(
      () => {
        if (generation !== this.#generation) return;
        this.#sent.delete(channel);
        if (!this.#listeners.has(channel) && !this.#idle.has(channel)) return;
        this.#confirmed.add(channel);
        this.#settle(channel);
        if (again) this.#wake(channel);
      },
      () => {
        // Refused (no channel permission, say) or dropped with its
        // connection: the waiters poll; the next reconnect tries again.
        if (generation === this.#generation) this.#sent.delete(channel);
        this.#settle(channel);
      },
    );
  }

  #settle(channel: string) {
    this.#pending.get(channel)?.resolve();
    this.#pending.delete(channel);
  }

  #settleAll() {
    for (const pending of this.#pending.values()) pending.resolve();
    this.#pending.clear();
  }

  /** Whether no waiter listens on any channel, or did within the last second. */
  get quiet(): boolean {
    return this.#listeners.size === 0 && this.#idle.size === 0;
  }

  /** Whether some waiter listens on `channel`, or did within the last second. */
  listening(channel: string): boolean {
    return this.#listeners.has(channel) || this.#idle.has(channel);
  }

  /**
   * Calls `listener` on every message on `channel` until `remove()`.
   * `ready` resolves once Redis has confirmed the subscription (or failed
   * to: the waiter then relies on polling).
   */
  add(channel: string, listener: Listener): { remove(): void; ready: Promise<void> } {
    let listeners = this.#listeners.get(channel);
    if (listeners === undefined) {
      listeners = new Set();
      this.#listeners.set(channel, listeners);
      // Still subscribed: under steady contention, no SUBSCRIBE per wait.
      clearTimeout(this.#idle.get(channel));
      this.#idle.delete(channel);
    }
    listeners.add(listener);
    let ready = Promise.resolve();
    if (!this.#confirmed.has(channel)) {
      let pending = this.#pending.get(channel);
      if (pending === undefined) {
        let resolve!: () => void;
        const promise = new Promise<void>((r) => resolve = r);
        pending = { promise, resolve };
        this.#pending.set(channel, pending);
      }
      ready = pending.promise;
      this.#send(channel);
    }
    const remove = () => {
      const set = this.#listeners.get(channel);
      if (set === undefined || !set.delete(listener) || set.size > 0) return;
      this.#listeners.delete(channel);
      this.#idle.set(
        channel,
        setTimeout(() => {
          this.#idle.delete(channel);
          this.#settle(channel);
          const subscribed = this.#confirmed.delete(channel) || this.#sent.has(channel);
          const subscriber = this.#subscriber;
          if (subscribed && subscriber?.status === "ready") {
            const left = this.sharded
              ? subscriber.sunsubscribe(channel)
              : subscriber.unsubscribe(channel);
            left.catch(() => {});
          }
        }, SUBSCRIPTION_LINGER),
      );
    };
    return { remove, ready };
  }

  async close(): Promise<void> {
    this.#listeners.clear();
    for (const timer of this.#idle.values()) clearTimeout(timer);
    this.#idle.clear();
    this.#settleAll();
    const subscriber = this.#subscriber;
    this.#subscriber = undefined;
    if (subscriber) await hangUp(subscriber);
  }
}
