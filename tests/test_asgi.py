"""HTTP through the ASGI application, as uvicorn drives it."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.wsgi import get_wsgi_application
from django.db import connection, connections

from tests.conftest import Persona, event, rows
from tokenmgr_project.asgi import WsgiBridge

THREADS = 2


def _scope(key: str) -> dict[str, Any]:
    """No content-length header: as a chunked upload arrives."""
    return {
        "type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/v1/usage", "raw_path": b"/api/v1/usage", "root_path": "", "query_string": b"",
        "headers": [
            (b"host", b"testserver"), (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def _post(app: WsgiBridge, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    communicator = ApplicationCommunicator(app, _scope(key))
    await communicator.send_input({"type": "http.request", "body": json.dumps(body).encode()})
    start = await communicator.receive_output(10)
    payload = await communicator.receive_output(10)
    return start["status"], json.loads(payload["body"])


def _sessions_opened() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


@pytest.fixture
def bridge() -> Any:
    app = WsgiBridge(get_wsgi_application(), threads=THREADS)
    yield app
    barrier = threading.Barrier(THREADS)

    def close() -> None:
        barrier.wait(5)  # one task per pool thread
        connections.close_all()

    list(app.executor.map(lambda _: close(), range(THREADS)))
    app.executor.shutdown()


@pytest.mark.django_db(transaction=True)
def test_requests_through_the_bridge_are_answered_and_recorded(
    bridge: WsgiBridge, platform: Persona
) -> None:
    status, body = async_to_sync(_post)(bridge, platform.raw_key, event("asgi-1"))
    assert (status, body.get("duplicate")) == (201, False), body
    status, body = async_to_sync(_post)(bridge, platform.raw_key, event("asgi-1"))
    assert (status, body["duplicate"]) == (200, True)
    assert rows(request_id="asgi-1") == 1


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_requests_reuse_database_connections_instead_of_opening_one_each(
    bridge: WsgiBridge, platform: Persona
) -> None:
    before = _sessions_opened()
    statuses = [
        async_to_sync(_post)(bridge, platform.raw_key, event(f"conn-{i}"))[0] for i in range(30)
    ]
    assert statuses == [201] * 30
    assert _sessions_opened() - before <= THREADS


def test_an_oversized_upload_is_refused_before_it_is_buffered(settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    app = WsgiBridge(get_wsgi_application(), threads=1)

    async def upload() -> tuple[int, dict[str, Any]]:
        communicator = ApplicationCommunicator(app, _scope("unused"))
        for _ in range(3):  # a chunked upload, 150 bytes in all
            await communicator.send_input(
                {"type": "http.request", "body": b"x" * 50, "more_body": True}
            )
        start = await communicator.receive_output(5)
        payload = await communicator.receive_output(5)
        return start["status"], json.loads(payload["body"])

    status, body = async_to_sync(upload)()
    assert (status, body["error"]["code"]) == (413, "too_large")
    app.executor.shutdown()
