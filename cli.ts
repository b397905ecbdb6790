/**
 * The `genesis-lock` command: run a command while holding a lock, on any
 * backend, like `etcdctl lock`, `consul lock` and `flock(1)`. Built on the
 * public API only, so it is also an example of it.
 *
 * ```sh
 * deno run -A jsr:@genesis/lock/cli --backend etcd --endpoints 10.0.0.5:2379 \
 *   --ttl 10s /jobs/nightly-report -- ./report.sh --full
 * ```
 *
 * The command runs with `LOCK_KEY`, `LOCK_TOKEN` (the fencing token) and
 * `LOCK_HELD=1` in its environment. If the lock is lost while it runs, it
 * gets SIGTERM, then SIGKILL after `--kill-after`. `--help` lists every
 * flag, environment variable and exit code.
 *
 * @example Run the CLI from code (as its tests do)
 * ```ts ignore
 * import { main } from "@genesis/lock/cli";
 *
 * const status = await main(["--backend", "memory", "/jobs/a", "--", "true"]);
 * console.log(status); // 0
 * ```
 *
 * @module
 */

import { readFileSync } from "node:fs";
import process from "node:process";
import { parseArgs } from "node:util";
import {
  type Backend,
  type Lease,
  LockAuthError,
  LockConnectionError,
  LockError,
  LockLostError,
  LockPermissionError,
  type LockStatus,
  LockTimeoutError,
  New,
  type Options,
} from "./mod.ts";
import { type Command, environment, exit, onSignals, run, StartError, statusOf } from "./_spawn.ts";

/**
 * The exit codes of `genesis-lock` itself. Otherwise it exits with the
 * command's own code, or 128 + the signal number when a signal killed it.
 *
 * @example Tell a busy lock from a failed job in a shell script
 * ```ts
 * import { EXIT } from "@genesis/lock/cli";
 *
 * console.log(EXIT.busy); // 75: --try found the lock held elsewhere
 * ```
 */
export const EXIT = {
  /** Bad flags, arguments or environment variables. */
  usage: 64,
  /** Any other failure of the lock service (the message says what). */
  failed: 70,
  /** The lock server could not be reached within the dial timeout. */
  unavailable: 69,
  /** `--try` found the lock held elsewhere (change it with `--conflict-exit-code`). */
  busy: 75,
  /** The lock was lost while the command ran; the command was stopped. */
  lost: 76,
  /** The server refused the credentials, or the user may not touch the key. */
  denied: 77,
  /** `--timeout` ran out before the lock was acquired. */
  timedOut: 124,
  /** The command could not be run. */
  notExecutable: 126,
  /** The command was not found. */
  notFound: 127,
} as const;

const HELP = `genesis-lock: run a command while holding a distributed lock

Usage:
  genesis-lock [lock] [flags] KEY -- COMMAND [ARG...]
  genesis-lock status [flags] KEY

lock (the default) waits for the lock on KEY, runs COMMAND with the terminal's
stdin, stdout and stderr, releases the lock when COMMAND exits, and exits with
COMMAND's exit code. COMMAND sees LOCK_KEY, LOCK_TOKEN (the fencing token: it
rises with every new holder) and LOCK_HELD=1 in its environment. SIGINT,
SIGTERM and SIGHUP are passed on to it. If the lock is lost while COMMAND runs,
COMMAND gets SIGTERM, then SIGKILL after --kill-after, and genesis-lock exits
with code 76.

status prints who holds KEY and how many wait (--json for machines).

Flags (each also read from the environment variable shown):
  --backend NAME          etcd (default), redis or memory    GENESIS_LOCK_BACKEND
  --endpoints LIST        host:port[,host:port...]           GENESIS_LOCK_ENDPOINTS
                          (default 127.0.0.1:2379 for etcd, 127.0.0.1:6379 for redis)
  --username NAME         user to authenticate as            GENESIS_LOCK_USERNAME
  --password-file FILE    read the password from FILE        GENESIS_LOCK_PASSWORD_FILE
                          (or set GENESIS_LOCK_PASSWORD; there is no --password
                          flag, so a password never shows in the process list)
  --ttl DURATION          lease time to live (default 10s)   GENESIS_LOCK_TTL
  --dial-timeout DURATION how long to wait to connect (5s)   GENESIS_LOCK_DIAL_TIMEOUT
  --tls                   connect with TLS                   GENESIS_LOCK_TLS=1
  --tls-ca FILE           CA certificate (PEM)               GENESIS_LOCK_TLS_CA
  --tls-cert FILE         client certificate (PEM)           GENESIS_LOCK_TLS_CERT
  --tls-key FILE          client key (PEM)                   GENESIS_LOCK_TLS_KEY
  --tls-server-name NAME  name to verify in the certificate  GENESIS_LOCK_TLS_SERVER_NAME
  --timeout DURATION      give up waiting after DURATION (exit 124; default: wait)
  --try                   one attempt: exit 75 at once if the lock is held elsewhere
  --conflict-exit-code N  the exit code for --try on a held lock (default 75)
  --kill-after DURATION   after a lost lock, SIGKILL the command this long after
                          SIGTERM (default 5s)
  --json                  status: print JSON
  --verbose               say on stderr what happens (never a password)
  -h, --help              print this help

Durations: 500ms, 10s, 1.5s, 2m, 1h.

Exit codes:
  0-255   COMMAND's own exit code; 128+N when signal N killed it
  64      bad usage
  69      cannot connect to the lock server
  70      any other lock service failure
  75      --try: the lock is held elsewhere (see --conflict-exit-code)
  76      the lock was lost while COMMAND ran; COMMAND was stopped
  77      the server refused the credentials, or the user may not use the key
  124     --timeout ran out
  126     COMMAND could not be run; 127: COMMAND not found
`;

