"""HTTP through the ASGI application, as uvicorn drives it: the hot path (core.hotpath) in front
of Django's path (core.http.WsgiBridge), composed as tokenmgr_project.asgi composes them."""

from __future__ import annotations

import json
import pprint
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings as django_settings
from django.core.wsgi import get_wsgi_application
from django.db import connection, connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import override_settings
from django.urls import URLResolver, get_resolver, include, path
from django.utils import timezone

from budgets import counters, enforcement
from budgets import selectors as budget_selectors
from budgets.models import AgentProfile, Budget
from budgets.services import budget_create
from tests.conftest import Persona, event, rows
from tokenmgr_project.core import actions, hotpath
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.hotpath import INLINE_MAX_BODY, HotPath
from tokenmgr_project.core.http import WsgiBridge
from usage.apis import TokenizeApi
from usage.auth import LAST_USED_WRITE_SECONDS, key_cache
from usage.models import ApiKey

THREADS = 2
Message = dict[str, Any]


# --- talking ASGI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message]

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        found = [v.decode("latin1") for k, v in self.headers if k == name.encode()]
        return found[0] if found else None


def _scope(
    path_: str, *, method: str = "POST", key: str | None = None, **headers: str | None
) -> Message:
    """No content-length header: as a chunked upload arrives. `headers` replace (None: drop)
    the defaults, with `_` for `-`."""
    values: dict[str, str | None] = {"host": "testserver", "content-type": "application/json"}
    if key is not None:
        values["authorization"] = f"Bearer {key}"
    values.update({k.replace("_", "-"): v for k, v in headers.items()})
    return {
        "type": "http", "http_version": "1.1", "method": method, "scheme": "http",
        "path": path_, "raw_path": path_.encode(), "root_path": "", "query_string": b"",
        "headers": [(k.encode(), v.encode("latin1")) for k, v in values.items() if v is not None],
        "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def _exchange(app: Any, scope: Message, chunks: list[bytes]) -> Reply:
    communicator = ApplicationCommunicator(app, scope)
    for i, chunk in enumerate(chunks):
        more = i < len(chunks) - 1
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": more})
    start = await communicator.receive_output(10)
    messages = [start]
    while True:
        message = await communicator.receive_output(10)
        messages.append(message)
        if not message.get("more_body"):
            break
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return Reply(start["status"], list(start["headers"]), body, messages)


def _send(app: Any, path_: str, body: bytes | dict[str, Any] | list[Any] = b"", **kw: Any) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return async_to_sync(_exchange)(app, _scope(path_, **kw), [raw])


def _close_connections(executor: ThreadPoolExecutor, threads: int) -> None:
    """Close each pool thread's database connection (one task per thread)."""
    barrier = threading.Barrier(threads)

    def close() -> None:
        barrier.wait(5)
        connections.close_all()

    list(executor.map(lambda _: close(), range(threads)))


def _close_pool(executor: ThreadPoolExecutor, threads: int) -> None:
    _close_connections(executor, threads)
    executor.shutdown()


@pytest.fixture
def bridge() -> Iterator[WsgiBridge]:
    """Django's path alone."""
    app = WsgiBridge(get_wsgi_application(), threads=THREADS)
    yield app
    _close_pool(app.executor, THREADS)


@pytest.fixture
def hot(bridge: WsgiBridge) -> HotPath:
    """The HTTP application as tokenmgr_project.asgi composes it."""
    return HotPath(bridge, bridge.executor)


class Fallback:
    """Stands in for Django's path: answers 418 and notes the path, so a test sees which
    requests the hot path left to Django."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    _close_pool(executor, 1)


# --- the application as served --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_serves_http_with_the_hot_path_in_front_of_django(platform: Persona) -> None:
    # Importing it builds the server's thread pool (and freezes the GC): only here.
    from tokenmgr_project import asgi

    try:
        assert (asgi.http.fallback, asgi.http.executor) == (asgi.bridge, asgi.bridge.executor)
        assert asgi.http.routes == hotpath.fast_routes()
        tracked = _send(
            asgi.application, "/api/v1/usage", event("composed-1"), key=platform.raw_key
        )
        listed = _send(asgi.application, "/api/v1/usage", method="GET", key=platform.raw_key)
        assert (tracked.status, listed.status) == (201, 200), (tracked.body, listed.body)
        assert rows(request_id="composed-1") == 1
    finally:
        _close_connections(asgi.bridge.executor, django_settings.TOKENMGR_HTTP_THREADS)


# --- Django's path: the bridge -------------------------------------------------------------------


def _sessions_opened() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("through", ["hot path", "django"])
def test_it_answers_and_records_usage_once(
    hot: HotPath, bridge: WsgiBridge, platform: Persona, through: str
) -> None:
    app = hot if through == "hot path" else bridge
    first = _send(app, "/api/v1/usage", event("asgi-1"), key=platform.raw_key)
    assert (first.status, first.json()["duplicate"]) == (201, False), first.body
    again = _send(app, "/api/v1/usage", event("asgi-1"), key=platform.raw_key)
    assert (again.status, again.json()["duplicate"]) == (200, True)
    assert rows(request_id="asgi-1") == 1


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path_", ["/api/v1/usage", "/api/v1/usage/summary"])
def test_it_reuses_database_connections_instead_of_opening_one_each(
    hot: HotPath, platform: Persona, path_: str
) -> None:
    # POST /usage is the hot path's (in the pool), GET /usage/summary Django's (in the pool).
    before = _sessions_opened()
    statuses = []
    for i in range(30):
        if path_ == "/api/v1/usage":
            reply = _send(hot, path_, event(f"conn-{i}"), key=platform.raw_key)
        else:
            reply = _send(hot, path_, method="GET", key=platform.raw_key)
        statuses.append(reply.status)
    assert statuses == [201 if path_ == "/api/v1/usage" else 200] * 30
    assert _sessions_opened() - before <= THREADS


@pytest.mark.parametrize("path_", ["/api/v1/usage", "/api/v1/pricing/quote"])
def test_it_refuses_an_oversized_upload_before_buffering_it(
    settings: Any, hot: HotPath, path_: str
) -> None:
    # /usage is the hot path's, /pricing/quote Django's: both read the body the same way.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    scope = _scope(path_, key="unused")
    reply = async_to_sync(_exchange)(hot, scope, [b"x" * 50] * 3)  # chunked, 150 bytes in all
    assert (reply.status, reply.json()["error"]["code"]) == (413, "too_large")


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_disallowed_host_as_django_refuses_it(hot: HotPath, platform: Persona) -> None:
    reply = _send(hot, "/api/v1/usage", event("evil-1"), key=platform.raw_key, host="evil.example")
    assert (reply.status, reply.json()["error"]["code"]) == (400, "bad_request")
    assert rows(request_id="evil-1") == 0


# --- streaming responses (exports) ---------------------------------------------------------------

_stream_go = threading.Event()
STREAM_CHUNKS = [b"id,cost\n", b"1,0.5\n", b"2,0.25\n"]


def _streaming_view(request: HttpRequest) -> StreamingHttpResponse:
    def rows_() -> Iterator[bytes]:
        yield STREAM_CHUNKS[0]
        # The rest only once the client holds the first chunk: a bridge that buffered the
        # whole response would hold it back until this wait gave up.
        _stream_go.wait(30)
        yield from STREAM_CHUNKS[1:]

    return StreamingHttpResponse(rows_(), content_type="text/csv")


def _plain_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"whole", content_type="text/plain")


class _MarkedTokenizeApi(TokenizeApi):
    fast_post = True  # marked, and nothing else: no table lists it


# The test URLconf: tokenmgr's, plus a streaming view, a plain one and a view marked fast.
urlpatterns = [
    path("export.csv", _streaming_view),
    path("plain", _plain_view),
    path("api/v1/tokenize-fast", _MarkedTokenizeApi.as_view()),
    path("", include("tokenmgr_project.urls")),
]


@override_settings(ROOT_URLCONF=__name__)
def test_it_streams_a_streaming_response_chunk_by_chunk(bridge: WsgiBridge) -> None:
    _stream_go.clear()

    async def download() -> list[Message]:
        communicator = ApplicationCommunicator(bridge, _scope("/export.csv", method="GET"))
        await communicator.send_input({"type": "http.request", "body": b""})
        try:
            start = await communicator.receive_output(10)
            first = await communicator.receive_output(10)  # before the view made the rest
        finally:
            _stream_go.set()
        messages = [start, first]
        while messages[-1].get("more_body"):
            messages.append(await communicator.receive_output(10))
        return messages

    start, *body = async_to_sync(download)()
    assert (start["status"], dict(start["headers"])[b"content-type"]) == (200, b"text/csv")
    assert [m["body"] for m in body if m["body"]] == STREAM_CHUNKS
    assert all(m["more_body"] for m in body[:-1])
    assert not body[-1].get("more_body")
    assert b"".join(m["body"] for m in body) == b"".join(STREAM_CHUNKS)


@override_settings(ROOT_URLCONF=__name__)
def test_it_sends_a_whole_response_as_one_body_message(bridge: WsgiBridge) -> None:
    reply = _send(bridge, "/plain", method="GET")
    assert (reply.status, reply.body) == (200, b"whole")
    assert len(reply.messages) == 2
    assert not reply.messages[1].get("more_body")


# --- the route table, derived from the URLconf ---------------------------------------------------


def _fast_post_paths(patterns: list[Any], prefix: str = "") -> set[str]:
    """Every URLconf path whose view is marked fast, converters or not (one the hot path
    could not serve would show as a difference)."""
    found: set[str] = set()
    for entry in patterns:
        if isinstance(entry, URLResolver):
            found |= _fast_post_paths(entry.url_patterns, prefix + str(entry.pattern))
        elif getattr(getattr(entry.callback, "view_class", None), "fast_post", False):
            found.add("/" + prefix + str(entry.pattern))
    return found


HOT_ROUTES = [
    "/api/v1/usage",
    "/api/v1/usage/batch",
    "/api/v1/budgets/check",
    "/api/v1/guard",
    "/api/v1/status",
    "/api/v1/status/batch",
]


def test_it_takes_its_routes_from_the_views_marked_fast_post() -> None:
    routes = hotpath.fast_routes()
    assert set(routes) == _fast_post_paths(get_resolver().url_patterns) == set(HOT_ROUTES)
    assert routes == {
        "/api/v1/usage": "track_usage",
        "/api/v1/usage/batch": "track_usage_batch",
        "/api/v1/budgets/check": "check_budget",
        "/api/v1/guard": "guard",
        "/api/v1/status": "publish_status",
        "/api/v1/status/batch": "publish_status_batch",
    }


@pytest.mark.django_db(transaction=True)
@override_settings(ROOT_URLCONF=__name__)
def test_it_serves_a_view_once_it_is_marked_fast_post(bridge: WsgiBridge, member: Persona) -> None:
    assert hotpath.fast_routes()["/api/v1/tokenize-fast"] == "tokenize"
    assert "/api/v1/tokenize" not in hotpath.fast_routes()
    fallback = Fallback()
    app = HotPath(fallback, bridge.executor)
    body = {"model": "gpt-4o", "text": "hello world"}
    marked = _send(app, "/api/v1/tokenize-fast", body, key=member.raw_key)
    assert (fallback.paths, marked.status) == ([], 200)  # the hot path answered it
    django = _send(bridge, "/api/v1/tokenize-fast", body, key=member.raw_key)
    assert _normalized(marked, "", VOLATILE) == _normalized(django, "", VOLATILE)
    _send(app, "/api/v1/tokenize", body, key=member.raw_key)
    assert fallback.paths == ["/api/v1/tokenize"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("change", "taken"),
    [
        ({}, True),
        ({"content_type": "application/json; charset=utf-8"}, True),
        ({"authorization": "bearer tm_x"}, True),
        ({"host": "testserver:8000"}, True),
        ({"method": "GET"}, False),
        ({"path_": "/api/v1/usage/summary"}, False),
        ({"path_": "/api/v1/usage/"}, False),
        ({"host": "evil.example"}, False),
        ({"host": None}, False),
        ({"authorization": None}, False),  # a session, or the browsable API
        ({"authorization": "Basic dXNlcjpwdw=="}, False),
        ({"content_type": "text/plain"}, False),
        ({"content_type": None}, False),
        ({"content_type": "multipart/form-data; boundary=x"}, False),
    ],
)
def test_it_takes_only_bearer_json_posts_to_a_fast_route_on_an_allowed_host(
    pool: ThreadPoolExecutor, change: dict[str, Any], taken: bool
) -> None:
    fallback = Fallback()
    app = HotPath(fallback, pool)
    kw: dict[str, Any] = {"path_": "/api/v1/usage", "key": "tm_x", **change}
    reply = _send(app, kw.pop("path_"), event("route-1"), **kw)
    if taken:
        assert (fallback.paths, reply.status) == ([], 401)  # tm_x is no key
    else:
        assert (len(fallback.paths), reply.status) == (1, 418)


# --- the tripwire: every middleware accounted for -------------------------------------------------


class StampMiddleware:
    """A middleware the hot path knows nothing of (as a CORS or rate-limit one would be)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response["X-Stamp"] = "stamped"
        return response


STAMP = f"{__name__}.StampMiddleware"


def test_it_accounts_for_every_middleware_in_the_settings() -> None:
    assert hotpath.unaccounted_middleware() == []


@pytest.mark.django_db(transaction=True)
def test_it_leaves_every_request_to_django_while_a_middleware_is_unaccounted_for(
    settings: Any, pool: ThreadPoolExecutor, platform: Persona, caplog: Any
) -> None:
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, STAMP]
    assert hotpath.unaccounted_middleware() == [STAMP]
    fallback = Fallback()
    off = HotPath(fallback, pool)
    assert STAMP in caplog.text  # "hot path off: ..."
    for path_ in HOT_ROUTES:
        assert _send(off, path_, {}, key=platform.raw_key).status == 418
    assert fallback.paths == HOT_ROUTES

    # Composed as the ASGI module composes it: the new middleware's effect reaches the hot
    # routes' answers, because Django's path answers them.
    django = WsgiBridge(get_wsgi_application(), threads=1)
    try:
        app = HotPath(django, django.executor)
        reply = _send(app, "/api/v1/usage", event("stamp-1"), key=platform.raw_key)
        assert (reply.status, reply.header("x-stamp")) == (201, "stamped")
        assert (app.inline_served, app.inline_deferred) == (0, 0)
    finally:
        _close_pool(django.executor, 1)


