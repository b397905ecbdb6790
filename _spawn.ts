// The CLI's one runtime-facing helper: start a command with the terminal's
// stdin, stdout and stderr, signal it, learn how it ended, and hear the
// signals sent to this process. node:child_process and node:process behave
// the same here on Deno, Bun and Node, so nothing else needs to know which
// runtime runs the CLI.

import { spawn } from "node:child_process";
import { constants } from "node:os";
import process from "node:process";

/** How a command ended: its exit code, or the signal that killed it. */
export type Exit = { code: number } | { signal: NodeJS.Signals };

/** A running command. */
export interface Command {
  /** Resolves when the command has ended, or rejects if it could not start. */
  readonly exited: Promise<Exit>;
  /** Sends `signal` to the command; ignored once it has ended. */
  kill(signal: NodeJS.Signals): void;
}

/** Why a command could not start: the shell's exit code for it and a message. */
export class StartError extends Error {
  /** 127 when the command was not found, 126 when it could not be run. */
  readonly exitCode: number;

  constructor(command: string, code: string | undefined) {
    const missing = code === "ENOENT";
    super(
      missing
        ? `Cannot run ${JSON.stringify(command)}: command not found`
        : `Cannot run ${JSON.stringify(command)}: ${code ?? "it could not be started"}`,
    );
    this.name = "StartError";
    this.exitCode = missing ? 127 : 126;
  }
}

/** Starts `command` with `args`, inheriting stdio, with `env` as its whole environment. */
export function run(command: string, args: string[], env: Record<string, string>): Command {
  const child = spawn(command, args, { stdio: "inherit", env });
  let ended = false;
  const exited = new Promise<Exit>((resolve, reject) => {
    child.once("error", (error: NodeJS.ErrnoException) => {
      ended = true;
      reject(new StartError(command, error.code));
    });
    child.once("exit", (code, signal) => {
      ended = true;
      resolve(signal ? { signal } : { code: code ?? 0 });
    });
  });
  return {
    exited,
    kill(signal) {
      if (ended) return;
      try {
        // process.kill, not child.kill: Deno's child.kill() makes the exit
        // report the signal even when the command caught it and exited 0.
        process.kill(child.pid!, signal);
      } catch {
        // Gone meanwhile.
      }
    },
  };
}

/** The exit status a shell reports for `exit`: the code, or 128 + the signal's number. */
export function statusOf(exit: Exit): number {
  if ("code" in exit) return exit.code;
  return 128 + (constants.signals[exit.signal] ?? 0);
}

/** The number of a signal, as `kill -l` numbers it. */
export function signalNumber(signal: NodeJS.Signals): number {
  return constants.signals[signal] ?? 0;
}

/** Calls `handler` for each of `signals` sent to this process until the returned function is called. */
export function onSignals(
  signals: readonly NodeJS.Signals[],
  handler: (signal: NodeJS.Signals) => void,
): () => void {
  const listeners = signals.map((signal) => {
    const listener = () => handler(signal);
    process.on(signal, listener);
    return () => process.off(signal, listener);
  });
  return () => listeners.forEach((remove) => remove());
}

/** This process's environment, as strings. */
export function environment(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** Ends this process with `code`, once what was written to stdout and stderr is out. */
export async function exit(code: number): Promise<never> {
  await Promise.all(
    [process.stdout, process.stderr].map((stream) =>
      new Promise<void>((resolve) => {
        if (stream.writableLength === 0) return resolve();
        stream.write("", () => resolve());
      })
    ),
  );
  process.exit(code);
}