/** A usage mistake: printed as one line, exit code 64. */
class UsageError extends Error {}

/** A duration: `500ms`, `10s`, `1.5s`, `2m` or `1h`, in milliseconds. */
export function parseDuration(text: string, what: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(text.trim());
  if (!match) {
    throw new UsageError(
      `Invalid ${what}: expected a duration such as 500ms, 10s or 2m, received ${
        JSON.stringify(text)
      }`,
    );
  }
  const unit = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 }[match[2] as "ms" | "s" | "m" | "h"];
  return Math.round(Number(match[1]) * unit);
}

const FLAGS = {
  backend: { type: "string" },
  endpoints: { type: "string" },
  username: { type: "string" },
  "password-file": { type: "string" },
  ttl: { type: "string" },
  "dial-timeout": { type: "string" },
  tls: { type: "boolean" },
  "tls-ca": { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  "tls-server-name": { type: "string" },
  timeout: { type: "string" },
  try: { type: "boolean" },
  "conflict-exit-code": { type: "string" },
  "kill-after": { type: "string" },
  json: { type: "boolean" },
  verbose: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

/** What the command line and the environment ask for. */
interface Invocation {
  verb: "lock" | "status" | "help";
  key: string;
  command: string[];
  options: Options;
  timeout?: number;
  try: boolean;
  conflictCode: number;
  killAfter: number;
  json: boolean;
  verbose: boolean;
}

/** Reads the flags, falling back to the GENESIS_LOCK_* environment variables. */
function parse(args: string[], env: Record<string, string>): Invocation {
  const split = args.indexOf("--");
  const head = split === -1 ? args : args.slice(0, split);
  const command = split === -1 ? [] : args.slice(split + 1);
  let parsed;
  try {
    parsed = parseArgs({ args: head, options: FLAGS, allowPositionals: true, strict: true });
  } catch (error) {
    const unknown = /Unknown option '([^']+)'/.exec((error as Error).message);
    throw new UsageError(
      unknown
        ? `Unknown flag ${JSON.stringify(unknown[1])}: flags go before KEY, the command after "--"`
        : (error as Error).message,
    );
  }
  const { values, positionals } = parsed;
  if (values.help) return { verb: "help" } as Invocation;
  let verb: "lock" | "status" = "lock";
  if (positionals[0] === "lock" || positionals[0] === "status") {
    verb = positionals.shift() as "lock" | "status";
  }
  if (positionals.length === 0) throw new UsageError("Missing KEY: the name of the lock");
  const [key, ...rest] = positionals;
  if (verb === "lock") {
    if (rest.length > 0) command.unshift(...rest);
    if (command.length === 0) throw new UsageError(`Missing COMMAND: give it after "--"`);
  } else if (rest.length > 0 || split !== -1) {
    throw new UsageError(`status takes one KEY and no command`);
  }
  const pick = (flag: keyof typeof FLAGS, name: string): string | undefined => {
    const value = values[flag as keyof typeof values];
    if (typeof value === "string") return value;
    const fromEnv = env[`GENESIS_LOCK_${name}`];
    return fromEnv === undefined || fromEnv === "" ? undefined : fromEnv;
  };
  const duration = (flag: keyof typeof FLAGS, name: string) => {
    const text = pick(flag, name);
    return text === undefined ? undefined : parseDuration(text, `--${flag}`);
  };
  const readFile = (path: string, what: string) => {
    try {
      return readFileSync(path, "utf8");
    } catch (error) {
      throw new UsageError(
        `Cannot read ${what} ${JSON.stringify(path)}: ${(error as Error).message}`,
      );
    }
  };
  const passwordFile = pick("password-file", "PASSWORD_FILE");
  const password = passwordFile !== undefined
    ? readFile(passwordFile, "--password-file").replace(/\r?\n$/, "")
    : env.GENESIS_LOCK_PASSWORD || undefined;
  const ca = pick("tls-ca", "TLS_CA");
  const cert = pick("tls-cert", "TLS_CERT");
  const keyFile = pick("tls-key", "TLS_KEY");
  const serverName = pick("tls-server-name", "TLS_SERVER_NAME");
  const tlsWanted = values.tls === true || /^(1|true|yes)$/i.test(env.GENESIS_LOCK_TLS ?? "") ||
    ca !== undefined || cert !== undefined || keyFile !== undefined || serverName !== undefined;
  const options: Options = {
    backend: pick("backend", "BACKEND") as Backend | undefined,
    endpoints: pick("endpoints", "ENDPOINTS")?.split(",").map((e) => e.trim()).filter(Boolean),
    username: pick("username", "USERNAME"),
    password,
    ttl: duration("ttl", "TTL"),
    dialTimeout: duration("dial-timeout", "DIAL_TIMEOUT"),
  };
  if (tlsWanted) {
    options.tls = ca === undefined && cert === undefined && keyFile === undefined &&
        serverName === undefined
      ? true
      : {
        ca: ca === undefined ? undefined : readFile(ca, "--tls-ca"),
        cert: cert === undefined ? undefined : readFile(cert, "--tls-cert"),
        key: keyFile === undefined ? undefined : readFile(keyFile, "--tls-key"),
        serverName,
      };
  }
  const conflict = values["conflict-exit-code"];
  const conflictCode = conflict === undefined ? EXIT.busy : Number(conflict);
  if (!Number.isInteger(conflictCode) || conflictCode < 0 || conflictCode > 255) {
    throw new UsageError(
      `Invalid --conflict-exit-code: expected a whole number from 0 to 255, received ${
        JSON.stringify(conflict)
      }`,
    );
  }
  if (values.try && values.timeout !== undefined) {
    throw new UsageError("--try and --timeout exclude each other: --try never waits");
  }
  return {
    verb,
    key,
    command,
    options,
    timeout: values.timeout === undefined ? undefined : parseDuration(values.timeout, "--timeout"),
    try: values.try === true,
    conflictCode,
    killAfter: values["kill-after"] === undefined
      ? 5_000
      : parseDuration(values["kill-after"], "--kill-after"),
    json: values.json === true,
    verbose: values.verbose === true,
  };
}