@pytest.mark.parametrize(
    "condition", [{"SECURE_SSL_REDIRECT": True}, {"DISALLOWED_USER_AGENTS": ["^curl"]}]
)
def test_it_leaves_every_request_to_django_under_a_setting_a_middleware_acts_on(
    pool: ThreadPoolExecutor, condition: dict[str, Any]
) -> None:
    fallback = Fallback()
    with override_settings(**condition):
        app = HotPath(fallback, pool)
    for path_ in HOT_ROUTES:
        _send(app, path_, {}, key="tm_x")
    assert fallback.paths == HOT_ROUTES


@pytest.mark.django_db(transaction=True)
def test_it_answers_with_the_headers_the_middleware_adds_as_configured_now(
    settings: Any, bridge: WsgiBridge, platform: Persona
) -> None:
    settings.X_FRAME_OPTIONS = "SAMEORIGIN"
    settings.SECURE_REFERRER_POLICY = "no-referrer"
    app = HotPath(bridge, bridge.executor)
    reply = _send(app, "/api/v1/usage", event("frame-1"), key=platform.raw_key)
    assert reply.status == 201
    assert (reply.header("x-frame-options"), reply.header("referrer-policy")) == (
        "SAMEORIGIN",
        "no-referrer",
    )


# --- parity: the hot path answers exactly as Django's path ---------------------------------------

