"""Key layout and every Lua script the package runs on Redis, with the keys each one touches.

Every compound operation (row + membership set + expiry, a WebSocket room roster, a lock) is a
script, so counts never drift and readers never see half an operation.  A script touches only
the keys passed in ``KEYS``, all in one Cluster slot (see the hash tags in :class:`KeyLayout`);
values are passed as ``ARGV``, never interpolated into the source (the comment above each
script names its ``KEYS`` and ``ARGV``).  This module needs no client library: the WebSocket
registry and the cache import it on every backend.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

MEMBERS = b"__keys__"
_ESCAPED = re.compile(rb"_{2,}keys__")
_GLOB_SPECIAL = re.compile(rb"([\\*?\[\]])")


class KeyLayout:
    """Names of every key and channel under one prefix.

    Rows are hashes like ``zeal:{users}:alice`` (prefix, table, key): the braces around the
    table name are a Redis Cluster hash tag, so a row and its table's membership set
    ``zeal:{users}:__keys__`` always share one slot (one Lua script may touch both).  A user key
    that would collide with the membership set (``__keys__``, or that with more leading
    underscores) gets one more ``_``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._p = prefix.encode("utf-8")

    def table_base(self, table: str) -> bytes:
        """``{prefix}:{table}:``, the start of every key of ``table``."""
        return b"%s:{%s}:" % (self._p, table.encode("utf-8"))

    def row(self, table: str, raw_key: bytes) -> bytes:
        """The hash holding the row ``raw_key`` (validated key bytes)."""
        if _ESCAPED.fullmatch(raw_key):
            raw_key = b"_" + raw_key
        return self.table_base(table) + raw_key

    def members(self, table: str) -> bytes:
        """The membership set of a tracked table (its members are the raw keys)."""
        return self.table_base(table) + MEMBERS

    def raw_key(self, table: str, row_key: bytes) -> bytes | None:
        """The user key of a row key (``None`` for the membership set itself)."""
        rest = row_key[len(self.table_base(table)) :]
        if rest == MEMBERS:
            return None
        if rest.startswith(b"___") and _ESCAPED.fullmatch(rest):
            return rest[1:]
        return rest

    def scan_pattern(self, table: str) -> bytes:
        """A SCAN MATCH pattern for exactly the keys of ``table`` (glob characters escaped)."""
        return _GLOB_SPECIAL.sub(rb"\\\1", self.table_base(table)) + b"*"

    def schema(self, table: str) -> bytes:
        """``{prefix}:schema:{table}``: the declaration every app using ``table`` must share
        (in the table's Cluster slot; no row key starts like it)."""
        return b"%s:schema:{%s}" % (self._p, table.encode("utf-8"))

    def counter(self, name: str) -> bytes:
        """``{prefix}:counter:{name}``."""
        return b"%s:counter:%s" % (self._p, name.encode("utf-8"))

    def channel(self, channel: str | bytes) -> bytes:
        """``{prefix}:ch:{channel}``."""
        return b"%s:ch:%s" % (self._p, _b(channel))

    def receivers(self, channel: str | bytes | None) -> bytes:
        """``{prefix}:{pubsub}:ch:{channel}``, the workers subscribed to ``channel`` (``None``:
        ``{prefix}:{pubsub}:patterns``, every subscribed pattern); one Cluster slot for all."""
        return b"%s:{pubsub}:%s" % (
            self._p,
            b"patterns" if channel is None else b"ch:" + _b(channel),
        )

    def stream(self, stream: str | bytes) -> bytes:
        """``{prefix}:stream:{stream}``."""
        return b"%s:stream:%s" % (self._p, _b(stream))

    def key(self, *parts: str | bytes) -> bytes:
        """``{prefix}:{part}:{part}...``."""
        return b":".join([self._p, *(_b(p) for p in parts)])


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def text(value: object) -> str:
    """A name or value of a Redis reply as text (bytes decoded, undecodable bytes kept)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL when the server lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.body = source.encode("utf-8")
        self.sha = hashlib.sha1(self.body, usedforsecurity=False).hexdigest()

    async def __call__(self, client: Any, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """Run on a redis-py ``client``; NOSCRIPT (after a restart or failover) means it did not
        run, so sending the source is safe."""
        from redis.exceptions import NoScriptError  # the redis extra: only callers have it

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.body, len(keys), *keys, *args)

    def eval_of(self, packed: bytes) -> bytes:
        """The EVAL of the source with the keys and args of ``packed``, an EVALSHA of this
        script in RESP: what to send when the server answers NOSCRIPT."""
        start = packed.index(b"\n") + 1  # after the array header
        head = b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % self.sha.encode()
        if not packed.startswith(head, start):
            raise ValueError(f"not an EVALSHA of script {self.sha}")
        body = b"$4\r\nEVAL\r\n$%d\r\n%b\r\n" % (len(self.body), self.body)
        return packed[:start] + body + packed[start + len(head) :]


# Row scripts write zeros and membership only for a row they create.  A row that existed
# already has its membership (every write that creates a row adds it, in the same script, and
# DELETE/CLEAR_BATCH remove both together), and a column missing from a row reads as its zero:
# so a write to an existing row is one HSET (or HINCRBY), and a "new" row that held only the
# fields just written gets zeros it already read as.  HLEN right after the write tells a
# created row: it holds exactly the fields this write added.
# ARGV[1] mode ('t' tracked, 'x' ttl, '-' neither), ARGV[2] ttl seconds, ARGV[3] the member.

# ARGV[4] n zero-field args, ARGV[5..4+n] zeros of the columns not given, then given fields
SET = Script("""
local n = tonumber(ARGV[4])
local new
if #ARGV > 4 + n then
  local added = redis.call('HSET', KEYS[1], unpack(ARGV, 5 + n, #ARGV))
  new = added > 0 and redis.call('HLEN', KEYS[1]) == added
else
  new = redis.call('EXISTS', KEYS[1]) == 0
end
if new then
  if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n)) end
  if ARGV[1] == 't' then redis.call('SADD', KEYS[2], ARGV[3]) end
