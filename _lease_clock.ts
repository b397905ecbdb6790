// One clock per lease for the two jobs every backend's lease has: renewing
// before it runs out, and deciding locally, and early, that it ran out. The
// deadline is the send time of the last confirmed grant or renewal plus what
// the server granted, on the monotonic clock; a paused process therefore
// learns of the loss on its first look (check()), before anything is sent.

/** One alarm of {@linkcode Alarms}: due at `at`, and may run from `early` on. */
export class Alarm {
  readonly at: number;
  readonly early: number;
  readonly run: () => void;
  /** Where it is in its `Alarms`' list; -1 once it ran or was cancelled. */
  index = -1;

  constructor(at: number, early: number, run: () => void) {
    this.at = at;
    this.early = Math.min(early, at);
    this.run = run;
  }
}

/**
 * Many alarms on one timer: the timer is set for the earliest `at`, and
 * when it fires, every alarm whose `early` has come runs in the same pass.
 * Renewals that may run a little early therefore go out together (and a
 * backend can batch them), and a call's deadline or a lease's costs no
 * timer of its own. An alarm added later than the timer is set for needs no
 * new timer; a cancelled one is only forgotten.
 *
 * The alarms are a plain array, cancelled by moving the last one into the
 * gap: most are cancelled within microseconds (a call answered, a lease
 * released), and a `Set` with that churn cost measurably more GC time.
 */
export class Alarms {
  readonly #alarms: Alarm[] = [];
  #timer?: ReturnType<typeof setTimeout>;
  #armedAt = Infinity;

  /** Runs `run` at `at` (monotonic ms), or in a pass from `early` on. */
  add(at: number, run: () => void, early: number = at): Alarm {
    const alarm = new Alarm(at, early, run);
    alarm.index = this.#alarms.length;
    this.#alarms.push(alarm);
    if (at < this.#armedAt) this.#arm(at);
    return alarm;
  }

  cancel(alarm: Alarm | undefined): void {
    if (alarm === undefined || alarm.index < 0) return;
    const alarms = this.#alarms;
    const last = alarms.pop()!;
    if (last !== alarm) {
      alarms[alarm.index] = last;
      last.index = alarm.index;
    }
    alarm.index = -1;
  }

  /** Forgets every alarm and clears the timer. */
  stop(): void {
    for (const alarm of this.#alarms) alarm.index = -1;
    this.#alarms.length = 0;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#armedAt = Infinity;
  }

  #arm(at: number) {
    clearTimeout(this.#timer);
    this.#armedAt = at;
    // Timers and the monotonic clock can disagree by a fraction of a
    // millisecond: an alarm not yet due when it fires waits for the next.
    this.#timer = setTimeout(() => this.#fire(), Math.max(0, at - performance.now()));
  }

  #fire() {
    this.#timer = undefined;
    this.#armedAt = Infinity;
    const now = performance.now();
    const due: Alarm[] = [];
    let next = Infinity;
    for (const alarm of this.#alarms) {
      if (alarm.early <= now) due.push(alarm);
      else if (alarm.at < next) next = alarm.at;
    }
    for (const alarm of due) this.cancel(alarm);
    if (next < Infinity) this.#arm(next);
    for (const alarm of due) alarm.run();
  }
}

/** What one renewal came to. */
export type Renewal =
  /** Confirmed: the lease now lasts until `deadline` (monotonic ms). */
  | { ok: true; deadline: number }
  /**
   * Not confirmed (no answer, an error): try again soon; the deadline
   * decides. `why` is said in the loss if the deadline passes before the
   * next confirmed one (no token or password in it).
   */
  | { ok: false; why?: string }
  /** The server says the lease is gone. */
  | { lost: string };

/** How a lease is kept. */
export interface LeaseClockOptions {
  /** The deadline the grant gave, in `performance.now()` ms. */
  deadline: number;
  /**
   * When the grant was asked for, in `performance.now()` ms, if the caller
   * has it: the first renewal is due `period` ms after it (a little sooner
   * than after now, and one clock read fewer per lease). Defaults to now.
   */
  from?: number;
  /** After a confirmed renewal, the next comes this many ms later. */
  period: number;
  /** After an unconfirmed one, the next comes this many ms later. */
  retry: number;
  /** One renewal; absent for a lease that is not renewed. Should not throw. */
  renew?: () => Promise<Renewal>;
  /** Called once, when the lease is lost, with why. */
  lapse: (detail: string) => void;
  /** Why, when the deadline passes (followed by the last unconfirmed renewal's `why`). */
  expired: string;
  /**
   * The alarms to keep time on, shared with the backend's other leases, so
   * that their renewals go out in passes; without, the clock has its own.
   */
  alarms?: Alarms;
}

/** The renewal and loss timing of one lease. */
export class LeaseClock {
  readonly #options: LeaseClockOptions;
  #deadline: number;
  #renewAt: number;
  #renewing = false;
  #ended = false;
  /** Why the last renewal was not confirmed, if none was since. */
  #why?: string;
  readonly #alarms: Alarms;
  readonly #ownAlarms: boolean;
  #alarm?: Alarm;
  readonly #onAlarm = () => this.#tick();

