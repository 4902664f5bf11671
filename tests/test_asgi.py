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
from django.urls import resolve
from rest_framework.test import APIClient

from tests.conftest import Persona, event, rows
from tokenmgr_project.asgi import FAST_POST_ROUTES, WsgiBridge

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


# --- the fast path for agents' JSON POSTs ------------------------------------------------------


async def _raw(
    app: WsgiBridge, body: bytes, **headers: str
) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    scope = _scope(headers.pop("key", ""))
    scope["path"] = headers.pop("path", scope["path"])
    replaced = {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}
    scope["headers"] = [(k, replaced.pop(k, v)) for k, v in scope["headers"]] + list(
        replaced.items()
    )
    communicator = ApplicationCommunicator(app, scope)
    await communicator.send_input({"type": "http.request", "body": body})
    start = await communicator.receive_output(10)
    payload = await communicator.receive_output(10)
    return start["status"], dict(start["headers"]), json.loads(payload["body"])


def test_the_fast_routes_are_the_urlconfs_fast_post_views() -> None:
    for path, action in FAST_POST_ROUTES.items():
        view = resolve(path).func.view_class  # type: ignore[attr-defined]
        assert view.fast_post is True, path
        assert view.actions_by_method["post"] == action, path


def test_only_bearer_json_posts_to_an_allowed_host_take_the_fast_path() -> None:
    key = "Bearer tm_x"
    assert WsgiBridge.fast_route(_scope("tm_x")) == ("track_usage", key)
    assert WsgiBridge.fast_route({**_scope("tm_x"), "method": "GET"}) is None
    assert WsgiBridge.fast_route({**_scope("tm_x"), "path": "/api/v1/usage/summary"}) is None
    evil = [(b"host", b"evil.example"), *_scope("tm_x")["headers"][1:]]
    assert WsgiBridge.fast_route({**_scope("tm_x"), "headers": evil}) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("fields", "raw", "key_ok"),
    [
        ({}, None, True),
        ({}, b'{"request_id": ', True),  # malformed JSON
        ({"input_tokens": -1}, None, True),
        ({}, None, False),  # unknown key
    ],
)
def test_the_fast_path_answers_exactly_as_the_django_path(
    bridge: WsgiBridge, platform: Persona, fields: dict[str, Any], raw: bytes | None, key_ok: bool
) -> None:
    key = platform.raw_key if key_ok else "tm_not-a-key"

    def body(request_id: str) -> bytes:
        return raw if raw is not None else json.dumps(event(request_id, **fields)).encode()

    fast = async_to_sync(_raw)(bridge, body("same-event"), key=key)
    django = APIClient().generic(  # Django's handler, for a twin event
        "POST",
        "/api/v1/usage",
        body("twin-event"),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )

    assert fast[0] == django.status_code
    twin = json.dumps(django.json()).replace("twin-event", "same-event")
    assert fast[2] == json.loads(twin)
    for name in ("x-content-type-options", "referrer-policy", "x-frame-options"):
        assert fast[1][name.encode()].decode() == django[name]
    if django.status_code == 401:
        assert fast[1][b"www-authenticate"].decode() == django["WWW-Authenticate"]


@pytest.mark.django_db(transaction=True)
def test_a_disallowed_host_is_refused_as_django_refuses_it(
    bridge: WsgiBridge, platform: Persona
) -> None:
    async def post() -> int:
        scope = _scope(platform.raw_key)
        scope["headers"] = [(b"host", b"evil.example"), *scope["headers"][1:]]
        communicator = ApplicationCommunicator(bridge, scope)
        await communicator.send_input(
            {"type": "http.request", "body": json.dumps(event("evil-1")).encode()}
        )
        return (await communicator.receive_output(10))["status"]

    assert async_to_sync(post)() == 400
    assert rows(request_id="evil-1") == 0
