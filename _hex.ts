// Bytes as lowercase hex: config hashes, lock tokens, script SHAs.

/** `bytes` as lowercase hex, two digits a byte. */
export function toHex(bytes: ArrayBuffer | Uint8Array): string {
  const view = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  return Array.from(view, (b) => b.toString(16).padStart(2, "0")).join("");
}