# Differ between any two answers by design: new reservation ids and their expiry.
VOLATILE = frozenset({"reservation_id", "reservation_expires_at"})
# A second hold on the same budget leaves less remaining: what a reserving check reports.
HELD = VOLATILE | {
    "cost_remaining",
    "tokens_remaining",
    "cost_percent_after",
    "tokens_percent_after",
}


def _check_fields(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "provider": "openai", "input_tokens": 1000}
    body.update({"max_output_tokens": 200, "reserve": True, **fields})
    return body


def _check_body(**fields: Any) -> bytes:
    return json.dumps(_check_fields(**fields)).encode()


def _guard_fields(run_id: str, **fields: Any) -> dict[str, Any]:
    return {"agent": "ranker-agent", "run_id": run_id, "prompt": "Rank these.", **fields}


# Per hot route: a valid body and one with an invalid field, of a request id.
VALID: dict[str, Callable[[str], Any]] = {
    "/api/v1/usage": event,
    "/api/v1/usage/batch": lambda rid: {"events": [event(rid), event(f"{rid}-b")]},
    "/api/v1/budgets/check": lambda rid: _check_fields(reserve=False, feature=rid),
    "/api/v1/guard": _guard_fields,
    "/api/v1/status": lambda rid: {"conversation_id": rid, "category": "info", "message": "hi"},
    "/api/v1/status/batch": lambda rid: {
        "messages": [{"conversation_id": rid, "category": "info", "message": "hi"}] * 2
    },
}
INVALID: dict[str, Callable[[str], Any]] = {
    "/api/v1/usage": lambda rid: event(rid, input_tokens=-1),
    "/api/v1/usage/batch": lambda rid: {"events": [event(rid), event(f"{rid}-b", model=7)]},
    "/api/v1/budgets/check": lambda rid: _check_fields(feature=rid, max_output_tokens=-1),
    "/api/v1/guard": lambda rid: _guard_fields(rid, max_output_tokens="many"),
    "/api/v1/status": lambda rid: {"conversation_id": rid, "category": "colour", "message": "x"},
    "/api/v1/status/batch": lambda rid: {
        "messages": [{"conversation_id": rid, "category": "info", "message": "x"}, {"x": 1}]
    },
}
IDEMPOTENT = {"/api/v1/usage", "/api/v1/usage/batch"}


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[str, str], Any]  # (route, request id) -> the body (bytes, or JSON-able)
    key: str = "valid"  # valid, unknown (no such key), blank ("Bearer "), none (no header)
    headers: tuple[tuple[str, str | None], ...] = ()
    duplicate: bool = False  # the same body was accepted once before
    max_body: int | None = None  # DATA_UPLOAD_MAX_MEMORY_SIZE for this request (AT_LIMIT)
    volatile: frozenset[str] = VOLATILE
    routes: frozenset[str] = frozenset(HOT_ROUTES)


