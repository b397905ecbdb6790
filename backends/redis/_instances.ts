// The instances of one config: per-call deadlines, quorum, WAIT, late give-backs closing waits for.

import { Cluster, type Redis } from "ioredis";
import type { LockError } from "../../errors.ts";
import { KeyQueue, onAbort } from "../../_locker.ts";
import { type Alarm, Alarms } from "../../_lease_clock.ts";
import { scrub } from "../../_scrub.ts";
import type { Client } from "./_connection.ts";
import { Corker } from "./_cork.ts";
import { type Kind, kindOf, translate } from "./_errors.ts";
import { randomToken, RENEW_BATCH, RENEW_MANY, sha1, shas, slotOf } from "./_scripts.ts";
import type { Subscriptions } from "./_subscriptions.ts";

/** One Redis (a server, a Sentinel's primary, a Cluster): its client, its subscriber, and how to name it in messages. */
export interface Instance {
  readonly name: string;
  readonly client: Client;
  readonly subscriptions: Subscriptions;
}

/** ioredis's script calls, as they take arrays of keys and arguments. */
interface Evaluator {
  evalsha(sha: string, count: number, keys: string[], args: (string | number)[]): Promise<unknown>;
  eval(script: string, count: number, keys: string[], args: (string | number)[]): Promise<unknown>;
}

/** What `Instances.within` resolves when no answer came in time. */
export const SILENT: unique symbol = Symbol("silent");

/** The instances of one connection config: one Redis, or the Redlock set. */
export class Instances {
  readonly list: Instance[];
  /**
   * Contenders for a key among all lockers on these clients: one at a time
   * goes to Redis, the rest queue here in order. A release then wakes one
   * waiter per process, not one per locker.
   */
  readonly contenders = new KeyQueue();
  /**
   * The timer of every lease and call deadline on these clients: renewals
   * that fall due together go out in one pass, and a call costs no timer.
   */
  readonly alarms = new Alarms();
  /** The calls of one tick to one instance leave in one write. */
  readonly #corker = new Corker();
  /**
   * This client's name in lock queues: a release hands a lock to a waiter
   * of this process on the lock's channel suffixed with it.
   */
  readonly id = randomToken();
  readonly #secrets: string[];
  /** Renewals asked for in this pass, by instance, sent together at its end. */
  #renewals = new Map<Instance, PendingRenewal[]>();
  #flushing = false;
  /** Give-backs waiting for the answer to an acquisition abandoned in flight, with their bounds. */
  readonly #late = new Set<{ done: Promise<void>; until: number }>();

  constructor(list: Instance[], secrets: string[]) {
    this.list = list;
    this.#secrets = secrets;
  }

  /**
   * Whether releases hand locks to a queue of waiters: on one Redis that is
   * not a Cluster (PUBLISH counts only the node's own listeners there).
   */
  get queues(): boolean {
    return this.list.length === 1 && !(this.list[0].client instanceof Cluster);
  }

  /** How many instances must agree. */
  get quorum(): number {
    return Math.floor(this.list.length / 2) + 1;
  }

