// The driver: acquiring, renewing and releasing on a quorum of instances, and reading status.

import {
  LockConnectionError,
  type LockError,
  LockLostError,
  LockReplicationError,
} from "../../errors.ts";
import { abortable, type Driver, type Grant, type LockStatus, Loss } from "../../_locker.ts";
import type { ConnectionConfig, LeaseSettings } from "../../_options.ts";
import { LeaseClock, type Renewal } from "../../_lease_clock.ts";
import { errorOf, Silence, transient } from "./_errors.ts";
import { type Instance, type Instances, SILENT } from "./_instances.ts";
import {
  ACQUIRE,
  ACQUIRE_QUEUED,
  keysOf,
  RAISE,
  randomToken,
  RELEASE,
  RESTORE,
  STATUS,
} from "./_scripts.ts";
import type { Listener } from "./_subscriptions.ts";

/** What one instance answered to an acquisition attempt. */
type Answer =
  | { kind: "acquired"; fence: number }
  | { kind: "unreplicated"; fence: number; acked: number; waited: number }
  /** `fence`: the counter as this attempt saw it (a queued attempt). */
  | { kind: "held"; pttl: number; fence?: number }
  | { kind: "failed"; error: unknown };

/** What a queued attempt that found the lock held saw: when it was sent, and the counter. */
interface Seen {
  at: number;
  fence: number;
}

/** Whether an answer took the key on its instance (replicated or not): it must be given back unless held. */
function took(answer: Answer | undefined): boolean {
  return answer?.kind === "acquired" || answer?.kind === "unreplicated";
}

/**
 * How long a WAIT may take so that its answer still arrives before
 * `deadline` (monotonic ms): three quarters of the time left, the rest for
 * the reply and for commands queued behind it on the connection.
 */
function waitWithin(deadline: number): number {
  return (deadline - performance.now()) * 0.75;
}

/** An acquisition's reply (see ACQUIRE), as an answer. */
function readAcquire(reply: unknown): Answer {
  if (Array.isArray(reply)) return { kind: "held", pttl: -2 - reply[0], fence: reply[1] };
  const value = reply as number;
  return value > 0 ? { kind: "acquired", fence: value } : { kind: "held", pttl: -2 - value };
}

function failedAnswer(error: unknown): Answer {
  return { kind: "failed", error };
}

/** The least a waiter's acquisition waits for the last instances once a quorum answered, in ms. */
const STRAGGLE_MIN = 50;

/** The clock drift allowed for, as Redlock does: 1% of the TTL plus 2 ms. */
function drift(ttl: number): number {
  return Math.floor(ttl * 0.01) + 2;
}

/** This process's channel for hand-offs of `keys`' lock (RELEASE publishes there). */
function handOffChannel(keys: ReturnType<typeof keysOf>, instances: Instances): string {
  return `${keys.channel}:to:${instances.id}`;
}

/** RELEASE's arguments (see its comment); a lock's instances share one kind of pub/sub. */
function releaseArgs(
  instance: Instance,
  keys: ReturnType<typeof keysOf>,
  token: string,
  ttl: number,
  wake: boolean,
  queued: boolean,
  member: string,
): (string | number)[] {
  const sharded = instance.subscriptions.sharded ? "s" : "";
  return [token, wake ? keys.channel : "", sharded, ttl, queued ? "q" : "", member];
}

/** The Redis driver: acquisitions, renewals and releases on one or several instances. */
export class RedisDriver implements Driver {
  readonly #instances: Instances;
  readonly #settings: LeaseSettings & Pick<ConnectionConfig, "dialTimeout">;
  readonly #onClose: () => Promise<void>;
  /**
   * Whether waiters queue on the server and a release hands the lock to the
   * first of them (one Redis, no WAIT): FIFO across processes, and one
   * process woken per hand-off instead of every waiting one.
   */
  readonly #queued: boolean;

  constructor(
    instances: Instances,
    settings: LeaseSettings & Pick<ConnectionConfig, "dialTimeout">,
    onClose: () => Promise<void>,
  ) {
    this.#instances = instances;
    this.#settings = settings;
    this.#onClose = onClose;
    this.#queued = instances.queues && settings.waitReplicas === 0;
  }