AT_LIMIT = 0  # max_body: the body's own size


def _valid(route: str, rid: str) -> Any:
    return VALID[route](rid)


CORPUS = [
    Case("valid", _valid),
    Case("invalid field", lambda route, rid: INVALID[route](rid)),
    Case("invalid JSON", lambda route, rid: b'{"request_id": "' + rid.encode()),
    Case("not an object", lambda route, rid: b'"' + rid.encode() + b'"'),
    Case("empty body", lambda route, rid: b""),
    Case("nested too deep", lambda route, rid: b"[" * 100 + b"]" * 100),
    Case("NUL in a string", lambda route, rid: {**_valid(route, rid), "model": "gpt\x00"}),
    Case("duplicate request id", _valid, duplicate=True, routes=frozenset(IDEMPOTENT)),
    Case(
        "reserving check",
        lambda route, rid: _check_fields(feature=rid),
        volatile=HELD,
        routes=frozenset({"/api/v1/budgets/check"}),
    ),
    Case("unknown key", _valid, key="unknown"),
    Case("blank bearer key", _valid, key="blank"),
    Case("no authorization", _valid, key="none"),
    Case("lower-case scheme", _valid, headers=(("authorization", "bearer {key}"),)),
    Case(
        "oversized body", lambda route, rid: {**_valid(route, rid), "pad": "x" * 200}, max_body=150
    ),
    Case("body of the largest size", _valid, max_body=AT_LIMIT),
    Case("non-ASCII text", lambda route, rid: {**_valid(route, rid), "feature": "größe-😀"}),
    Case("wrong content type", _valid, headers=(("content-type", "text/plain"),)),
    Case("charset", _valid, headers=(("content-type", "application/json; charset=utf-8"),)),
    Case("host with port", _valid, headers=(("host", "testserver:8000"),)),
    Case("disallowed host", _valid, headers=(("host", "evil.example"),)),
]