end
if ARGV[1] == 'x' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
""")

# KEYS[1..r] rows, KEYS[r+1] membership set; ARGV[1] mode, ARGV[2] ttl, then per row:
# member, nz, nf, nz zero-field args, nf given-field args
MSET = Script("""
local r = #KEYS - 1
local pos = 3
for i = 1, r do
  local member, nz, nf = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  pos = pos + 3
  if nz > 0 and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], unpack(ARGV, pos, pos + nz - 1))
  end
  pos = pos + nz
  if nf > 0 then redis.call('HSET', KEYS[i], unpack(ARGV, pos, pos + nf - 1)) end
  pos = pos + nf
  if ARGV[1] == 't' then redis.call('SADD', KEYS[r + 1], member)
  elseif ARGV[1] == 'x' then redis.call('EXPIRE', KEYS[i], ARGV[2]) end
end
return r
""")

DELETE = Script("""
local n = redis.call('DEL', KEYS[1])
if ARGV[1] == 't' then redis.call('SREM', KEYS[2], ARGV[3]) end
return n
""")

# The increments' shared tail: ``created`` (the write added the row's first field) gives the
# row the zeros of its other columns (ARGV[first..]: n, then field/value pairs) and its
# membership; ttl rows get their expiry on every write.
_AFTER_INCR = """
local function after_incr(created, first)
  if created and redis.call('HLEN', KEYS[1]) == 1 then
    local n = tonumber(ARGV[first])
    if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, first + 1, first + n)) end
    if ARGV[1] == 't' then redis.call('SADD', KEYS[2], ARGV[3]) end
  end
  if ARGV[1] == 'x' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
end
"""

# ARGV[4] column, ARGV[5] step, ARGV[6] lo, ARGV[7] hi, ARGV[8] '1' for INT(8),
# ARGV[9] n zero-field args, ARGV[10..] zeros of the other columns.  Reply: the new value
# (an integer reply), or {status, value}: 'ok' with the value as a string past 2^53, or the
# refusal and the value kept.
INCR_INT = Script(
    _AFTER_INCR
    + """
