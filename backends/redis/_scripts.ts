// The Lua scripts and what they run on (a lock's keys, Cluster slot, token, cached SHA-1).

import { toHex } from "../../_hex.ts";

// KEYS: lock, fence. ARGV: token, ttl ms. Acquires and counts, or reports
// the wait. One integer, not a table, so neither side builds an array: the
// fencing token (1 or more) if acquired, else -2 - PTTL (-1 or less; PTTL is
// -1 for a key without expiry).
export const ACQUIRE = `
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return -2 - redis.call('PTTL', KEYS[1])`;

// KEYS: lock. ARGV: token, channel, "s" for sharded pub/sub. Fenced delete,
// then wake the waiters. Without a channel (a partial acquisition given
// back) it wakes nobody: waiters would only find the lock still held on a
// majority. pcall: a user without rights on the channel still releases (a
// script is not undone by a later error); its waiters then wake by polling.
// SPUBLISH keeps the message in the lock's slot, on a Cluster.
export const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.pcall(ARGV[3] == 's' and 'SPUBLISH' or 'PUBLISH', ARGV[2], ARGV[1])
  end
  return 1
end
return 0`;

// KEYS: locks. ARGV: ttl ms, then each lock's token. Fenced extend of many
// locks at once, one reply per key: 1, or 0 if the key is someone else's,
// or -1 if it is missing. A renewal pass sends one call per hundred locks,
// not one per lock. On a Cluster the keys of one call share a slot.
export const RENEW_MANY = `
local replies = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[i + 1] then
    replies[i] = redis.call('PEXPIRE', key, ARGV[1])
  elseif holder == false then
    replies[i] = -1
  else
    replies[i] = 0
  end
end
return replies`;

/** How many locks one RENEW_MANY call renews at most. */
export const RENEW_BATCH = 100;

// KEYS: lock, fence. ARGV: token, ttl ms, fencing token. Redlock: puts a
// held lease's key back on an instance that lost it (down at the
// acquisition, flushed, evicted), only where it is absent, and raises the
// counter there to the token: the same lease, so nothing is counted.
export const RESTORE = `
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if current < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
  return 1
end
return 0`;

// KEYS: fence. ARGV: token value. Raises the counter to at least the value
// (Redlock: a later majority then counts past every earlier holder's token).
export const RAISE = `
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1`;

/** The keys and channel of one lock. */
export function keysOf(name: string) {
  const base = `lock:{${name}}`;
  return { name, lock: base, fence: `${base}:fence`, channel: `${base}:released` };
}

/** CRC16-CCITT (XModem) of `bytes`, as Redis Cluster hashes keys. */
function crc16(bytes: Uint8Array): number {
  let crc = 0;
  for (const byte of bytes) {
    crc ^= byte << 8;
    for (let bit = 0; bit < 8; bit++) crc = crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1;
    crc &= 0xffff;
  }
  return crc;
}

/**
 * The Cluster slot of `key`: the hash of its first non-empty `{...}` tag,
 * or of the whole key, as Redis and ioredis compute it.
 */
export function slotOf(key: string): number {
  const open = key.indexOf("{");
  const close = open < 0 ? -1 : key.indexOf("}", open + 1);
  const tagged = close > open + 1 ? key.slice(open + 1, close) : key;
  return crc16(new TextEncoder().encode(tagged)) % 16384;
}

/** A random token: a version 4 UUID from Web Crypto (122 random bits), the cheapest source. */
export function randomToken(): string {
  return crypto.randomUUID();
}

export const shas = new Map<string, string>();

/** The SHA-1 of a script, as EVALSHA wants it; computed once per script. */
export async function sha1(script: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-1", new TextEncoder().encode(script));
  const sha = toHex(digest);
  shas.set(script, sha);
  return sha;
}

// KEYS: lock, fence. The lock's remaining PTTL (-2: none) and the fencing counter.
export const STATUS = `return {redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]) or '0'}`;