/** Writes one line to stderr, prefixed with the command's name. */
function say(line: string): void {
  process.stderr.write(`genesis-lock: ${line}\n`);
}

/** The exit code and the one line that explain a failure of the lock service. */
function explain(error: unknown, invocation: Invocation): number {
  const backend = invocation.options.backend ?? "etcd";
  const message = error instanceof Error ? error.message : String(error);
  if (error instanceof TypeError || error instanceof RangeError) {
    say(message);
    return EXIT.usage;
  }
  if (error instanceof LockTimeoutError) {
    say(message);
    return EXIT.timedOut;
  }
  if (error instanceof LockConnectionError) {
    const start = backend === "redis" ? "redis-server" : "etcd";
    say(
      `${message} (is ${start} running there? Give its address with --endpoints, ` +
        `or try --backend memory for a lock within this process)`,
    );
    return EXIT.unavailable;
  }
  if (error instanceof LockAuthError || error instanceof LockPermissionError) {
    say(message);
    return EXIT.denied;
  }
  say(error instanceof LockError ? message : `unexpected failure: ${message}`);
  return EXIT.failed;
}

/** Raised into a wait that a signal interrupted. */
class Interrupted extends Error {
  readonly signal: NodeJS.Signals;
  constructor(signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
    this.signal = signal;
  }
}

const FORWARDED = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

/** The `lock` verb: hold the lock while the command runs. */
async function lockAndRun(invocation: Invocation, env: Record<string, string>): Promise<number> {
  const { key, verbose } = invocation;
  const locker = New(invocation.options);
  const waiting = new AbortController();
  let command: Command | undefined;
  const stopSignals = onSignals(FORWARDED, (signal) => {
    if (command) command.kill(signal);
    else waiting.abort(new Interrupted(signal));
  });
  try {
    let lease: Lease | undefined;
    try {
      lease = invocation.try
        ? await locker.tryLock(key, { signal: waiting.signal })
        : await locker.lock(key, { signal: waiting.signal, timeout: invocation.timeout });
    } catch (error) {
      if (error instanceof Interrupted) return 128 + signalCode(error.signal);
      return explain(error, invocation);
    }
    if (lease === undefined) {
      say(`lock ${JSON.stringify(key)} is held elsewhere`);
      return invocation.conflictCode;
    }
    if (verbose) say(`holding lock ${JSON.stringify(key)} with fencing token ${lease.token}`);
    const childEnv: Record<string, string> = {
      ...env,
      LOCK_KEY: key,
      LOCK_TOKEN: String(lease.token),
      LOCK_HELD: "1",
    };
    // The command need not know the lock service's password.
    delete childEnv.GENESIS_LOCK_PASSWORD;
    try {
      command = run(invocation.command[0], invocation.command.slice(1), childEnv);
    } catch (error) {
      await lease.release().catch(() => {});
      throw error;
    }
    return await supervise(command, lease, invocation);
  } finally {
    stopSignals();
    await locker.close().catch((error) => {
      say(`while closing: ${error instanceof Error ? error.message : String(error)}`);
    });
  }
}