  constructor(options: LeaseClockOptions) {
    this.#options = options;
    this.#ownAlarms = options.alarms === undefined;
    this.#alarms = options.alarms ?? new Alarms();
    this.#deadline = options.deadline;
    this.#renewAt = options.renew ? (options.from ?? performance.now()) + options.period : Infinity;
    this.#schedule();
  }

  /** The current deadline, in `performance.now()` ms. */
  get deadline(): number {
    return this.#deadline;
  }

  /** Whether the lease was lost or stopped. */
  get ended(): boolean {
    return this.#ended;
  }

  /** Loses the lease now if the deadline has passed; whether it has ended. */
  check(): boolean {
    if (!this.#ended && performance.now() >= this.#deadline) {
      const why = this.#why;
      this.lose(why === undefined ? this.#options.expired : `${this.#options.expired} (${why})`);
    }
    return this.#ended;
  }

  /** Loses the lease: stops the clock and reports `detail`, once. */
  lose(detail: string): void {
    if (this.#ended) return;
    this.stop();
    this.#options.lapse(detail);
  }

  /** Stops the clock without a loss (a release or a close). */
  stop(): void {
    this.#ended = true;
    if (this.#ownAlarms) this.#alarms.stop();
    else this.#alarms.cancel(this.#alarm);
    this.#alarm = undefined;
  }

  /** Renews no more: the lease runs out at its deadline. */
  stopRenewing(): void {
    this.#renewAt = Infinity;
    this.#schedule();
  }

  /** Renews once now, whatever the schedule; resolves when it is done. */
  async renewNow(): Promise<void> {
    await this.#renew(false);
  }

  /** When the next renewal may go, in a pass with others: half a period before it is due. */
  get #renewFrom(): number {
    return this.#renewAt - this.#options.period / 2;
  }

  #schedule() {
    this.#alarms.cancel(this.#alarm);
    this.#alarm = undefined;
    if (this.#ended) return;
    const renewal = !this.#renewing && this.#renewAt < this.#deadline;
    // A renewal may go up to half a period early, in the same pass as the
    // backend's other leases; the loss check runs when it is due.
    this.#alarm = renewal
      ? this.#alarms.add(this.#renewAt, this.#onAlarm, this.#renewFrom)
      : this.#alarms.add(this.#deadline, this.#onAlarm);
  }

  #tick() {
    this.#alarm = undefined;
    // A process that was paused runs this late: decide loss before sending anything.
    if (this.check()) return;
    if (!this.#renewing && performance.now() >= this.#renewFrom) void this.#renew(true);
    this.#schedule();
  }

  async #renew(scheduled: boolean): Promise<void> {
    const renew = this.#options.renew;
    if (renew === undefined || this.#ended) return;
    this.#renewing = true;
    let result: Renewal;
    try {
      result = await renew();
    } catch {
      result = { ok: false }; // (its message is not known to be free of secrets)
    }
    this.#renewing = false;
    if (this.#ended) return;
    if ("lost" in result) return this.lose(result.lost);
    if (result.ok) this.#deadline = Math.max(this.#deadline, result.deadline);
    this.#why = result.ok ? undefined : result.why;
    if (scheduled && this.#renewAt !== Infinity) {
      this.#renewAt = performance.now() + (result.ok ? this.#options.period : this.#options.retry);
    }
    this.#schedule();
  }
}
