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
for i = 1, n do
  if redis.call('SET', ARGV[1] .. ARGV[3 + i], '1', 'NX', 'EX', ARGV[2]) then
    flags[i] = 1
    rows[#rows + 1] = ARGV[3 + n + i]
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


def add(request_ids: list[str], payloads: list[str], ttl_seconds: int) -> tuple[list[bool], int]:
    """Claim and buffer events. Returns (is_new per event, buffered depth after the add)."""
    result = tm_redis.script(_ADD)(
        keys=[stream_key(), depth_key()],
        args=[dedupe_prefix(), ttl_seconds, len(request_ids), *request_ids, *payloads],
    )
    depth = int(result[-1])
    return [bool(flag) for flag in result[:-1]], depth


def release(request_ids: list[str]) -> None:
    """Forget claims for events that were not buffered after all (used on rollback paths)."""
    if request_ids:
        tm_redis.script(_RELEASE)(args=[dedupe_prefix() + rid for rid in request_ids])


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
    return int(tm_redis.script(_ACK)(keys=[stream_key(), depth_key()], args=args))


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