  async acquire(name: string, wait: boolean, signal: AbortSignal): Promise<Grant | undefined> {
    if (signal.aborted) throw signal.reason;
    const contenders = this.#instances.contenders;
    const keys = keysOf(name);
    const token = randomToken();
    // Contenders of this process for one key take turns, in line. With
    // no one in line the first attempt goes at once, without a place:
    // uncontended, it is the only one, and it costs no queue entry, no
    // subscription and no wake-up.
    let inLine = contenders.has(name);
    if (inLine) {
      if (!wait) return undefined;
      await contenders.enter(name, signal);
    }
    try {
      // Queued, a contender that waited in line here most likely finds the
      // lock handed on to another process's waiter, and so does any caller
      // for a key that a waiter of this process waited for within the last
      // second (its hand-off channel is still subscribed): it takes its
      // place in the queue in its first attempt, not after a plain one that
      // fails. Across processes that is one script and one round trip fewer
      // per hand-off; a key that is free by then is acquired all the same.
      if (this.#queued && (inLine || (wait && this.#waitedFor(keys)))) {
        return await this.#wait(keys, token, signal, { pttl: 0 });
      }
      let last: { pttl: number } | undefined;
      try {
        const first = await this.#attempt(keys, token, signal, wait);
        if (first.grant) return first.grant;
        last = first;
      } catch (error) {
        // A waiter outlives a transient loss of connection (a restart, a
        // failover): only its own signal, or what no retry cures (auth,
        // permission), ends it. The first connect already proved the server.
        if (!wait || signal.aborted || !transient(error)) throw error;
      }
      if (!wait) return undefined;
      if (!inLine) {
        await contenders.enter(name, signal);
        inLine = true;
      }
      return await this.#wait(keys, token, signal, last);
    } finally {
      if (inLine) contenders.leave(name);
    }
  }