local col = ARGV[4]
if ARGV[8] == '1' then
  -- INT(8): HINCRBY is exact 64-bit arithmetic and refuses to overflow (value unchanged, so
  -- reading it after a refusal gives the value before).  The caller checked the step fits 64
  -- bits, so a new row (from 0) cannot overflow.  Lua numbers are doubles, exact up to 2^53:
  -- a result that large is re-read as a string, a smaller one is returned as an integer reply.
  local r = redis.pcall('HINCRBY', KEYS[1], col, ARGV[5])
  if type(r) == 'table' and r.err then
    return {'err', r.err, redis.call('HGET', KEYS[1], col) or '0'}
  end
  -- from 0: the field was missing, maybe the whole row
  after_incr(r == tonumber(ARGV[5]), 9)
  if r > -9007199254740992 and r < 9007199254740992 then return r end
  return {'ok', redis.call('HGET', KEYS[1], col)}
end
local raw = redis.call('HGET', KEYS[1], col)
-- INT(1/2/4): doubles are exact here (|value| < 2^31, |step| < 2^33, checked by the caller).
local cur = tonumber(raw or '0')
if cur == nil then return {'bad', raw} end
local nv = cur + tonumber(ARGV[5])
if nv < tonumber(ARGV[6]) or nv > tonumber(ARGV[7]) then return {'overflow', raw or '0'} end
redis.call('HSET', KEYS[1], col, string.format('%d', nv))
after_incr(not raw, 9)
return nv
""",
)

# ARGV[4] column, ARGV[5] step, ARGV[6] '1' when NaN/inf are allowed,
# ARGV[7] n zero-field args, ARGV[8..] zeros of the other columns.  Reply {status, value}.
INCR_FLOAT = Script(
    _AFTER_INCR
    + """
local col = ARGV[4]
local raw = redis.call('HGET', KEYS[1], col)
local cur = tonumber(raw or '0')
if cur == nil then return {'bad', raw} end
local nv = cur + tonumber(ARGV[5])
if ARGV[6] ~= '1' and (nv ~= nv or nv == math.huge or nv == -math.huge) then
  return {'nonfinite', raw or '0'}
end
-- 17 significant digits identify a double exactly (Lua's tostring keeps only 14).
local out = string.format('%.17g', nv)
redis.call('HSET', KEYS[1], col, out)
after_incr(not raw, 7)
return {'ok', out}
""",
)

# ARGV[4] column, ARGV[5] kind ('i', 'f' or 's'), ARGV[6] expected, ARGV[7] new,
# ARGV[8] '1' when expected is the column's zero, ARGV[9] n zero-field args, ARGV[10..] zeros.
# A missing row compares as the zero row and is created only when the comparison succeeds.
CAS = Script("""
local col = ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[8] ~= '1' then return 0 end
  local n = tonumber(ARGV[9])
  if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 10, 9 + n)) end
else
  local raw = redis.call('HGET', KEYS[1], col)
  local eq
  if not raw then eq = ARGV[8] == '1'
  elseif ARGV[5] == 'f' then eq = tonumber(raw) == tonumber(ARGV[6])
  else eq = raw == ARGV[6] end
  if not eq then return 0 end
end
redis.call('HSET', KEYS[1], col, ARGV[7])
if ARGV[1] == 't' then redis.call('SADD', KEYS[2], ARGV[3])
elseif ARGV[1] == 'x' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
""")

# KEYS[1..n] rows, KEYS[n+1] membership set; ARGV = the n members.  Row and membership go
# together, so a concurrent set either survives whole or is removed whole.
CLEAR_BATCH = Script("""
local removed = 0
for i = 1, #KEYS - 1 do removed = removed + redis.call('UNLINK', KEYS[i]) end
if #ARGV > 0 then redis.call('SREM', KEYS[#KEYS], unpack(ARGV)) end
return removed
""")

# A missing counter reads as 0, like the shared-memory Atomic.
COUNTER_CAS = Script("""
if (redis.call('GET', KEYS[1]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
""")

# KEYS[1] row; ARGV[1] column.  {value} (value false when the row lacks the field), or false
# when there is no row: a miss and a zero field read differently.
GET_FIELD = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HGET', KEYS[1], ARGV[1])}
""")

# KEYS[1] {prefix}:schema:{table}; ARGV[1] this app's schema.  Stores it at first use; the
# reply is the schema the table was made with (equal to ARGV[1] unless another app made it).
SCHEMA = Script("""
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
""")

# -- Cache stampede locks: KEYS[1] {prefix}:{namespace}:lock:{key}, a string holding the owner's
# token that expires with the lease; ARGV[1] token, ARGV[2] lease in ms.

LOCK_ACQUIRE = Script("return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])")
LOCK_RENEW = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)
LOCK_RELEASE = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('DEL', KEYS[1]) else return 0 end"
)

