"""The process-wide Redis client, and a breaker so a dead Redis costs one timeout, not one per
request: after a failure callers skip Redis for BREAKER_SECONDS and use their fallback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
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
    global _open_until, _tripped_at
    _open_until = 0.0
    _tripped_at = float("-inf")


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