  /** Whether a waiter of this process listens for hand-offs of `keys`' lock, or did lately. */
  #waitedFor(keys: ReturnType<typeof keysOf>): boolean {
    const instances = this.#instances;
    const subscriptions = instances.list[0].subscriptions;
    // Uncontended, nothing is subscribed: no channel name to build.
    return !subscriptions.quiet && subscriptions.listening(handOffChannel(keys, instances));
  }

  /**
   * Waits for a release and tries again, until acquired. `last` is the
   * attempt before (undefined: it failed, and may be retried).
   */
  async #wait(
    keys: ReturnType<typeof keysOf>,
    token: string,
    signal: AbortSignal,
    last: { pttl: number; seen?: Seen } | undefined,
  ): Promise<Grant> {
    const { retryInterval } = this.#settings;
    const instances = this.#instances;
    let woken: (message?: string) => void = () => {};
    // Queued, this process's channel for the lock carries each hand-off:
    // "token:fencing token". Only ours wakes this waiter (and a reconnect,
    // which may have lost one). Every waiter also hears the lock's own
    // channel, where a release wakes them all when it hands the lock to no
    // one (nobody queued; a user whose ACL has no queue commands).
    const queued = this.#queued ? `${instances.id}|${token}` : undefined;
    const ours = `${token}:`;
    const wakeAll = () => woken();
    const wakeOurs = (message?: string) => {
      if (message === undefined) woken();
      else if (message.startsWith(ours)) woken(message);
    };
    const unsubscribe: (() => void)[] = [];
    // Made before each attempt, so a release during it still wakes the wait after.
    let woke = new Promise<string | undefined>((resolve) => woken = resolve);
    let granted = false;
    try {
      for (;;) {
        let handed: string | undefined;
        if (last === undefined) {
          handed = await this.#sleep(retryInterval, woke, signal);
        } else if (unsubscribe.length === 0) {
          // Held: subscribe, then try once more before waiting (queued: take
          // a place in the queue), so a release between the failed attempt
          // and the subscription still counts.
          const channels: [string, Listener][] = [[keys.channel, wakeAll]];
          if (queued) channels.push([handOffChannel(keys, instances), wakeOurs]);
          await this.#subscribe(channels, unsubscribe, signal);
        } else {
          // Wait for a release, or poll: never past the holder's expiry.
          handed = await this.#sleep(
            Math.max(1, Math.min(retryInterval, last.pttl + 1)),
            woke,
            signal,
          );
        }
        // A release handed us the lock: its key lasts ttl from the release.
        // A fencing token above the counter our last attempt saw means the
        // release ran after that attempt, so a lease counted from the
        // attempt's send time ends no later than the key. (A message that
        // lagged behind a later attempt is not taken: that attempt confirms.)
        if (handed !== undefined && last?.seen !== undefined) {
          const grant = this.#handed(keys, token, handed.slice(ours.length), last.seen);
          if (grant) {
            granted = true;
            return grant;
          }
        }
        woke = new Promise<string | undefined>((resolve) => woken = resolve);
        try {
          const attempt = await this.#attempt(keys, token, signal, true, queued);
          if (attempt.grant) {
            granted = true;
            return attempt.grant;
          }
          last = attempt;
        } catch (error) {
          if (signal.aborted || !transient(error)) throw error;
          last = undefined;
        }
      }
    } finally {
      for (const remove of unsubscribe) remove();
      // Given up (aborted, failed): leave the queue, and pass on a lock that
      // a release handed to this waiter meanwhile. close() waits for it.
      if (queued && !granted) {
        instances.giveBackLate(
          this.#release(0, keys, token, true, queued).catch(() => {}),
          performance.now() + this.#settings.ttl,
        );
      }
    }
  }

  /**
   * Subscribes to `channels` on every instance. An instance slow to confirm
   * (down, say) holds this up for one poll interval at most: the poll covers
   * a message missed meanwhile.
   */
  async #subscribe(
    channels: [string, Listener][],
    unsubscribe: (() => void)[],
    signal: AbortSignal,
  ): Promise<void> {
    const ready = this.#instances.list.flatMap((instance) =>
      channels.map(([channel, wake]) => {
        const subscription = instance.subscriptions.add(channel, wake);
        unsubscribe.push(subscription.remove);
        return subscription.ready;
      })
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    const bound = new Promise((resolve) =>
      timer = setTimeout(resolve, this.#settings.retryInterval)
    );
    try {
      await abortable(Promise.race([Promise.all(ready), bound]), signal);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Resolves after `ms` (undefined), or when woken (with what woke it); rejects with the signal's reason. */
  async #sleep(
    ms: number,
    woke: Promise<string | undefined>,
    signal: AbortSignal,
  ): Promise<string | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const elapsed = new Promise<undefined>((resolve) =>
      timer = setTimeout(() => resolve(undefined), ms)
    );
    try {
      return await abortable(Promise.race([elapsed, woke]), signal);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * The lock a release handed to this waiter, with fencing token `fence`
   * (decimal), its lease counted from `seen.at`; undefined if the message is
   * older than that attempt or leaves too little time: the next attempt
   * then confirms it instead.
   */
  #handed(
    keys: ReturnType<typeof keysOf>,
    token: string,
    fence: string,
    seen: Seen,
  ): HeldLock | undefined {
    const { ttl } = this.#settings;
    const value = Number(fence);
    // At least half the lease left, so its first renewal (a third of the
    // TTL from now) comes before its deadline.
    if (!(value > seen.fence) || seen.at + ttl - drift(ttl) - performance.now() < ttl / 2) {
      return undefined;
    }
    return this.#hold(keys, token, value, seen.at);
  }

  /** The acquisition script on every instance, with a WAIT after each grant if `waitReplicas` asks. */
  #each(
    keys: ReturnType<typeof keysOf>,
    token: string,
    sentAt: number,
    bound: number,
    signal: AbortSignal,
    wait: boolean,
  ) {
    const { ttl, waitReplicas } = this.#settings;
    const instances = this.#instances;
    const { list, quorum } = instances;
    return instances.each<Answer>(ACQUIRE, [keys.lock, keys.fence], [token, ttl], {
      // A grant counts once `waitReplicas` replicas have it, or a failover
      // could hand the lock out again with a fencing token gone back.
      then: async (instance, reply) => {
        if ((reply as number) <= 0 || waitReplicas === 0) return reply;
        const waited = waitWithin(sentAt + bound);
        const acked = await instances.replicated(instance, keys.lock, waitReplicas, waited)
          .catch(() => 0);
        return acked < waitReplicas ? { fence: reply as number, acked, waited } : reply;
      },
      read: (reply) =>
        typeof reply === "object"
          ? { kind: "unreplicated", ...(reply as { fence: number; acked: number; waited: number }) }
          : readAcquire(reply),
      failed: failedAnswer,
      bound,
      // A grant, or a lock held elsewhere, needs no more answers. An
      // outcome that will be an error waits for them all (within the
      // bound), so the error says what each instance answered.
      decided: (so) => {
        const acquired = so.filter((a) => a?.kind === "acquired").length;
        const not = so.filter((a) => a !== undefined && a.kind !== "acquired").length;
        const failed = so.filter((a) => a?.kind === "failed").length;
        return acquired >= quorum ||
          (list.length - not < quorum && list.length - failed >= quorum);
      },
      signal,
      // A waiter does not wait out the validity time for an instance that
      // has not answered once a quorum has and no grant is in sight yet (one
      // instance granted, one found it held, one is stopped: it happens when
      // two waiters race): it gives back what it took and tries again soon.
      // The torture run found lock() timing out 73 times in 17 windows with
      // one of three instances stopped, each split attempt waiting ~3 s.
      straggle: wait ? Math.max(STRAGGLE_MIN, 2 * (performance.now() - sentAt)) : undefined,
    });
  }

  /**
   * One attempt on every instance at once. Acquired on a quorum within the
   * validity time: a grant. Otherwise whatever was acquired is given back,
   * and the shortest remaining PTTL tells how long to wait at most. A quorum
   * of answers decides: an instance that has not answered by then (stalled,
   * partitioned) holds nobody up, and what its SET does when it runs late is
   * given back unless it joined a lease that is still held.
   */
  async #attempt(
    keys: ReturnType<typeof keysOf>,
    token: string,
    signal: AbortSignal,
    wait: boolean,
    queued?: string,
  ): Promise<{ grant?: Grant; pttl: number; seen?: Seen }> {
    const { ttl, waitReplicas, retryInterval } = this.#settings;
    const instances = this.#instances;
    const { list, quorum } = instances;
    const sentAt = performance.now();
    // Past the validity time no answer can make a grant: each call's deadline.
    const bound = ttl - drift(ttl);
    const valid = () => ttl - (performance.now() - sentAt) - drift(ttl) > 0;
    let calls: Promise<Answer>[] = [];
    let answered: (Answer | undefined)[];
    try {
      if (list.length === 1 && waitReplicas === 0) {
        // One Redis, no WAIT: the one script call, and the common outcomes
        // (granted in time, held) decided here, without the quorum's arrays.
        // A queued waiter's attempt also takes its place in the queue, or
        // confirms a lock a release handed it.
        const call = (queued === undefined
          ? instances.run(list[0], ACQUIRE, [keys.lock, keys.fence], [token, ttl])
          : instances.run(list[0], ACQUIRE_QUEUED, [keys.lock, keys.fence, keys.queue], [
            token,
            ttl,
            queued,
            Math.max(ttl, 10 * retryInterval),
          ])).then(readAcquire, failedAnswer);
        calls = [call];
        const answer = await instances.until(call, sentAt + bound, signal);
        if (answer !== SILENT && answer.kind === "acquired") {
          if (valid()) {
            return { grant: this.#hold(keys, token, answer.fence, sentAt), pttl: 0 };
          }
        } else if (answer !== SILENT && answer.kind === "held") {
          const pttl = answer.pttl > 0 ? answer.pttl : retryInterval;
          return answer.fence === undefined
            ? { pttl }
            : { pttl, seen: { at: sentAt, fence: answer.fence } };
        }
        answered = [answer === SILENT ? undefined : answer];
      } else {
        const each = this.#each(keys, token, sentAt, bound, signal, wait);
        calls = each.calls;
        answered = await each.answers;
      }
    } catch (reason) {
      // Given up while a SET was in flight (a stalled server, say): when the
      // answer comes, give back whatever it acquired. No ghost lock.
      // It may have been a whole acquisition that waiters saw: wake them.
      this.#giveBackLate(calls, undefined, keys, token, () => true, true);
      throw reason;
    }
    const action = `Cannot acquire lock ${JSON.stringify(keys.name)}`;
    const results = answered.map((a): Answer => a ?? { kind: "failed", error: new Silence(bound) });
    const acquired = results.filter((a) => a.kind === "acquired");
    if (acquired.length >= quorum && valid()) {
      let fence = Math.max(...acquired.map((a) => a.fence));
      if (list.length > 1) {
        try {
          fence = await this.#raise(results, keys, fence, sentAt + bound, action);
        } catch (error) {
          await this.#releaseWhere(results, keys, token, bound, true);
          this.#giveBackLate(calls, answered, keys, token, () => true);
          throw error;
        }
      }
      const held = this.#hold(keys, token, fence, sentAt);
      // A late SET that took the key joined this lease: renewals extend it and
      // the release, sent after it on the same connection, deletes it. Once
      // the lease has ended, nothing will: give it back.
      this.#giveBackLate(calls, answered, keys, token, () => held.ended);
      return { grant: held, pttl: 0 };
    }
    // Taken on a quorum, too late to hold or not replicated: waiters saw it
    // held, so wake them.
    await this.#releaseWhere(results, keys, token, bound, results.filter(took).length >= quorum);
    this.#giveBackLate(calls, answered, keys, token, () => true);
    const failed = results.filter((a): a is Extract<Answer, { kind: "failed" }> =>
      a.kind === "failed"
    );
    const fatal = failed.find((f) => ["auth", "permission"].includes(instances.kind(f.error)));
    if (fatal) throw this.#describe(fatal.error, results, action, token);
    const unreplicated = results.filter((a): a is Extract<Answer, { kind: "unreplicated" }> =>
      a.kind === "unreplicated"
    );
    if (unreplicated.length > 0 && acquired.length + unreplicated.length >= quorum) {
      // Granted, but not safe across a failover: given back above, and said so.
      const fewest = unreplicated.reduce((a, b) => b.acked < a.acked ? b : a);
      const where = list[results.indexOf(fewest)].name;
      throw new LockReplicationError(
        `${action}: ${fewest.acked} of ${waitReplicas} replicas acknowledged the grant on Redis at ${where} within ${
          Math.max(0, Math.round(fewest.waited))
        } ms, so it was given back`,
        { acknowledged: fewest.acked, required: waitReplicas },
      );
    }
    if (list.length - failed.length < quorum) {
      throw this.#describe(undefined, results, action, token);
    }
    const waits = results.filter((a) => a.kind === "held").map((a) => a.pttl).filter((p) => p > 0);
    return { pttl: waits.length > 0 ? Math.min(...waits) : this.#settings.retryInterval };
  }

  /**
   * Gives back, when it comes, each acquisition in `calls` that had not
   * answered in `answered` (all of them without it), if `unwanted()` says so
   * by then; `wake` as for `#giveBack`.
   */
  #giveBackLate(
    calls: Promise<Answer>[],
    answered: (Answer | undefined)[] | undefined,
    keys: ReturnType<typeof keysOf>,
    token: string,
    unwanted: () => boolean,
    wake = false,
  ): void {
    calls.forEach((call, i) => {
      if (answered?.[i] !== undefined) return;
      // close() waits for it (bounded): the give-back needs the connection.
      this.#instances.giveBackLate(
        call.then((answer) =>
          took(answer) && unwanted() ? this.#giveBack(i, keys, token, wake) : undefined
        ),
        performance.now() + this.#settings.ttl,
      );
    });
  }

  /**
   * Gives back an acquisition on instance `i` (fenced: only if the key is
   * still `token`'s). With `wake`, waiters are told; a partial acquisition
   * given back must not wake them, or each wakes the others and itself,
   * takes the key there again, and they spin.
   */
  #giveBack(
    i: number,
    keys: ReturnType<typeof keysOf>,
    token: string,
    wake = false,
  ): Promise<void> {
    return this.#release(i, keys, token, wake).then(() => {}, () => {});
  }

  /**
   * RELEASE of `token`'s key on instance `i`: with `wake`, handed to the
   * queue's first waiter where waiters queue, or waking them all; `member`
   * leaves the queue first (a waiter giving up).
   */
  #release(
    i: number,
    keys: ReturnType<typeof keysOf>,
    token: string,
    wake: boolean,
    member = "",
  ): Promise<unknown> {
    const instance = this.#instances.list[i];
    return this.#instances.run(
      instance,
      RELEASE,
      [keys.lock, keys.queue, keys.fence],
      releaseArgs(instance, keys, token, this.#settings.ttl, wake, wake && this.#queued, member),
    );
  }

  /** An error that says what each instance answered. */
  #describe(
    fatal: unknown,
    results: Answer[],
    action: string,
    token: string,
  ): LockError {
    const list = this.#instances.list;
    const parts = results.map((answer, i) => {
      const where = list[i].name;
      if (answer.kind === "acquired") return `${where} granted it`;
      if (answer.kind === "unreplicated") {
        return `${where} granted it, but only ${answer.acked} replicas acknowledged`;
      }
      if (answer.kind === "held") return `${where} has it held by another holder`;
      return `${where}: ${this.#instances.detail(answer.error, token)}`;
    });
    const reached = results.filter((a) => a.kind !== "failed").length;
    if (list.length === 1) {
      const only = results[0];
      if (only.kind === "failed") {
        if (only.error instanceof Silence) return only.error.fail(action, list[0].name);
        return this.#instances.error(only.error, action, list[0].name, token);
      }
    }
    const summary =
      `${action}: ${reached} of ${list.length} Redis instances answered (${this.#instances.quorum} needed): ${
        parts.join("; ")
      }`;
    if (fatal === undefined) return new LockConnectionError(summary);
    const instances = this.#instances;
    return errorOf(instances.kind(fatal), summary, { cause: instances.scrub(fatal, token) });
  }

  /**
   * Redlock: raises the fencing counter on the acquired instances to the
   * token, so a later majority, which shares one of them, counts past it.
   * A quorum of them by `deadline` is enough.
   */
  async #raise(
    results: Answer[],
    keys: ReturnType<typeof keysOf>,
    fence: number,
    deadline: number,
    action: string,
  ): Promise<number> {
    const instances = this.#instances;
    const { answers } = instances.each<boolean>(RAISE, [keys.fence], [fence], {
      where: (i) => results[i].kind === "acquired",
      read: () => true,
      failed: () => false,
      bound: deadline - performance.now(),
      decided: (so) => so.filter(Boolean).length >= instances.quorum,
    });
    if ((await answers).filter(Boolean).length < instances.quorum) {
      throw new LockConnectionError(`${action}: could not record the fencing token on a quorum`);
    }
    return fence;
  }

  /** Gives back every acquisition in `results`, waiting `bound` ms at most; `wake` as for `#giveBack`. */
  async #releaseWhere(
    results: Answer[],
    keys: ReturnType<typeof keysOf>,
    token: string,
    bound: number,
    wake = false,
  ): Promise<void> {
    const given = Promise.all(
      results.map((answer, i) => took(answer) ? this.#giveBack(i, keys, token, wake) : undefined),
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      // A give-back not answered in time still runs; the key expires anyway.
      await Promise.race([
        given,
        new Promise((resolve) => timer = setTimeout(resolve, Math.max(0, bound))),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** The held lock: see {@linkcode HeldLock}. */
  #hold(keys: ReturnType<typeof keysOf>, token: string, fence: number, sentAt: number): HeldLock {
    return new HeldLock(
      this.#instances,
      this.#settings,
      keys,
      token,
      BigInt(fence),
      sentAt,
      this.#queued,
    );
  }

  status(name: string): Promise<LockStatus> {
    // Bounded like a connection: a stalled instance must not hang the read.
    return readStatus(this.#instances, name, this.#settings.dialTimeout);
  }

  async close(): Promise<void> {
    await this.#onClose();
  }
}

/**
 * A held lock. Loss is decided locally (see `LeaseClock`): the deadline is
 * the send time of the last acquisition or renewal that a quorum confirmed,
 * plus the TTL, less the drift allowance. A renewal that Redis refuses (the
 * key is gone or someone else's) loses the lock at once. A quorum of answers
 * decides each renewal and the release; no call waits past the lease's
 * deadline. Renewals go out in the client's passes, batched (see
 * `Instances.renew`). A class, not closures: it is what each held lock
 * costs in memory.
 */
class HeldLock implements Grant {
  readonly token: bigint;
  readonly loss = new Loss();
  readonly #instances: Instances;
  readonly #settings: LeaseSettings;
  readonly #keys: ReturnType<typeof keysOf>;
  readonly #secret: string;
  readonly #clock: LeaseClock;
  /** Whether its release hands the lock to the queue's first waiter. */
  readonly #queued: boolean;
  #released = false;

  constructor(
    instances: Instances,
    settings: LeaseSettings,
    keys: ReturnType<typeof keysOf>,
    token: string,
    fence: bigint,
    sentAt: number,
    queued: boolean,
  ) {
    this.token = fence;
    this.#queued = queued;
    this.#instances = instances;
    this.#settings = settings;
    this.#keys = keys;
    this.#secret = token;
    const { ttl, autoRenew } = settings;
    this.#clock = new LeaseClock({
      deadline: sentAt + ttl - drift(ttl),
      from: sentAt,
      period: ttl / 3,
      // After a failure try again soon; the deadline is what decides loss.
      retry: Math.min(ttl / 6, 500),
      renew: autoRenew ? () => this.#renew() : undefined,
      lapse: (detail) => this.loss.lose(new LockLostError(keys.name, detail)),
      expired: `its ${ttl} ms lease ran out before a renewal was confirmed`,
      alarms: instances.alarms,
    });
  }

  /** Whether it was released or lost. */
  get ended(): boolean {
    return this.#released || this.loss.lost;
  }

  check(): void {
    this.#clock.check();
  }

  async #renew(): Promise<Renewal> {
    const { ttl, waitReplicas } = this.#settings;
    const instances = this.#instances;
    const { list, quorum } = instances;
    const keys = this.#keys;
    const token = this.#secret;
    const clock = this.#clock;
    const sent = performance.now();
    type Reply = "renewed" | "refused" | "missing" | "failed";
    const count = (replies: (Reply | undefined)[], ...which: Reply[]) =>
      replies.filter((r) => r !== undefined && which.includes(r)).length;
    // What the loss says if no renewal is confirmed before the deadline.
    let why: string | undefined;
    const waitMs = waitWithin(clock.deadline);
    const { calls, answers } = instances.each<Reply>("", [], [], {
      // Batched with the other renewals of this pass. A renewal that the
      // replicas do not have would not survive a failover: not confirmed
      // ("unacknowledged"), and the deadline decides.
      call: (instance) => instances.renew(instance, keys.lock, token, ttl, waitReplicas, waitMs),
      read: (reply) => {
        if (reply === 1) return "renewed";
        if (reply === -1) return "missing";
        if (reply === 0) return "refused";
        why = `the last renewal reached fewer than ${waitReplicas} replicas within ${
          Math.floor(waitMs)
        } ms`;
        return "failed";
      },
      failed: (error) => {
        why = `the last renewal failed: ${instances.detail(error, token)}`;
        return "failed";
      },
      // Past the lease's deadline no answer can save it.
      bound: clock.deadline - sent,
      decided: (so) =>
        count(so, "renewed") >= quorum ||
        list.length - count(so, "refused", "missing") < quorum,
    });
    const replies = await answers;
    if (list.length - count(replies, "refused", "missing") < quorum) {
      return { lost: "its key was deleted or taken over" };
    }
    if (count(replies, "renewed") < quorum) {
      return { ok: false, why: why ?? "the last renewal was not answered in time" };
    }
    // Held on a quorum: put the key back on the minority that lost it, or
    // every waiter's attempt would take it there and give it back. Such an
    // instance may answer after the quorum did: wait for each answer.
    calls.forEach((call, i) =>
      void call.then((reply) => {
        if (reply !== "missing" || this.ended) return;
        return instances.run(list[i], RESTORE, [keys.lock, keys.fence], [
          token,
          ttl,
          String(this.token),
        ]).catch(() => {}); // the next renewal tries again
      })
    );
    return { ok: true, deadline: sent + ttl - drift(ttl) };
  }

  async release(): Promise<void> {
    this.#released = true;
    const clock = this.#clock;
    clock.stop();
    const instances = this.#instances;
    const { list, quorum } = instances;
    const keys = this.#keys;
    const ttl = this.#settings.ttl;
    // Past the lease's deadline (and the drift allowed) the key has expired anyway.
    const until = clock.deadline + drift(ttl);
    const bound = until - performance.now();
    const args = releaseArgs(list[0], keys, this.#secret, ttl, true, this.#queued, "");
    const scriptKeys = [keys.lock, keys.queue, keys.fence];
    if (list.length === 1) {
      // One Redis: its answer decides, without the quorum's arrays.
      const only = list[0];
      let reply: unknown;
      try {
        reply = await instances.until(instances.run(only, RELEASE, scriptKeys, args), until);
      } catch (error) {
        throw this.#releaseError(error, only.name);
      }
      if (reply === SILENT) throw this.#releaseError(new Silence(bound), only.name);
      if (reply !== 1) this.#takenAway();
      return;
    }
    type Reply = "deleted" | "not ours" | { error: unknown };
    const count = (replies: (Reply | undefined)[], which: (r: Reply) => boolean) =>
      replies.filter((r) => r !== undefined && which(r)).length;
    const notOurs = (r: Reply) => r === "not ours";
    const failed = (r: Reply) => typeof r === "object";
    const { answers } = instances.each<Reply>(RELEASE, scriptKeys, args, {
      read: (reply) => reply === 1 ? "deleted" : "not ours",
      failed: (error) => ({ error }),
      bound,
      decided: (so) =>
        count(so, (r) => r === "deleted") >= quorum ||
        list.length - count(so, notOurs) < quorum ||
        list.length - count(so, failed) < quorum,
    });
    const replies = (await answers).map((r): Reply => r ?? { error: new Silence(bound) });
    if (list.length - count(replies, notOurs) < quorum) return this.#takenAway();
    if (list.length - count(replies, failed) < quorum) {
      const i = replies.findIndex(failed);
      throw this.#releaseError((replies[i] as { error: unknown }).error, list[i].name);
    }
  }

  /**
   * The key was deleted, evicted or overwritten while this holder believed
   * it held the lock: the work did not run under it.
   */
  #takenAway(): void {
    this.loss.lose(new LockLostError(this.#keys.name, "it was taken away before the release"));
  }

  /** A release that `where` did not answer (`Silence`) or refused, as the caller's error. */
  #releaseError(error: unknown, where: string): LockError {
    const action = `Cannot release lock ${JSON.stringify(this.#keys.name)}`;
    return error instanceof Silence
      ? error.fail(action, where)
      : this.#instances.error(error, action, where, this.#secret);
  }
}

/**
 * Who holds the lock `name`: held where a quorum has its key; the token is
 * the fencing counter (the holder's, since each grant increments it), the
 * time left the shortest PTTL among the instances that hold it.
 */
async function readStatus(instances: Instances, name: string, bound: number): Promise<LockStatus> {
  const keys = keysOf(name);
  const action = `Cannot read the status of lock ${JSON.stringify(name)}`;
  const answers = await Promise.all(instances.list.map(async (instance) => {
    try {
      const call = instances.run(instance, STATUS, [keys.lock, keys.fence], []);
      const reply = await instances.within(call, bound);
      if (reply === SILENT) return { error: new Silence(bound).fail(action, instance.name) };
      const [pttl, fence] = reply as [number, string];
      return { pttl, fence: BigInt(fence) };
    } catch (error) {
      return { error: instances.error(error, action, instance.name) };
    }
  }));
  const reached = answers.filter((a) => !("error" in a)) as { pttl: number; fence: bigint }[];
  if (reached.length < instances.quorum) {
    throw (answers.find((a) => "error" in a) as { error: LockError }).error;
  }
  const holding = reached.filter((a) => a.pttl !== -2);
  if (holding.length < instances.quorum) return { key: name };
  const ttls = holding.map((a) => a.pttl).filter((p) => p >= 0);
  return {
    key: name,
    holder: {
      token: holding.reduce((max, a) => a.fence > max ? a.fence : max, 0n),
      ttl: ttls.length > 0 ? Math.min(...ttls) : undefined,
    },
  };
}