# -- Idempotency helpers of Streams consumers: KEYS[1] {prefix}:idem:{key}, a marker string that
# expires after ARGV[1] ms.

IDEM_CLAIM = Script("return redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) and 1 or 0")
# KEYS[2..] the commands' keys; ARGV[2..] per command: name, n, then its n arguments.
APPLY_ONCE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local a = 2
for i = 2, #KEYS do
  local name = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  local args = {}
  for j = 1, n do args[j] = ARGV[a + j - 1] end
  a = a + n
  redis.call(name, KEYS[i], unpack(args))
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
""")

# -- The WebSocket registry (zeal_asgi.messaging.ws.rooms), keys under {prefix}:ws:
#   owner:{client_id}        hash  c=conn_id w=worker
#   room:{<room>}:members    hash  client_id -> worker     (KEYS[1] of the room scripts)
#   room:{<room>}:servers    hash  worker -> members on it (KEYS[2]; KEYS[1] of WS_PUBLISH_ROOM)

WS_RELEASE = Script("""
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
WS_OWN_NX = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'w', ARGV[2])
return 1
""")
# ARGV[3] '1': only when the client is in no worker's roster (a re-registration never moves
# a member that joined again elsewhere)
WS_JOIN = Script("""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == ARGV[2] then return 0 end
if old and ARGV[3] == '1' then return 0 end
if old then
  if redis.call('HINCRBY', KEYS[2], old, -1) <= 0 then redis.call('HDEL', KEYS[2], old) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
