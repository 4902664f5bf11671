"""The durable ingestion buffer: a Redis Stream read through one consumer group.

Each stream entry is one accepted API call's new events: `n`, and `rows`, their COPY text lines
(`usage.rows`) joined by newlines, and `v`, the line format (absent: lines from before the tenant
column). Adding is one Lua script that claims each (tenant, request_id) (SET NX) and appends only
the unclaimed ones, so concurrent repeats are told apart atomically. Entries stay pending until
the rows are committed; acknowledging is another script that XACKs, XDELs and lowers the depth
counter only for entries not acknowledged before, so a re-claimed entry is counted once, and that
parks the entries' lines the database refused in the dead-letter stream in the same step.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import redis

from tokenmgr_project.core import redis as tm_redis
from usage import rows as rows_codec

GROUP = "flushers"

# The one way a reservation's hold is released (settled by usage here; cancelled or expired by
# budgets.counters' scripts): subtract it from each counter it holds on, mark its status (and any
# extra field/value pairs), drop it from the open set. Returns its status before.
HOLD_RELEASE_LUA = r"""
-- Negate the integer string itself: tonumber is a double, inexact past 2^53 ("-0" is no integer
-- to HINCRBY, hence the zero case).
local function neg(s)
  if not s or s == '0' or s == '' then return '0' end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end
local function release(rkey, openz, status, ...)
  local r = redis.call('HMGET', rkey, 'keys', 'hc', 'ht', 'status')
  if r[4] == 'open' then
    for k in string.gmatch(r[1] or '', '[^,]+') do
      redis.call('HINCRBY', k, 'hc', neg(r[2]))
      redis.call('HINCRBY', k, 'ht', neg(r[3]))
    end
    redis.call('HSET', rkey, 'status', status, ...)
  end
  redis.call('ZREM', openz, rkey)
  return r[4]
end
"""

_ADD = (
    HOLD_RELEASE_LUA
    + r"""
