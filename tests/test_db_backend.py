"""The PostgreSQL backend's health check: no round trip for a live connection, and a session the
server terminated is still noticed and replaced before a request uses it."""

from __future__ import annotations

import select
import time

import psycopg
import pytest
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _wait_readable(fileno: int) -> None:
    deadline = time.monotonic() + 5
    while not select.select([fileno], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "the terminated session never signalled its socket"


def test_a_live_connection_passes_without_a_query(monkeypatch: pytest.MonkeyPatch) -> None:
    connection.ensure_connection()
    queried: list[bool] = []
    monkeypatch.setattr(DjangoWrapper, "is_usable", lambda self: queried.append(True) or True)

    assert connection.is_usable() is True
    assert queried == []


def test_a_terminated_session_is_replaced_before_the_next_request() -> None:
    connection.ensure_connection()
    old_pid = connection.connection.info.backend_pid
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [old_pid])
    _wait_readable(connection.connection.fileno())

    assert connection.is_usable() is False
    connection.health_check_done = False  # as at the start of a request
    connection.close_if_health_check_failed()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != old_pid