  error(error: unknown, action: string, where: string, token?: string): LockError {
    return translate(error, action, where, token ? [...this.#secrets, token] : this.#secrets);
  }

  /** A copy of a client's error that holds no secret and no `token`. */
  scrub(error: unknown, token: string): Error {
    return scrub(error, [...this.#secrets, token]);
  }

  /** What a client's error says, without secrets. */
  detail(error: unknown, token: string): string {
    return this.scrub(error, token).message;
  }

  kind(error: unknown): Kind {
    return kindOf(String((error as Error)?.message ?? error));
  }

  /**
   * How many replicas acknowledged the writes made so far on the connection
   * that wrote `key` (Redis `WAIT`), waiting `ms` at most. WAIT counts the
   * writes of its own connection, so on a Cluster it goes to the connection
   * of the master that serves the key's slot, the one the script ran on.
   * WAIT holds that connection's later commands until it returns.
   */
  async replicated(instance: Instance, key: string, replicas: number, ms: number): Promise<number> {
    const client = instance.client;
    let server: Redis | undefined;
    if (client instanceof Cluster) {
      const owner = client.slots[slotOf(key)]?.[0];
      // "all": a replica promoted since the last slot refresh may still be listed as one.
      server = client.nodes("all").find((node) =>
        `${node.options.host}:${node.options.port}` === owner
      );
    } else {
      server = client;
    }
    if (server === undefined) return 0;
    // WAIT 0 would wait forever.
    const timeout = Math.max(1, Math.floor(ms));
    return Number(await server.call("WAIT", replicas, timeout));
  }

  /** Runs a script by SHA, loading it on NOSCRIPT. */
  run(
    instance: Instance,
    script: string,
    keys: string[],
    args: (string | number)[],
  ): Promise<unknown> {
    const sha = shas.get(script);
    if (sha === undefined) return sha1(script).then(() => this.run(instance, script, keys, args));
    // ioredis flattens array arguments (its typings do not say so): no
    // spread copies on the hot path.
    this.#corker.cork(instance.client);
    const client = instance.client as unknown as Evaluator;
    return client.evalsha(sha, keys.length, keys, args).catch((error: unknown) => {
      if (!String((error as Error)?.message).startsWith("NOSCRIPT")) throw error;
      return client.eval(script, keys.length, keys, args);
    });
  }

  /**
   * What `call` resolves, or `SILENT` once `bound` ms passed without it (on
   * the shared alarms: no timer of its own); rejects with its error, or with
   * `signal.reason` if that aborts first.
   */
  within<T>(call: Promise<T>, bound: number, signal?: AbortSignal): Promise<T | typeof SILENT> {
    return this.until(call, performance.now() + Math.max(0, bound), signal);
  }

  /** {@linkcode within}, with the time the bound runs out (`performance.now()` ms) given. */
  until<T>(call: Promise<T>, at: number, signal?: AbortSignal): Promise<T | typeof SILENT> {
    return new Promise((resolve, reject) => {
      let done = false;
      let stop: (() => void) | undefined;
      const finish = () => {
        done = true;
        this.alarms.cancel(alarm);
        stop?.();
      };
      const aborted = () => {
        if (done) return;
        finish();
        reject(signal!.reason);
      };
      const alarm = this.alarms.add(at, () => {
        if (done) return;
        finish();
        resolve(SILENT);
      });
      if (signal !== undefined) {
        if (signal.aborted) return aborted();
        stop = onAbort(signal, aborted);
      }
      call.then((reply) => {
        if (done) return;
        finish();
        resolve(reply);
      }, (error) => {
        if (done) return;
        finish();
        reject(error);
      });
    });
  }

  /**
   * Renews `key` if it is still `token`'s, in one RENEW_MANY call with every
   * other renewal asked for on `instance` in the same pass (up to
   * RENEW_BATCH keys a call; on a Cluster one call per slot, all sent at
   * once, so one round trip per node). Resolves RENEW's reply for this key
   * (1, 0 or -1), or "unacknowledged" if it was renewed but fewer than
   * `replicas` replicas acknowledged within `waitMs`.
   */
  renew(
    instance: Instance,
    key: string,
    token: string,
    ttl: number,
    replicas: number,
    waitMs: number,
  ): Promise<unknown> {
    return new Promise((resolve, reject) => {
      let queue = this.#renewals.get(instance);
      if (queue === undefined) this.#renewals.set(instance, queue = []);
      queue.push({ key, token, ttl, replicas, waitMs, resolve, reject });
      if (this.#flushing) return;
      this.#flushing = true;
      queueMicrotask(() => this.#flushRenewals());
    });
  }

  #flushRenewals() {
    this.#flushing = false;
    const pending = this.#renewals;
    this.#renewals = new Map();
    for (const [instance, queue] of pending) {
      const cluster = instance.client instanceof Cluster;
      const groups = new Map<string, PendingRenewal[]>();
      for (const renewal of queue) {
        const slot = cluster ? slotOf(renewal.key) : 0;
        const group = `${slot} ${renewal.ttl} ${renewal.replicas}`;
        const list = groups.get(group);
        if (list === undefined) groups.set(group, [renewal]);
        else list.push(renewal);
      }
      for (const group of groups.values()) {
        for (let i = 0; i < group.length; i += RENEW_BATCH) {
          void this.#renewBatch(instance, group.slice(i, i + RENEW_BATCH));
        }
      }
    }
  }

  async #renewBatch(instance: Instance, batch: PendingRenewal[]): Promise<void> {
    const { ttl, replicas } = batch[0];
    try {
      const keys = batch.map((renewal) => renewal.key);
      const tokens = batch.map((renewal) => renewal.token);
      const replies = await this.run(instance, RENEW_MANY, keys, [ttl, ...tokens]) as number[];
      let acked = replicas;
      if (replicas > 0 && replies.includes(1)) {
        const waitMs = Math.min(...batch.map((renewal) => renewal.waitMs));
        acked = await this.replicated(instance, keys[0], replicas, waitMs).catch(() => 0);
      }
      batch.forEach((renewal, i) =>
        renewal.resolve(replies[i] === 1 && acked < replicas ? "unacknowledged" : replies[i])
      );
    } catch (error) {
      for (const renewal of batch) renewal.reject(error);
    }
  }

  /**
   * Runs a script on every instance at once; each call gets its own
   * deadline, since ioredis has none per command (on the shared alarms). `answers` resolves as soon
   * as `decided` holds for the answers so far, every instance answered, or
   * `bound` ms passed, so a stalled or partitioned instance holds up nobody:
   * one that did not answer in time is `undefined` there. Its call goes on in
   * `calls` (which never reject), for the caller to undo a late effect.
   * `answers` rejects with `signal.reason` if it aborts first. With
   * `where`, only the instances it picks are called; the others answer
   * `failed(undefined)` at once. With `then`, each reply goes through it
   * before `read` (for a WAIT after the script, within the same deadline).
   * With `call`, it replaces the script call (a batched renewal). With
   * `straggle`, once a quorum has answered without `decided`, the others get
   * that many ms more, not the whole bound.
   */
  each<T>(
    script: string,
    keys: string[],
    args: (string | number)[],
    options: {
      read: (reply: unknown) => T;
      failed: (error: unknown) => T;
      bound: number;
      decided: (answers: (T | undefined)[]) => boolean;
      signal?: AbortSignal;
      where?: (i: number) => boolean;
      then?: (instance: Instance, reply: unknown) => Promise<unknown>;
      call?: (instance: Instance) => Promise<unknown>;
      straggle?: number;
    },
  ): { calls: Promise<T>[]; answers: Promise<(T | undefined)[]> } {
    const { read, failed, bound, decided, signal, where, then, call, straggle } = options;
    const calls = this.list.map((instance, i) => {
      if (where !== undefined && !where(i)) return Promise.resolve(failed(undefined));
      const sent = call === undefined ? this.run(instance, script, keys, args) : call(instance);
      return then === undefined
        ? sent.then(read, failed)
        : sent.then((reply) => then(instance, reply)).then(read, failed);
    });
    const answers = new Promise<(T | undefined)[]>((resolve, reject) => {
      const soFar: (T | undefined)[] = calls.map(() => undefined);
      let pending = calls.length;
      let done = false;
      let late: Alarm | undefined;
      let stop: (() => void) | undefined;
      const finish = (settle: () => void) => {
        if (done) return;
        done = true;
        this.alarms.cancel(alarm);
        this.alarms.cancel(late);
        stop?.();
        settle();
      };
      const aborted = () => finish(() => reject(signal!.reason));
      const alarm = this.alarms.add(
        performance.now() + Math.max(0, bound),
        () => finish(() => resolve([...soFar])),
      );
      if (signal?.aborted) return aborted();
      if (signal !== undefined) stop = onAbort(signal, aborted);
      calls.forEach((call, i) =>
        call.then((answer) => {
          if (done) return;
          soFar[i] = answer;
          pending -= 1;
          if (pending === 0 || decided(soFar)) return finish(() => resolve([...soFar]));
          // A quorum answered without a decision: the rest get `straggle` ms more.
          if (
            straggle !== undefined && late === undefined && calls.length - pending >= this.quorum
          ) {
            late = this.alarms.add(
              performance.now() + straggle,
              () => finish(() => resolve([...soFar])),
            );
          }
        })
      );
    });
    return { calls, answers };
  }

  /**
   * Keeps track of `giveBack`, the release of an acquisition given up while
   * its SET was in flight, so that closing waits for it: it needs this
   * connection when the late answer comes. Past `until` (monotonic ms: when
   * the key would expire anyway) nothing is left to give back.
   */
  giveBackLate(giveBack: Promise<unknown>, until: number): void {
    const entry = { done: giveBack.then(() => {}, () => {}), until };
    this.#late.add(entry);
    entry.done.then(() => this.#late.delete(entry));
  }

  /**
   * Waits for the late give-backs, each until its key would expire but at
   * most `CLOSE_GIVE_BACK_BOUND`: a server that stays stalled keeps such a
   * key until its TTL, and close() must end.
   */
  async #settleLate(): Promise<void> {
    const bound = performance.now() + CLOSE_GIVE_BACK_BOUND;
    await Promise.all([...this.#late].map(async ({ done, until }) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const ms = Math.max(0, Math.min(until, bound) - performance.now());
      await Promise.race([done, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
      clearTimeout(timer);
    }));
  }

  async close(): Promise<void> {
    await this.#settleLate();
    this.alarms.stop();
    await Promise.all(this.list.map((instance) => instance.subscriptions.close()));
  }
}

/** A renewal waiting for the end of its pass. */
interface PendingRenewal {
  key: string;
  token: string;
  ttl: number;
  replicas: number;
  waitMs: number;
  resolve(reply: unknown): void;
  reject(error: unknown): void;
}

/** How long closing waits at most for Redis to answer an acquisition abandoned in flight. */
const CLOSE_GIVE_BACK_BOUND = 5_000;