local n = tonumber(ARGV[3])
local flags = {}
local rows = {}
-- Per event after the ids and rows: reservation key ('' none), cost, tokens, #counters, counters.
local pos = 4 + 2 * n
local openz = ARGV[pos]
pos = pos + 1
-- Last two: the team and project the recording key is limited to ('' = any). Another scope's
-- reservation is answered exactly like an unknown one: it can be neither settled nor probed.
local hteam, hproject = ARGV[#ARGV - 1], ARGV[#ARGV]
local function foreign(rsv)
  if hteam == '' and hproject == '' then
    return false
  end
  local s = redis.call('HMGET', rsv, 'team', 'project')
  return (hteam ~= '' and s[1] ~= hteam) or (hproject ~= '' and s[2] ~= hproject)
end
for i = 1, n do
  local rsv, cost, tokens, k = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local first = pos + 4
  pos = first + k
  if rsv ~= '' and (redis.call('EXISTS', rsv) == 0 or foreign(rsv)) then
    flags[i] = 2
  elseif redis.call('SET', ARGV[1] .. ARGV[3 + i], '1', 'NX', 'EX', ARGV[2]) then
    flags[i] = 1
    rows[#rows + 1] = ARGV[3 + n + i]
    if rsv ~= '' then
      release(rsv, openz, 'settled', 'request_id', ARGV[3 + i])
    end
    -- Only seeded counters: a missing one is loaded from the ledger and buffer when next read.
    for j = first, first + k - 1 do
      if redis.call('HEXISTS', ARGV[j], 's') == 1 then
        redis.call('HINCRBY', ARGV[j], 'c', cost)
        redis.call('HINCRBY', ARGV[j], 't', tokens)
      end
    end
  else
    flags[i] = 0
  end
end
local depth = 0
if #rows > 0 then
  redis.call('XADD', KEYS[1], '*', 'n', #rows, 'rows', table.concat(rows, '\n'), 'v', '2')
  depth = redis.call('INCRBY', KEYS[2], #rows)
else
  depth = tonumber(redis.call('GET', KEYS[2]) or '0')
end
flags[n + 1] = depth
return flags
"""
)

_ACK = r"""
-- ARGV: group, #entries, then (entry id, events) per entry, then (entry id, line, error, time)
-- per dead letter. A dead letter is parked only with its entry's first acknowledgement.
local events = 0
local acked = {}
local last = 2 + 2 * tonumber(ARGV[2])
for i = 3, last, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    events = events + tonumber(ARGV[i + 1])
    acked[ARGV[i]] = true
  end
end
for i = last + 1, #ARGV, 4 do
  if acked[ARGV[i]] then
    redis.call('XADD', KEYS[3], '*', 'entry', ARGV[i], 'line', ARGV[i + 1], 'error', ARGV[i + 2],
      'at', ARGV[i + 3])
  end
end
if events > 0 then
  redis.call('DECRBY', KEYS[2], events)
end
return events
"""

_RELEASE = r"""
for i = 1, #ARGV do
  redis.call('DEL', ARGV[i])
end
return #ARGV
"""


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    count: int
    lines: list[str]


def stream_key() -> str:
    return tm_redis.key("usage", "stream")


def depth_key() -> str:
    return tm_redis.key("usage", "depth")


def dedupe_prefix() -> str:
    return tm_redis.key("usage", "rid") + ":"


def claim_prefix(tenant: str) -> str:
    """Prefix of a tenant's claim keys. The tenant's length goes first, so no (tenant,
    request_id) pair can spell another's key ("p:a/b" + "c:1" vs "p:a/b:c" + "1")."""
    return f"{dedupe_prefix()}{len(tenant)}:{tenant}:"


def dead_key() -> str:
    return tm_redis.key("usage", "dead")


def stats_key() -> str:
    return tm_redis.key("usage", "flush")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(client: redis.Redis) -> None:
    try:
        # From id 0 so entries written before the group existed are still flushed.
        client.xgroup_create(stream_key(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


NEW, DUPLICATE, UNKNOWN_RESERVATION = 1, 0, 2


@dataclass(frozen=True, slots=True)
class Counting:
    """What a new event also does, atomically with being buffered: settle its reservation (a
    Redis key, or '') and add its cost (budgets.counters units: 1e-10 USD, exact) and tokens to
    each seeded counter key."""

    reservation_key: str = ""
    cost_units: int = 0
    tokens: int = 0
    counter_keys: tuple[str, ...] = ()


_NOTHING = Counting()


def add(
    request_ids: list[str],
    payloads: list[str],
    ttl_seconds: int,
    counting: list[Counting] | None = None,
    open_reservations_key: str = "",
    *,
    tenant: str,
    holder: tuple[str, str] = ("", ""),
) -> tuple[list[int], int]:
    """Claim and buffer one tenant's events. Returns (NEW / DUPLICATE / UNKNOWN_RESERVATION per
    event, buffered depth after the add). An event naming an unknown reservation, or one made
    outside `holder` (the team and project the recording key is limited to, '' = any), is
    neither claimed nor stored."""
    args: list[Any] = [claim_prefix(tenant), ttl_seconds, len(request_ids), *request_ids, *payloads]
    args.append(open_reservations_key)
    for item in counting or [_NOTHING] * len(request_ids):
        args.extend((item.reservation_key, item.cost_units, item.tokens, len(item.counter_keys)))
        args.extend(item.counter_keys)
    args.extend(holder)
    result = tm_redis.run_script(_ADD, [stream_key(), depth_key()], args)
    depth = int(result[-1])
    return [int(flag) for flag in result[:-1]], depth


def release(tenant: str, request_ids: list[str]) -> None:
    """Forget claims for events that were not buffered after all (used on rollback paths)."""
    if request_ids:
        prefix = claim_prefix(tenant)
        tm_redis.run_script(_RELEASE, args=[prefix + rid for rid in request_ids])


def _entries(raw: list[Any]) -> list[Entry]:
    entries = []
    for entry_id, fields in raw:
        if not fields:  # deleted while pending: nothing left to write
            entries.append(Entry(entry_id.decode(), 0, []))
            continue
        lines = fields[b"rows"].decode().split("\n")
        if b"v" not in fields:  # buffered by a server from before the tenant column
            lines = [rows_codec.upgrade_legacy_line(line) for line in lines]
        entries.append(Entry(entry_id.decode(), int(fields[b"n"]), lines))
    return entries


def read_new(consumer: str, count: int) -> list[Entry]:
    client = tm_redis.client()
    ensure_group(client)
    response: Any = client.xreadgroup(GROUP, consumer, {stream_key(): ">"}, count=count)
    if not response:
        return []
    return _entries(response[0][1])


def reclaim(consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
    """Entries another consumer read but never acknowledged for `min_idle_ms` (it died)."""
    client = tm_redis.client()
    ensure_group(client)
    claimed_reply: Any = client.xautoclaim(
        stream_key(), GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
    )
    return _entries(claimed_reply[1])


@dataclass(frozen=True, slots=True)
class DeadLine:
    """A line of a buffered entry that the database refused on its own."""

    entry_id: str
    line: str
    error: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dead_id: str
    entry_id: str
    line: str
    error: str
    parked_at: str

    @property
    def tenant(self) -> str:
        return rows_codec.line_key(self.line)[0] if "\t" in self.line else ""

    @property
    def request_id(self) -> str:
        return rows_codec.line_request_id(self.line)


def ack(entries: list[Entry], dead: list[DeadLine] | None = None, parked_at: str = "") -> int:
    """Acknowledge committed entries, parking their `dead` lines (atomically, once per entry);
    returns how many events left the buffer."""
    if not entries:
        return 0
    args: list[Any] = [GROUP, len(entries)]
    for entry in entries:
        args.extend((entry.entry_id, entry.count))
    for item in dead or ():
        args.extend((item.entry_id, item.line, item.error, parked_at))
    return int(tm_redis.run_script(_ACK, [stream_key(), depth_key(), dead_key()], args))


def _dead_letters(raw: list[Any]) -> list[DeadLetter]:
    return [
        DeadLetter(
            dead_id.decode(),
            fields[b"entry"].decode(),
            fields[b"line"].decode(),
            fields[b"error"].decode(),
            fields[b"at"].decode(),
        )
        for dead_id, fields in raw
        if fields
    ]


def dead_letters(count: int = 1000, ids: list[str] | None = None) -> list[DeadLetter]:
    """Parked lines, oldest first: all (up to `count`), or those of the given ids."""
    client = tm_redis.client()
    if ids is None:
        raw: Any = client.xrange(dead_key(), count=count)
        return _dead_letters(raw)
    with client.pipeline(transaction=False) as pipe:
        for dead_id in ids:
            pipe.xrange(dead_key(), min=dead_id, max=dead_id)
        found: list[Any] = pipe.execute()
    return _dead_letters([item for items in found for item in items])


def dead_remove(ids: list[str]) -> int:
    if not ids:
        return 0
    return int(tm_redis.client().xdel(dead_key(), *ids))


def dead_summary() -> tuple[int, DeadLetter | None]:
    """(how many lines are parked, the oldest)."""
    client = tm_redis.client()
    with client.pipeline(transaction=False) as pipe:
        pipe.xlen(dead_key())
        pipe.xrange(dead_key(), count=1)
        count, first = pipe.execute()
    oldest = _dead_letters(first)
    return int(count), oldest[0] if oldest else None


def depth() -> int:
    raw = tm_redis.client().get(depth_key())
    return int(raw or 0)


def pending_entries() -> int:
    client = tm_redis.client()
    try:
        summary = client.xpending(stream_key(), GROUP)
    except redis.ResponseError:
        return 0
    return int(summary["pending"])
