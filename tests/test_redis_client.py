"""tm_redis.run_script: the budget check's and the buffer's way to run their scripts."""

from __future__ import annotations

import threading

import pytest
import redis

from tokenmgr_project import redis as tm_redis

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