function signalCode(signal: NodeJS.Signals): number {
  return statusOf({ signal }) - 128;
}

/** Waits for the command; stops it if the lock is lost first. */
async function supervise(command: Command, lease: Lease, invocation: Invocation): Promise<number> {
  const lost = new Promise<void>((resolve) => {
    if (lease.signal.aborted) resolve();
    else lease.signal.addEventListener("abort", () => resolve(), { once: true });
  });
  let exit;
  try {
    exit = await Promise.race([command.exited, lost.then(() => undefined)]);
  } catch (error) {
    await lease.release().catch(() => {});
    if (error instanceof StartError) {
      say(error.message);
      return error.exitCode;
    }
    throw error;
  }
  if (exit === undefined) {
    const reason = lease.signal.reason;
    say(`${reason instanceof Error ? reason.message : "the lock was lost"}: stopping the command`);
    command.kill("SIGTERM");
    const timer = setTimeout(() => command.kill("SIGKILL"), invocation.killAfter);
    await command.exited.catch(() => undefined);
    clearTimeout(timer);
    return EXIT.lost;
  }
  try {
    await lease.release();
  } catch (error) {
    say(`the command ended, but releasing the lock failed: ${(error as Error).message}`);
  }
  if (lease.signal.reason instanceof LockLostError) {
    // Found at release: the command ran part of its time without the lock.
    say(`${lease.signal.reason.message}: the command may have run without it`);
    return EXIT.lost;
  }
  if (invocation.verbose) say(`released lock ${JSON.stringify(invocation.key)}`);
  return statusOf(exit);
}

/** The `status` verb. */
async function printStatus(invocation: Invocation): Promise<number> {
  const locker = New(invocation.options);
  try {
    let status: LockStatus;
    try {
      status = await locker.status(invocation.key);
    } catch (error) {
      return explain(error, invocation);
    }
    if (invocation.json) {
      process.stdout.write(
        JSON.stringify(status, (_, v) => typeof v === "bigint" ? String(v) : v) + "\n",
      );
    } else {
      process.stdout.write(describeStatus(status));
    }
    return 0;
  } finally {
    await locker.close().catch(() => {});
  }
}

/** A status as lines a person reads. */
function describeStatus(status: LockStatus): string {
  const lines = [`key:      ${status.key}`];
  if (status.holder === undefined) {
    lines.push("held:     no");
  } else {
    const { holder } = status;
    lines.push("held:     yes");
    lines.push(`token:    ${holder.token}`);
    if (holder.owner !== undefined) lines.push(`owner:    ${holder.owner}`);
    if (holder.lease !== undefined) lines.push(`lease:    ${holder.lease}`);
    if (holder.ttl !== undefined) lines.push(`ttl left: ${(holder.ttl / 1000).toFixed(1)} s`);
  }
  if (status.waiting !== undefined) lines.push(`waiting:  ${status.waiting}`);
  for (const waiter of status.queue ?? []) lines.push(`  queued: ${waiter}`);
  return lines.join("\n") + "\n";
}

/**
 * Runs the CLI on `args` (without the program name) and resolves its exit
 * code. Prints to stdout and stderr; never exits the process itself.
 *
 * @param args The command-line arguments.
 * @param env The environment to read `GENESIS_LOCK_*` from and to pass on.
 * @returns The exit code.
 */
export async function main(
  args: string[],
  env: Record<string, string> = environment(),
): Promise<number> {
  let invocation: Invocation;
  try {
    invocation = parse(args, env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    say(error.message);
    say(`try "genesis-lock --help"`);
    return EXIT.usage;
  }
  if (invocation.verb === "help") {
    process.stdout.write(HELP);
    return 0;
  }
  try {
    return invocation.verb === "status"
      ? await printStatus(invocation)
      : await lockAndRun(invocation, env);
  } catch (error) {
    return explain(error, invocation);
  }
}

/** Whether this module is the program being run (Deno, Bun, or Node via its argv). */
function isMain(): boolean {
  const meta = import.meta as ImportMeta & { main?: boolean };
  if (typeof meta.main === "boolean") return meta.main;
  const script = process.argv[1];
  return script !== undefined && import.meta.url.endsWith(script.replace(/^.*[\\/]/, "/"));
}

if (isMain()) await exit(await main(process.argv.slice(2)));
