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

// KEYS: lock, queue, fence. ARGV: token, channel, "s" for sharded pub/sub, ttl
// ms, "q" to hand the lock to the queue, the member to take out of the
// queue first (a waiter giving up) or ''. Fenced: only the holder of `token`
// releases. With "q", the lock goes straight to the oldest waiter in the
// queue whose process still listens on its channel (PUBLISH counts the
// listeners; a dead process's entry is dropped): the key is set to that
// waiter's token for `ttl` ms, the counter counts the grant, and only that
// process wakes, told "token:fencing token": the waiter holds the lock from
// that message on (see RedisDriver.#wait for its deadline). Otherwise (no waiter, a Redlock, a Cluster)
// the key is deleted and the lock's channel wakes every waiter.
// Without a channel (a partial acquisition given back) it wakes nobody:
// waiters would only find the lock still held on a majority. pcall: a user
// without rights on the channel still releases (a script is not undone by a
// later error); its waiters then wake by polling. SPUBLISH keeps the message
// in the lock's slot, on a Cluster.
export const RELEASE = `
if ARGV[6] ~= '' then redis.pcall('ZREM', KEYS[2], ARGV[6]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local publish = ARGV[3] == 's' and 'SPUBLISH' or 'PUBLISH'
if ARGV[5] == 'q' then
  for _ = 1, 8 do
    local head = redis.pcall('ZPOPMIN', KEYS[2])
    if head.err or head[1] == nil then break end
    local bar = string.find(head[1], '|', 1, true)
    local token = string.sub(head[1], bar + 1)
    local fence = (tonumber(redis.call('GET', KEYS[3])) or 0) + 1
    local to = ARGV[2] .. ':to:' .. string.sub(head[1], 1, bar - 1)
    local heard = redis.pcall(publish, to, token .. ':' .. fence)
    if type(heard) == 'number' and heard > 0 then
      redis.call('SET', KEYS[1], token, 'PX', ARGV[4])
      redis.call('SET', KEYS[3], fence)
      return 1
    end
  end
end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.pcall(publish, ARGV[2], ARGV[1]) end
return 1`;

// KEYS: lock, fence, queue. ARGV: token, ttl ms, queue member, queue ttl
// ms. A queued waiter's attempt: acquires a free lock (and leaves the
// queue), or confirms a lock a release handed to it (extends it to `ttl`
// from now and answers the counter), or takes its place in the queue (kept
// at its first place) and reports the wait. Answers as ACQUIRE does, but
// held as {-2 - PTTL, counter}: a hand-off message with a higher counter
// came from a release after this attempt ran. A user whose ACL denies the
// queue's commands (TIME, ZADD, ZREM, ZPOPMIN) gets the plain answer: not
// queued, it is woken with everyone on the lock's channel, as on a Redlock.
export const ACQUIRE_QUEUED = `
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.pcall('ZREM', KEYS[3], ARGV[3])
  return redis.call('INCR', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
local wait = -2 - redis.call('PTTL', KEYS[1])
local now = redis.pcall('TIME')
if now.err then return wait end
local added = redis.pcall('ZADD', KEYS[3], 'NX', now[1] .. string.format('%06d', now[2]), ARGV[3])
if type(added) == 'table' and added.err then return wait end
redis.pcall('PEXPIRE', KEYS[3], ARGV[4])
return {wait, tonumber(redis.call('GET', KEYS[2])) or 0}`;

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
  return {
    name,
    lock: base,
    fence: `${base}:fence`,
    queue: `${base}:queue`,
    channel: `${base}:released`,
  };
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
