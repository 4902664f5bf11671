"""tm_redis.run_script: the budget check's and the buffer's way to run their scripts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.test import override_settings

from tests.conftest import Persona, event, settle
from tests.processes import RedisServer
from tokenmgr_project.core import redis as tm_redis
from usage.models import TokenUsage

pytestmark = pytest.mark.services

ECHO = "redis.call('INCR', KEYS[1]) return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}"


def _own_client_id() -> int:
    conn = tm_redis._own.conn
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())


def test_it_answers_as_redis_pys_eval_and_loads_a_missing_script() -> None:
    key = tm_redis.key("t", "echo")
    assert tm_redis.run_script(ECHO, [key], ["a", 41]) == [key.encode(), b"a", 42]
    tm_redis.client().script_flush()  # a restarted Redis has no scripts
    assert tm_redis.run_script(ECHO, [key], ["b", 1]) == [key.encode(), b"b", 2]
    assert tm_redis.client().eval(ECHO, 1, key, "c", 2) == [key.encode(), b"c", 3]
    assert int(tm_redis.client().get(key)) == 3  # each call ran exactly once


def test_a_connection_the_server_closed_is_replaced_before_use() -> None:
    key = tm_redis.key("t", "killed")
    tm_redis.run_script(ECHO, [key], ["x", 0])
    tm_redis.client().client_kill_filter(_id=_own_client_id())
    assert tm_redis.run_script(ECHO, [key], ["y", 0]) == [key.encode(), b"y", 1]
    assert int(tm_redis.client().get(key)) == 2


def test_a_scripts_own_error_is_raised_and_the_connection_kept() -> None:
    tm_redis.run_script(ECHO, [tm_redis.key("t", "e")], ["x", 0])
    before = _own_client_id()
    with pytest.raises(redis.ResponseError):
        tm_redis.run_script("return redis.call('NOSUCHCOMMAND')", [], [])
    assert _own_client_id() == before


def test_each_thread_has_its_own_connection() -> None:
    ids: list[int] = []

    def run() -> None:
        tm_redis.run_script(ECHO, [tm_redis.key("t", "threads")], ["x", 0])
        ids.append(_own_client_id())

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(set(ids)) == 3


# --- persistence: the buffer is used only in a Redis that keeps what it acknowledged ----------


@pytest.fixture
def spare_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers of this test's own (never reconfigure the shared one)."""
    started: list[RedisServer] = []

    def start(*extra: str, appendonly: bool = True) -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = RedisServer(directory, *extra, appendonly=appendonly)
        server.start()
        started.append(server)
        return server

    yield start
    tm_redis.reset()
    for server in started:
        server.stop()


def test_it_reads_appendonly_and_appendfsync_from_config(
    spare_redis: Callable[..., RedisServer],
) -> None:
    server = spare_redis()
    with override_settings(REDIS_URL=server.url()):
        found = tm_redis.persistence(refresh=True)
    assert (found.appendonly, found.appendfsync, found.source, found.durable) == (
        True,
        "everysec",
        "config",
        True,
    )


def test_it_falls_back_to_info_when_config_is_renamed(
    spare_redis: Callable[..., RedisServer],
) -> None:
    server = spare_redis("--rename-command", "CONFIG", "")
    with override_settings(REDIS_URL=server.url()):
        found = tm_redis.persistence(refresh=True)
    assert (found.appendonly, found.appendfsync, found.source, found.durable) == (
        True,
        None,
        "info",
        True,
    )


def test_it_writes_direct_on_a_redis_without_persistence(
    spare_redis: Callable[..., RedisServer], platform: Persona
) -> None:
    server = spare_redis(appendonly=False)
    with override_settings(REDIS_URL=server.url(), TOKENMGR_BUFFER_VOLATILE_OK=False):
        tm_redis.reset()
        assert (
            platform.client.post("/api/v1/usage", event("vol-1"), format="json").status_code == 201
        )
        assert TokenUsage.objects.filter(request_id="vol-1").exists()  # no flush needed
        health = platform.client.get("/api/v1/health").json()
    assert health["mode"] == "direct"
    assert health["buffer"]["depth"] == 0
    assert health["redis"]["persistence"]["durable"] is False
    assert health["redis"]["persistence"]["appendonly"] is False


def test_it_buffers_in_a_volatile_redis_only_when_the_risk_is_accepted(
    spare_redis: Callable[..., RedisServer], platform: Persona
) -> None:
    server = spare_redis(appendonly=False)
    with override_settings(REDIS_URL=server.url(), TOKENMGR_BUFFER_VOLATILE_OK=True):
        tm_redis.reset()
        assert (
            platform.client.post("/api/v1/usage", event("vol-2"), format="json").status_code == 201
        )
        assert not TokenUsage.objects.filter(request_id="vol-2").exists()  # waits in Redis
        health = platform.client.get("/api/v1/health").json()
        settle()
    assert health["mode"] == "buffered"
    assert health["buffer"]["depth"] == 1
    assert health["redis"]["persistence"]["volatile_ok"] is True
    assert TokenUsage.objects.filter(request_id="vol-2").exists()


def test_it_reads_persistence_again_after_a_failure(
    spare_redis: Callable[..., RedisServer],
) -> None:
    server = spare_redis()
    with override_settings(REDIS_URL=server.url(), TOKENMGR_BUFFER_VOLATILE_OK=False):
        tm_redis.reset()
        assert tm_redis.buffer_allowed()
        tm_redis.client().config_set("appendonly", "no")  # e.g. restarted without the AOF
        assert tm_redis.buffer_allowed()  # cached: no round trip per request
        tm_redis.trip()  # what a caller does when Redis fails
        assert not tm_redis.buffer_allowed()