""")
WS_LEAVE = Script("""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
if ARGV[2] ~= '' and old ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], old, -1) <= 0 then redis.call('HDEL', KEYS[2], old) end
return 1
""")
WS_PURGE = Script("""
local flat = redis.call('HGETALL', KEYS[1])
local gone = {}
for i = 1, #flat, 2 do
  if flat[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], flat[i])
    gone[#gone + 1] = flat[i]
  end
end
redis.call('HDEL', KEYS[2], ARGV[1])
return gone
""")
# One round trip per room message: the room's workers and a PUBLISH to each, read and sent in
# one step (a worker joining meanwhile is either in the list or joins after the message).
# Returns worker, receivers, worker, receivers, ...
WS_PUBLISH_ROOM = Script("""
local ws = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #ws, 2 do
  if tonumber(ws[i + 1]) > 0 then
    out[#out + 1] = ws[i]
    out[#out + 1] = redis.call('PUBLISH', ARGV[1] .. ws[i], ARGV[2])
  end
end
return out
""")

# Pub/sub receivers: sorted sets of subscribers scored by expiry (server time, ms), KEYS[1] the
# channel's and KEYS[2] the patterns' (RedisLink.publish counts each worker once).
PUBLISH = Script("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return {redis.call('PUBLISH', ARGV[1], ARGV[2]),
        redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf'),
        redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')}
""")

# ARGV[1] ttl in ms (0: withdraw), ARGV[i + 1] the member of KEYS[i]; expired members go too.
RECEIVERS = Script("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if ttl > 0 then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
    redis.call('PEXPIRE', key, ttl)
  else
    redis.call('ZREM', key, ARGV[i + 1])
  end
end
return 0
""")
# -- rate limiting (zeal_asgi.ratelimit) ------------------------------------------------------

RATE_LIMIT_KEY = "rl:{%s:%s}"
"""The hash of one rate-limited key: ``{prefix}:rl:{<limiter>:<key>}``.  The whole name is the
hash tag, so each key's hash lands on its own Cluster slot (a hit touches only that hash)."""

# One hit (ARGV[1] 'h') or peek ('p') of every limit of a limiter on the hash KEYS[1], at the
# server's clock: all limits admit it and are charged together, or nothing changes.
# ARGV[2] algorithm ('f' fixed window, 's' sliding window, 't' token bucket / GCRA),
# ARGV[3] cost, ARGV[4] the hash's expiry (ms), then amount and period (ms) of each limit.
# Fields: w<i> window number, n<i> its count, p<i> the previous window's count, t<i> the
# theoretical arrival time (ms).  Reply {allowed, limit index, remaining, reset ms, retry ms}
# (a peek reports what is left now, a hit what is left after it).
RATE_LIMIT = Script("""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local hit, algo, cost = ARGV[1] == 'h', ARGV[2], tonumber(ARGV[3])
local state = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do state[flat[i]] = tonumber(flat[i + 1]) end
local best, best_left, best_reset = 1, math.huge, 0
local writes = {}  -- writes[i]: the fields limit i sets when every limit admits the hit
for i = 1, (#ARGV - 4) / 2 do
  local amount, period = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local left, reset
  if algo == 't' then
    local step = period / amount
    local tat = math.max(state['t' .. i] or 0, now)
    local new = tat + cost * step
    if new > now + period + step * 1e-3 then
      return {0, i, math.floor((now + period - tat) / step + 1e-9), math.ceil(tat - now),
              math.ceil(new - now - period)}
    end
    if hit then left = math.floor((now + period - new) / step + 1e-9)
    else left = math.floor((now + period - tat) / step + 1e-9) end
    reset = math.ceil(new - now)
    writes[i] = {'t' .. i, string.format('%.17g', new)}
  else
    local w = math.floor(now / period)
    local cur, prev = state['n' .. i] or 0, state['p' .. i] or 0
    local seen = state['w' .. i]
    if seen ~= w then
      if algo == 's' and seen == w - 1 then prev = cur else prev = 0 end
      cur = 0
    end
    local start = w * period
    local bound = amount
    if algo == 's' then bound = amount - math.floor(prev * (1 - (now - start) / period)) end
    reset = start + period - now
    if cur + cost > bound then
      local retry = reset
      if algo == 's' then
        local room = amount - cur - cost
        local at = nil
        if room >= 0 and prev > 0 then
          at = start + period * (1 - (room + 1) / prev)
          if at >= start + period then at = nil end
        end
        if at == nil then
          at = start + period
          if cur > 0 then at = at + period * math.max(0, 1 - (amount - cost + 1) / cur) end
        end
        retry = at - now
      end
      return {0, i, math.max(0, bound - cur), reset, math.ceil(retry)}
    end
    left = bound - cur
    if hit then left = left - cost end
    writes[i] = {'w' .. i, w, 'n' .. i, cur + cost, 'p' .. i, prev}
  end
  if left < best_left then best, best_left, best_reset = i, left, reset end
end
if hit then
  for _, fields in ipairs(writes) do redis.call('HSET', KEYS[1], unpack(fields)) end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {1, best, best_left, best_reset, 0}
""")

RATE_LIMIT_RESET = Script("return redis.call('DEL', KEYS[1])")


# -- Cluster locks (zeal_asgi.locks), keys under {prefix}:lock:
#   lock:{<name>}        string  the holder's random owner id; expires with the lease
#   lock:{<name>}:fence  string  the last fencing token handed out for <name> (never expires)
#   lock:{<name>}:mark   string  the highest mark claimed under the lock (a job's last period)
# Renewing and releasing a lease are LOCK_RENEW and LOCK_RELEASE above (owner checked first).

# KEYS[1] lease, KEYS[2] fence; ARGV[1] owner, ARGV[2] lease ms.  The token, or 0 when another
# owner holds the lease.  Run again by the same owner (a retry) it returns the same token.  A
# token is never below the server clock in microseconds, so tokens keep increasing even after a
# restart that lost the fence.
LOCK_FENCED_ACQUIRE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return tonumber(redis.call('GET', KEYS[2])) end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
local token = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
token = math.max(token, tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('SET', KEYS[2], string.format('%d', token))
return token
""")
# KEYS[1] mark; ARGV[1] the new mark.  1 when it was below (and is now ARGV[1]).
LOCK_CLAIM = Script("""
if tonumber(redis.call('GET', KEYS[1]) or '-1') >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
""")
