// Client errors cross into ours only through scrub(): a plain Error with the
// client's name and message, secrets masked, and nothing else attached. ioredis
// puts a command's arguments (an AUTH password, a lock token) on its errors,
// and gRPC errors carry metadata; none of that may reach a caller or a log.

/** The text that replaces a secret in a message. */
export const MASK = "[redacted]";

/**
 * A copy of `error` that holds only its name and message, with every string
 * of `secrets` masked. The original is not reachable from the copy.
 */
export function scrub(error: unknown, secrets: readonly string[]): Error {
  const source = error instanceof Error ? error : new Error(String(error));
  let message = source.message;
  for (const secret of secrets) {
    if (secret !== "") message = message.split(secret).join(MASK);
  }
  const copy = new Error(message);
  copy.name = source.name;
  // The stack names only our frames' file paths, never arguments; drop the client's.
  copy.stack = `${copy.name}: ${message}`;
  return copy;
}
