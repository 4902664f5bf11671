"""HTTP through the ASGI application, as uvicorn drives it."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.wsgi import get_wsgi_application
from django.db import connection, connections
from django.urls import resolve
from django.utils import timezone
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


# --- budget checks on the event loop -------------------------------------------------------------


def _check_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "provider": "openai", "input_tokens": 1000}
    body.update({"max_output_tokens": 200, "reserve": True, **fields})
    return json.dumps(body).encode()


def _ranker_budget() -> Any:
    from budgets.services import budget_create

    return budget_create(
        principal=None,
        name="ranker",
        scope="project",
        scope_id="ranker",
        team_id="search",
        cost_limit=Decimal("100"),
    )


def _open_reservations() -> int:
    from budgets import counters
    from tokenmgr_project import redis as tm_redis

    return int(tm_redis.client().zcard(counters.open_reservations_key()))


def _check_inline(bridge: WsgiBridge, key: str, body: bytes) -> tuple[int, dict[str, Any]]:
    status, _headers, answer = async_to_sync(_raw)(
        bridge, body, key=key, path="/api/v1/budgets/check"
    )
    return status, answer


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_budget_check_runs_on_the_event_loop_once_its_caches_are_warm(
    bridge: WsgiBridge, member: Persona
) -> None:
    budget = _ranker_budget()

    # Cold: the API key and the budget rules come from the database, which Django refuses on
    # the loop; the check runs again in the pool and holds exactly once.
    status, first = _check_inline(bridge, member.raw_key, _check_body())
    assert (status, first["allowed"]) == (200, True), first
    assert (bridge.inline_served, bridge.inline_deferred) == (0, 1)
    assert _open_reservations() == 1

    status, second = _check_inline(bridge, member.raw_key, _check_body())
    assert (status, second["allowed"]) == (200, True), second
    assert (bridge.inline_served, bridge.inline_deferred) == (1, 1)
    assert _open_reservations() == 2
    assert first["reservation_id"] != second["reservation_id"]
    status_now = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert status_now["tokens_reserved"] == 2 * 1200


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_check_answers_on_the_loop_exactly_as_through_django(
    bridge: WsgiBridge, member: Persona
) -> None:
    _ranker_budget()
    body = _check_body(reserve=False)
    _check_inline(bridge, member.raw_key, body)  # warms the caches
    status, inline = _check_inline(bridge, member.raw_key, body)
    assert bridge.inline_served == 1
    django = member.client.generic(
        "POST", "/api/v1/budgets/check", body, content_type="application/json"
    )
    assert (status, inline) == (django.status_code, django.json())

    status, refused = _check_inline(bridge, member.raw_key, _check_body(max_output_tokens=-1))
    django = member.client.generic(
        "POST",
        "/api/v1/budgets/check",
        _check_body(max_output_tokens=-1),
        content_type="application/json",
    )
    assert bridge.inline_served == 2
    assert (status, refused) == (django.status_code, django.json())
    assert status == 400


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_counter_seeded_from_the_ledger_during_a_loop_check_is_held_once(
    bridge: WsgiBridge, member: Persona
) -> None:
    from budgets import counters
    from tokenmgr_project import redis as tm_redis

    budget = _ranker_budget()
    _check_inline(bridge, member.raw_key, _check_body(reserve=False))  # warms the caches
    client = tm_redis.client()
    assert client.delete(counters.counter_key(budget.pk, budget.window_at(timezone.now()))) == 1

    status, answer = _check_inline(bridge, member.raw_key, _check_body())
    assert (status, answer["allowed"]) == (200, True), answer
    assert bridge.inline_deferred == 2  # the cold caches, then the seed
    assert _open_reservations() == 1
    status_now = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert status_now["tokens_reserved"] == answer["estimated_tokens"] == 1200


def test_only_small_budget_checks_with_a_steady_redis_run_on_the_loop(settings: Any) -> None:
    from tokenmgr_project import redis as tm_redis

    settings.REDIS_URL = "redis://127.0.0.1:6379/15"
    small = _check_body()
    assert WsgiBridge.inline_ok("check_budget", small)
    assert not WsgiBridge.inline_ok("track_usage", small)  # looks up the ledger every time
    messages = [{"role": "user", "content": "word " * 2000}]
    assert not WsgiBridge.inline_ok("check_budget", _check_body(messages=messages))
    tm_redis.trip()
    assert not WsgiBridge.inline_ok("check_budget", small)  # a Redis that failed lately
    tm_redis.reset()
    settings.REDIS_URL = ""
    assert not WsgiBridge.inline_ok("check_budget", small)  # checks in the database


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_an_unexpected_error_on_the_loop_is_a_logged_500_like_in_the_pool(
    bridge: WsgiBridge, member: Persona, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from budgets import enforcement

    _ranker_budget()
    _check_inline(bridge, member.raw_key, _check_body(reserve=False))  # warms the caches

    def broken(**_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(enforcement, "budget_check", broken)
    status, answer = _check_inline(bridge, member.raw_key, _check_body())
    assert (status, answer["error"]["code"]) == (500, "server_error")
    assert bridge.inline_served == 1
    assert "boom" in caplog.text