def _normalized(reply: Reply, rid: str, volatile: frozenset[str]) -> tuple[Any, ...]:
    """(status, JSON body with volatile values masked, the body's bytes unless some were,
    the headers but Content-Length and Date); `rid` reads as <rid>."""
    masked: list[str] = []

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            masked.extend(k for k, v in value.items() if k in volatile and v is not None)
            return {
                k: "<volatile>" if k in volatile and v is not None else mask(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    text = reply.body.decode()
    if rid:
        text = text.replace(rid, "<rid>")
    try:
        body: Any = mask(json.loads(text))
    except ValueError:
        body = None
    headers = sorted(
        (k.decode("latin1"), v.decode("latin1"))
        for k, v in reply.headers
        if k not in (b"content-length", b"date")
    )
    return reply.status, body, None if masked else text, headers


def _parity_request(app: Any, route: str, case: Case, rid: str, raw_key: str) -> tuple[Any, ...]:
    body = case.body(route, rid)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    key = {"valid": raw_key, "unknown": "tm_not-a-key", "blank": "", "none": None}[case.key]
    headers: dict[str, Any] = {k: (v.format(key=raw_key) if v else v) for k, v in case.headers}
    scope = _scope(route, key=key, **headers)
    if case.max_body is None:
        reply = async_to_sync(_exchange)(app, scope, [raw])
    else:
        with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=case.max_body or len(raw)):
            reply = async_to_sync(_exchange)(app, scope, [raw])
    return _normalized(reply, rid, case.volatile)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("route", HOT_ROUTES)
@pytest.mark.parametrize("hot_first", [True, False], ids=["hot-first", "django-first"])
def test_it_answers_every_request_to_a_hot_route_exactly_as_django_does(
    hot: HotPath, bridge: WsgiBridge, member: Persona, route: str, hot_first: bool
) -> None:
    _ranker_budget()
    AgentProfile.objects.create(name="ranker-agent", model="gpt-4o-mini", token_budget=50_000)
    assert hot.routes  # the hot path is on
    differences = []
    for case in CORPUS:
        if route not in case.routes:
            continue
        # Distinct request ids, so that each path meets the same state (a duplicate for both).
        rids = {"hot": f"{case.name}-hot", "django": f"{case.name}-django"}
        if case.duplicate:
            for rid in rids.values():
                assert _send(bridge, route, _valid(route, rid), key=member.raw_key).status < 300
        order = ["hot", "django"] if hot_first else ["django", "hot"]
        answers = {
            side: _parity_request(
                hot if side == "hot" else bridge, route, case, rids[side], member.raw_key
            )
            for side in order
        }
        for part, hot_part, django_part in zip(
            ("status", "body", "bytes", "headers"), answers["hot"], answers["django"], strict=True
        ):
            if hot_part != django_part:
                differences.append((case.name, part, hot_part, django_part))
    assert not differences, pprint.pformat(differences, width=100)
    if route == "/api/v1/budgets/check" and tm_redis.configured():
        assert hot.inline_served > 0  # answers from the event loop were among those compared


# --- budget checks on the event loop -------------------------------------------------------------


def _ranker_budget() -> Budget:
    return budget_create(
        principal=None,
        name="ranker",
        scope="project",
        scope_id="ranker",
        team_id="search",
        cost_limit=Decimal("100"),
    )


def _open_reservations() -> int:
    return int(tm_redis.client().zcard(counters.open_reservations_key()))


def _check(app: HotPath, key: str, body: bytes) -> tuple[int, dict[str, Any]]:
    reply = _send(app, "/api/v1/budgets/check", body, key=key)
    return reply.status, reply.json()


def _counts(app: HotPath) -> tuple[int, int]:
    return app.inline_served, app.inline_deferred


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_answers_a_budget_check_on_the_event_loop_once_its_caches_are_warm(
    hot: HotPath, member: Persona
) -> None:
    budget = _ranker_budget()

    # Cold: the API key and the budget rules come from the database, which the loop may not
    # touch; the check runs in the pool instead and holds exactly once.
    status, first = _check(hot, member.raw_key, _check_body())
    assert (status, first["allowed"]) == (200, True), first
    assert _counts(hot) == (0, 1)
    assert _open_reservations() == 1

    status, second = _check(hot, member.raw_key, _check_body())
    assert (status, second["allowed"]) == (200, True), second
    assert _counts(hot) == (1, 1)
    assert _open_reservations() == 2
    assert first["reservation_id"] != second["reservation_id"]
    status_now = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert status_now["tokens_reserved"] == 2 * 1200


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_answers_a_check_on_the_loop_exactly_as_through_django(
    hot: HotPath, bridge: WsgiBridge, member: Persona
) -> None:
    _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches
    for body in (_check_body(reserve=False), _check_body(max_output_tokens=-1)):
        served = hot.inline_served
        inline = _normalized(
            _send(hot, "/api/v1/budgets/check", body, key=member.raw_key), "", VOLATILE
        )
        assert hot.inline_served == served + 1
        django = _normalized(
            _send(bridge, "/api/v1/budgets/check", body, key=member.raw_key), "", VOLATILE
        )
        assert inline == django
    assert inline[0] == 400


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_defers_a_check_to_the_pool_while_the_budget_rules_are_cold(
    hot: HotPath, member: Persona
) -> None:
    _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches
    budget_selectors.invalidate_rules()  # as a budget change does
    status, answer = _check(hot, member.raw_key, _check_body())
    assert (status, answer["allowed"], _counts(hot)) == (200, True, (0, 2))
    assert _open_reservations() == 1
    _check(hot, member.raw_key, _check_body())
    assert _counts(hot) == (1, 2)  # the pool run reloaded them


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_holds_once_a_check_whose_counter_needs_seeding_on_the_loop(
    hot: HotPath, member: Persona
) -> None:
    budget = _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches
    client = tm_redis.client()
    assert client.delete(counters.counter_key(budget.pk, budget.window_at(timezone.now()))) == 1

    status, answer = _check(hot, member.raw_key, _check_body())
    assert (status, answer["allowed"]) == (200, True), answer
    assert _counts(hot) == (0, 2)  # the cold caches, then the seed
    assert _open_reservations() == 1
    status_now = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert status_now["tokens_reserved"] == answer["estimated_tokens"] == 1200


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_never_tries_a_large_check_on_the_loop(hot: HotPath, member: Persona) -> None:
    _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches
    messages = [{"role": "user", "content": "word " * 2000}]
    body = _check_body(input_tokens=None, messages=messages)
    assert len(body) > INLINE_MAX_BODY
    status, answer = _check(hot, member.raw_key, body)
    assert (status, answer["allowed"]) == (200, True), answer
    assert answer["input_tokens"] > 2000
    assert _counts(hot) == (0, 1)  # not even tried: counting its tokens could hold the loop


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_defers_a_check_to_the_pool_while_redis_is_not_steady(
    hot: HotPath, member: Persona
) -> None:
    _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches
    tm_redis.trip()  # a Redis that failed lately could stall the loop again
    status, answer = _check(hot, member.raw_key, _check_body(reserve=False))
    assert (status, answer["allowed"], _counts(hot)) == (200, True, (0, 2))


@pytest.mark.django_db(transaction=True)
def test_it_checks_budgets_in_the_pool_without_redis(
    settings: Any, hot: HotPath, member: Persona
) -> None:
    settings.REDIS_URL = ""  # budgets are checked in the database
    _ranker_budget()
    for _ in range(3):
        status, answer = _check(hot, member.raw_key, _check_body())
        assert (status, answer["allowed"]) == (200, True), answer
    assert _counts(hot) == (0, 3)


@pytest.mark.django_db(transaction=True)
def test_it_never_runs_usage_tracking_on_the_loop(hot: HotPath, platform: Persona) -> None:
    assert actions.REGISTRY["track_usage"].inline is None  # it has no cache-only first phase
    for i in range(3):
        reply = _send(hot, "/api/v1/usage", event(f"loop-{i}"), key=platform.raw_key)
        assert reply.status == 201, reply.body
    assert _counts(hot) == (0, 0)
    assert rows(request_id__startswith="loop-") == 3


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_answers_an_unexpected_error_on_the_loop_with_a_logged_500_as_in_the_pool(
    hot: HotPath, member: Persona, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    _ranker_budget()
    _check(hot, member.raw_key, _check_body(reserve=False))  # warms the caches

    def broken(**_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(enforcement, "budget_check", broken)
    status, answer = _check(hot, member.raw_key, _check_body())
    assert (status, answer["error"]["code"]) == (500, "server_error")
    assert hot.inline_served == 1
    assert "boom" in caplog.text


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_it_records_when_a_key_used_only_for_budget_checks_was_last_used(
    hot: HotPath, member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(key_cache, "clock", lambda: now[0])
    _ranker_budget()
    key = ApiKey.objects.filter(pk=member.key.pk)  # type: ignore[union-attr]

    def checked_at(seconds: float) -> tuple[int, int]:
        now[0] = 1000.0 + seconds
        assert _check(hot, member.raw_key, _check_body(reserve=False))[0] == 200
        return _counts(hot)

    assert checked_at(0) == (0, 1)  # cold: in the pool, which records the use
    assert key.get().last_used_at is not None
    key.update(last_used_at=None)
    assert checked_at(1) == (1, 1)  # on the loop: nothing to record yet
    assert checked_at(LAST_USED_WRITE_SECONDS - 1) == (1, 2)  # the cached key expired
    assert key.get().last_used_at is None  # recorded at most once a minute
    # The write is due: the loop leaves the request to the pool, which records it.
    assert checked_at(LAST_USED_WRITE_SECONDS + 1) == (1, 3)
    assert key.get().last_used_at is not None
    assert checked_at(LAST_USED_WRITE_SECONDS + 2) == (2, 3)
