"""The durable ingestion buffer: a Redis Stream read through one consumer group.

Each stream entry is one accepted API call's new events: `n`, and `rows`, their COPY text lines
(`usage.rows`) joined by newlines. Adding is one Lua script that claims each request_id (SET NX) and
appends only the unclaimed ones, so concurrent repeats are told apart atomically. Entries stay
pending until the rows are committed; acknowledging is another script that XACKs, XDELs and lowers
the depth counter only for entries not acknowledged before, so a re-claimed entry is counted once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import redis

from tokenmgr_project import redis as tm_redis

GROUP = "flushers"

_ADD = r"""
local n = tonumber(ARGV[3])
local flags = {}
local rows = {}
-- Per event after the ids and rows: reservation key ('' none), cost, tokens, #counters, counters.
local pos = 4 + 2 * n
local openz = ARGV[pos]
pos = pos + 1
for i = 1, n do
  local rsv, cost, tokens, k = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local first = pos + 4
  pos = first + k
  if rsv ~= '' and redis.call('EXISTS', rsv) == 0 then
    flags[i] = 2
  elseif redis.call('SET', ARGV[1] .. ARGV[3 + i], '1', 'NX', 'EX', ARGV[2]) then
    flags[i] = 1
    rows[#rows + 1] = ARGV[3 + n + i]
    if rsv ~= '' then
      local r = redis.call('HMGET', rsv, 'keys', 'hc', 'ht', 'status')
      if r[4] == 'open' then
        for key in string.gmatch(r[1] or '', '[^,]+') do
          redis.call('HINCRBY', key, 'hc', -tonumber(r[2]))
          redis.call('HINCRBY', key, 'ht', -tonumber(r[3]))
        end
        redis.call('HSET', rsv, 'status', 'settled', 'request_id', ARGV[3 + i])
        redis.call('ZREM', openz, rsv)
      end
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
  redis.call('XADD', KEYS[1], '*', 'n', #rows, 'rows', table.concat(rows, '\n'))
  depth = redis.call('INCRBY', KEYS[2], #rows)
else
  depth = tonumber(redis.call('GET', KEYS[2]) or '0')
end
flags[n + 1] = depth
return flags
"""

_ACK = r"""
local events = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    events = events + tonumber(ARGV[i + 1])
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
    Redis key, or '') and add its cost (micro-units) and tokens to each seeded counter key."""

    reservation_key: str = ""
    cost_micros: int = 0
    tokens: int = 0
    counter_keys: tuple[str, ...] = ()


_NOTHING = Counting()


def add(
    request_ids: list[str],
    payloads: list[str],
    ttl_seconds: int,
    counting: list[Counting] | None = None,
    open_reservations_key: str = "",
) -> tuple[list[int], int]:
    """Claim and buffer events. Returns (NEW / DUPLICATE / UNKNOWN_RESERVATION per event, buffered
    depth after the add). An event naming an unknown reservation is neither claimed nor stored."""
    args: list[Any] = [dedupe_prefix(), ttl_seconds, len(request_ids), *request_ids, *payloads]
    args.append(open_reservations_key)
    for item in counting or [_NOTHING] * len(request_ids):
        args.extend((item.reservation_key, item.cost_micros, item.tokens, len(item.counter_keys)))
        args.extend(item.counter_keys)
    result = tm_redis.run_script(_ADD, [stream_key(), depth_key()], args)
    depth = int(result[-1])
    return [int(flag) for flag in result[:-1]], depth


def release(request_ids: list[str]) -> None:
    """Forget claims for events that were not buffered after all (used on rollback paths)."""
    if request_ids:
        tm_redis.run_script(_RELEASE, args=[dedupe_prefix() + rid for rid in request_ids])


def _entries(raw: list[Any]) -> list[Entry]:
    entries = []
    for entry_id, fields in raw:
        if not fields:  # deleted while pending: nothing left to write
            entries.append(Entry(entry_id.decode(), 0, []))
            continue
        entries.append(
            Entry(entry_id.decode(), int(fields[b"n"]), fields[b"rows"].decode().split("\n"))
        )
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


def ack(entries: list[Entry]) -> int:
    """Acknowledge committed entries; returns how many events left the buffer."""
    if not entries:
        return 0
    args: list[Any] = [GROUP]
    for entry in entries:
        args.extend((entry.entry_id, entry.count))
    return int(tm_redis.run_script(_ACK, [stream_key(), depth_key()], args))


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
