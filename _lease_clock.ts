// One timer per lease for the two jobs every backend's lease has: renewing
// before it runs out, and deciding locally, and early, that it ran out. The
// deadline is the send time of the last confirmed grant or renewal plus what
// the server granted, on the monotonic clock; a paused process therefore
// learns of the loss on its first look (check()), before anything is sent.

/** What one renewal came to. */
export type Renewal =
  /** Confirmed: the lease now lasts until `deadline` (monotonic ms). */
  | { ok: true; deadline: number }
  /** Not confirmed (no answer, an error): try again soon; the deadline decides. */
  | { ok: false }
  /** The server says the lease is gone. */
  | { lost: string };

/** How a lease is kept. */
export interface LeaseClockOptions {
  /** The deadline the grant gave, in `performance.now()` ms. */
  deadline: number;
  /** After a confirmed renewal, the next comes this many ms later. */
  period: number;
  /** After an unconfirmed one, the next comes this many ms later. */
  retry: number;
  /** One renewal; absent for a lease that is not renewed. Should not throw. */
  renew?: () => Promise<Renewal>;
  /** Called once, when the lease is lost, with why. */
  lapse: (detail: string) => void;
  /** Why, when the deadline passes. */
  expired: string;
}

/** The renewal and loss timing of one lease. */
export class LeaseClock {
  readonly #options: LeaseClockOptions;
  #deadline: number;
  #renewAt: number;
  #renewing = false;
  #ended = false;
  #timer?: ReturnType<typeof setTimeout>;

  constructor(options: LeaseClockOptions) {
    this.#options = options;
    this.#deadline = options.deadline;
    this.#renewAt = options.renew ? performance.now() + options.period : Infinity;
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
    if (!this.#ended && performance.now() >= this.#deadline) this.lose(this.#options.expired);
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
    clearTimeout(this.#timer);
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

  #schedule() {
    clearTimeout(this.#timer);
    if (this.#ended) return;
    const next = this.#renewing ? this.#deadline : Math.min(this.#renewAt, this.#deadline);
    // Timers and the monotonic clock can disagree by a fraction of a millisecond:
    // a tick that comes early just schedules again.
    this.#timer = setTimeout(() => this.#tick(), Math.max(0, next - performance.now()));
  }

  #tick() {
    // A process that was paused runs this late: decide loss before sending anything.
    if (this.check()) return;
    if (!this.#renewing && performance.now() >= this.#renewAt) void this.#renew(true);
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
      result = { ok: false };
    }
    this.#renewing = false;
    if (this.#ended) return;
    if ("lost" in result) return this.lose(result.lost);
    if (result.ok) this.#deadline = Math.max(this.#deadline, result.deadline);
    if (scheduled && this.#renewAt !== Infinity) {
      this.#renewAt = performance.now() + (result.ok ? this.#options.period : this.#options.retry);
    }
    this.#schedule();
  }
}
