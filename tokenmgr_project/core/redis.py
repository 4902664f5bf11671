"""The process-wide Redis client, and a breaker so a dead Redis costs one timeout, not one per
request: after a failure callers skip Redis for BREAKER_SECONDS and use their fallback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from django.conf import settings

BREAKER_SECONDS = 5.0
# How long after a failure Redis counts as unsteady (see steady()).
STEADY_SECONDS = 60.0
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

_lock = threading.Lock()
_client: redis.Redis | None = None
_client_url = ""
_open_until = 0.0
_tripped_at = float("-inf")


def configured() -> bool:
    return bool(settings.REDIS_URL)


def client() -> redis.Redis:
    """The shared client. Raises RuntimeError when REDIS_URL is empty."""
    global _client, _client_url
    url = settings.REDIS_URL
    if not url:
        raise RuntimeError("REDIS_URL is not set")
    if _client is None or _client_url != url:
        with _lock:
            if _client is None or _client_url != url:
                _client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=0.5,
                    socket_timeout=5.0,
                    health_check_interval=30,
                    max_connections=64,
                )
                _client_url = url
    return _client


def available() -> bool:
    """Configured and not recently failed."""
    return configured() and time.monotonic() >= _open_until


def steady() -> bool:
    """Configured and no failure for STEADY_SECONDS. Work done on the server's event loop asks
    this: a Redis that hangs stalls the caller for the socket timeout, which the loop (every
    connection of the process) should pay at most once per outage, not once per breaker reset."""
    return configured() and time.monotonic() - _tripped_at >= STEADY_SECONDS


def trip() -> None:
    global _open_until, _tripped_at
    _tripped_at = time.monotonic()
    _open_until = _tripped_at + BREAKER_SECONDS


def reset() -> None:
    global _open_until, _tripped_at, _persistence
    _open_until = 0.0
    _tripped_at = float("-inf")
    _persistence = None


_shas: dict[str, str] = {}


def _sha(source: str) -> str:
    found = _shas.get(source)
    if found is None:
        found = _shas[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    return found


_own = threading.local()


def run_script(source: str, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
    """The Lua script's reply, run on this thread's own connection without redis-py's command
    layers (pool checkout and release, observability hooks: ~35 µs of CPU per call, a tenth
    of a budget check). Never retried: a script may have run although its reply was lost,
    and running a hold twice would hold twice. Connection trouble raises REDIS_ERRORS."""
    current = client()
    conn = getattr(_own, "conn", None)
    if conn is None or _own.client is not current or _own.pid != os.getpid():
        pool = current.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        _own.conn, _own.client, _own.pid = conn, current, os.getpid()
    try:
        stale = conn.can_read()  # an unread reply waiting: a call before was cut off
    except REDIS_ERRORS:
        stale = True  # closed by the server
    if stale:
        conn.disconnect()
    try:
        conn.send_command("EVALSHA", _sha(source), len(keys), *keys, *args)
        try:
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            conn.send_command("EVAL", source, len(keys), *keys, *args)
            return conn.read_response()
    except redis.ResponseError:
        raise  # the script's own error; the connection is fine
    except BaseException:
        conn.disconnect()
        raise


def key(*parts: str) -> str:
    return ":".join((settings.REDIS_KEY_PREFIX, *parts))


def ping() -> bool:
    try:
        return bool(client().ping())
    except REDIS_ERRORS:
        return False


# --- persistence: may acknowledged usage wait in Redis? ---------------------------------------

# How long one process trusts what it read about Redis's persistence. A failure in between
# (a restarted Redis may run with another configuration) makes it read again.
PERSISTENCE_TTL = 30.0


@dataclass(frozen=True)
class Persistence:
    """What Redis says about its persistence. `appendfsync` is None when only INFO could be read
    (CONFIG renamed or disabled, as on managed Redis); everything is None when neither could."""

    appendonly: bool | None
    appendfsync: str | None
    aof_write_ok: bool | None
    source: str  # "config", "info" or "unknown"

    @property
    def durable(self) -> bool:
        """Does an acknowledged write survive a Redis process crash? With the AOF on, Redis has
        written it to the file before it replies (unless a disk too slow for everysec makes it
        postpone writes, up to 2 s); appendfsync decides what a power loss takes (everysec: up
        to a second)."""
        return self.appendonly is True and self.aof_write_ok is not False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "durable": self.durable}


_persistence: Persistence | None = None
_persistence_until = 0.0
_persistence_trip = float("-inf")  # _tripped_at when _persistence was read


def persistence(*, refresh: bool = False) -> Persistence:
    """Redis's persistence, read at most once per PERSISTENCE_TTL and again after a failure
    (one round trip: CONFIG GET and INFO persistence pipelined). Raises REDIS_ERRORS."""
    global _persistence, _persistence_until, _persistence_trip
    found = _persistence
    if (
        refresh
        or found is None
        or time.monotonic() >= _persistence_until
        or _persistence_trip != _tripped_at
    ):
        tripped = _tripped_at
        found = _read_persistence()
        _persistence, _persistence_trip = found, tripped
        _persistence_until = time.monotonic() + PERSISTENCE_TTL
    return found


def _read_persistence() -> Persistence:
    with client().pipeline(transaction=False) as pipe:
        pipe.config_get("append*")
        pipe.info("persistence")
        config, info = pipe.execute(raise_on_error=False)
    for reply in (config, info):
        if isinstance(reply, REDIS_ERRORS):
            raise reply
    info = info if isinstance(info, dict) else {}
    write_status = info.get("aof_last_write_status")
    write_ok = None if write_status is None else write_status == "ok"
    if isinstance(config, dict) and "appendonly" in config:
        return Persistence(
            appendonly=config["appendonly"] == "yes",
            appendfsync=config.get("appendfsync"),
            aof_write_ok=write_ok,
            source="config",
        )
    if "aof_enabled" in info:  # CONFIG is renamed or not allowed: INFO still tells the AOF
        return Persistence(
            appendonly=bool(int(info["aof_enabled"])),
            appendfsync=None,
            aof_write_ok=write_ok,
            source="info",
        )
    return Persistence(appendonly=None, appendfsync=None, aof_write_ok=None, source="unknown")


def buffer_allowed() -> bool:
    """May ingestion acknowledge usage that waits in the Redis buffer? Only when Redis persists
    it, or TOKENMGR_BUFFER_VOLATILE_OK accepts losing it in a Redis crash. Called per request:
    a cached answer, one round trip per PERSISTENCE_TTL; an unreachable Redis answers False
    (and trips the breaker), so the caller writes to the database."""
    if settings.TOKENMGR_BUFFER_VOLATILE_OK:
        return True
    found = _persistence
    if found is None or time.monotonic() >= _persistence_until or _persistence_trip != _tripped_at:
        try:
            found = persistence(refresh=True)
        except REDIS_ERRORS:
            trip()
            return False
    return found.durable


def persistence_report() -> dict[str, Any]:
    """For /health and `up`: Redis's persistence read afresh, and whether ingestion buffers in
    it (`buffered`: durable, or volatile and accepted by TOKENMGR_BUFFER_VOLATILE_OK).
    Raises REDIS_ERRORS."""
    found = persistence(refresh=True)
    volatile_ok = settings.TOKENMGR_BUFFER_VOLATILE_OK
    return {**found.as_dict(), "volatile_ok": volatile_ok, "buffered": found.durable or volatile_ok}
