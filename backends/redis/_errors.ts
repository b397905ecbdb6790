// What a client's failure means to a caller: its kind, transience, typed error, or Silence.

import {
  LockAuthError,
  LockConnectionError,
  LockError,
  LockPermissionError,
  LockReplicationError,
} from "../../errors.ts";
import { scrub } from "../../_scrub.ts";

/** What kind of failure a client's error message reports. */
export type Kind = "auth" | "permission" | "connection" | "other";

export function kindOf(text: string): Kind {
  // A Sentinel's refusal comes as the last error of ioredis's "All sentinels are unreachable".
  if (
    /^(WRONGPASS|NOAUTH)|^ERR (AUTH|invalid password|.*without any password)|sentinels are unreachable.*Last error: (WRONGPASS|NOAUTH)/i
      .test(text)
  ) {
    return "auth";
  }
  if (/^NOPERM|can't run this command|user executing the script can't/.test(text)) {
    return "permission";
  }
  // Whole words only: a server's CROSSSLOT is no SSL error, and it never
  // heals by waiting.
  if (
    /ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|EHOSTUNREACH|ENETUNREACH|ENOTFOUND|EAI_AGAIN|Connection is closed|Stream isn't writeable|\bconnect|MaxRetriesPerRequest|Reached the max retries|Cluster isn't ready|Cluster is ended|None of startup nodes|Failed to refresh slots|sentinels are unreachable|\bsocket\b|\bTLS\b|\bSSL\b|certificate|max number of clients reached/i
      .test(text)
  ) {
    return "connection";
  }
  return "other";
}

/**
 * Replies that mean "not now": a server loading its data, busy with a
 * script, or a cluster between masters.
 */
const NOT_NOW =
  /^(LOADING|BUSY|TRYAGAIN|CLUSTERDOWN|MASTERDOWN|READONLY)\b|^Too many Cluster redirections/;

/** Whether a failed attempt may succeed later without anything changing on our side. */
export function transient(error: unknown): boolean {
  // A replica that did not acknowledge in time may catch up.
  if (error instanceof LockConnectionError || error instanceof LockReplicationError) return true;
  if (error instanceof LockAuthError || error instanceof LockPermissionError) return false;
  const cause = (error as Error)?.cause;
  return NOT_NOW.test(String((cause as Error)?.message ?? ""));
}

/** A typed error of `kind` with `message`. */
export function errorOf(kind: Kind, message: string, options: ErrorOptions): LockError {
  if (kind === "auth") return new LockAuthError(message, options);
  if (kind === "permission") return new LockPermissionError(message, options);
  if (kind === "connection") return new LockConnectionError(message, options);
  return new LockError(message, options);
}

/** How a failure of each kind reads, for the instance at `where`. */
const PHRASES: Record<Kind, (where: string) => string> = {
  auth: (where) => `Redis at ${where} rejected the credentials`,
  permission: (where) => `permission denied by Redis at ${where}`,
  connection: (where) => `Redis at ${where} is unreachable`,
  other: (where) => `Redis at ${where} answered`,
};

/** What a client's failure means to a caller. */
export function translate(
  error: unknown,
  action: string,
  where: string,
  secrets: readonly string[],
): LockError {
  if (error instanceof LockError) return error;
  const cause = scrub(error, secrets);
  const kind = kindOf(cause.message);
  if (kind === "other" && /^(MOVED|ASK) /.test(cause.message)) {
    // Only a client that is not a Cluster client sees a redirection.
    return new LockError(
      `${action}: Redis at ${where} is a Redis Cluster node that does not serve this key (use mode "cluster"): ${cause.message}`,
      { cause },
    );
  }
  return errorOf(kind, `${action}: ${PHRASES[kind](where)}: ${cause.message}`, { cause });
}

/** An instance that did not answer a call within its deadline. */
export class Silence extends Error {
  constructor(readonly bound: number) {
    super(`no answer within ${Math.round(bound)} ms`);
  }

  /** The caller's error: a connection failure, said as such. */
  fail(action: string, where: string): LockConnectionError {
    return new LockConnectionError(
      `${action}: Redis at ${where} did not answer within ${Math.round(this.bound)} ms`,
    );
  }
}
