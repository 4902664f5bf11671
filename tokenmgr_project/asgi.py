"""One ASGI server for both protocols (SPEC §3): HTTP to Django's WSGI handler, websockets to
Channels consumers.

Why HTTP does not use Django's ASGI handler: it runs every sync request in a thread made for
that request, so persistent database connections are never reused (each request opened, and
leaked, a PostgreSQL session) and the thread churn cost most of the CPU. Our views are all sync
(DRF). `WsgiBridge` reads the body on the event loop, runs the whole WSGI call in one hop to a
fixed pool of threads (each keeping its database connection), and sends the response.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.exceptions import SynchronousOnlyOperation

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")
get_asgi_application()  # sets up Django before Channels and the routes import models

from a2wsgi.wsgi import build_environ  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.serializers.json import DjangoJSONEncoder  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http.request import split_domain_port, validate_host  # noqa: E402

from reporting.routing import websocket_urlpatterns  # noqa: E402
from tokenmgr_project import redis as tm_redis  # noqa: E402
from tokenmgr_project import unavailable  # noqa: E402

Message = dict[str, Any]


logger = logging.getLogger("django.request")

# The POSTs agents send many times a second. With a Bearer key, a JSON body and an allowed Host
# they skip Django's request object, middleware and URL resolving (~40% of such a request's CPU)
# and run the same action as their view's fast path (usage.apis.fast_action): same
# authentication, same bodies, same errors. tests/test_asgi.py checks this table against the
# URLconf and the responses against the Django path.
FAST_POST_ROUTES = {
    "/api/v1/usage": "track_usage",
    "/api/v1/usage/batch": "track_usage_batch",
    "/api/v1/budgets/check": "check_budget",
}
# Fast actions that run on the event loop itself, without the hop to the thread pool. On 2 cores
# the hop (a futex wake-up and a GIL hand-off each way) cost a budget check ~0.12 ms of CPU and
# most of its p99 at 1,500 checks/s (BENCHMARKS.md §3). Such an action must touch the database
# only before its first side effect: on the loop Django refuses database access
# (SynchronousOnlyOperation), and the request is then run again from the start in the pool. That
# is the case whenever a cache is cold (API key, budget rules, price overrides) or a counter needs
# seeding. Only with a steady Redis (the check's only other I/O), and only small bodies: a check
# carrying messages to tokenize could hold the loop for milliseconds.
INLINE_ACTIONS = {"check_budget"}
INLINE_MAX_BODY = 4096
# What SecurityMiddleware and XFrameOptionsMiddleware add to an API response with our settings.
FAST_HEADERS = [
    (b"content-type", b"application/json"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


_ENCODER = DjangoJSONEncoder(separators=(",", ":"), ensure_ascii=False)
_SERVER_ERROR: tuple[int, dict[str, Any], dict[str, str]] = (
    500,
    {"error": {"code": "server_error", "message": "Internal server error."}},
    {},
)


def _allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]  # as HttpRequest.get_host() does
    return hosts


class WsgiBridge:
    """ASGI → WSGI with a single thread hop per request. Responses are sent whole (our API
    returns bounded JSON bodies; a streaming endpoint would need its own path)."""

    def __init__(self, wsgi_app: Any, threads: int) -> None:
        self.wsgi_app = wsgi_app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")
        self.inline_served = 0
        self.inline_deferred = 0  # tried on the loop, needed the database: run in the pool

    @staticmethod
    def fast_route(scope: Message) -> tuple[str, str] | None:
        """(action, Authorization) when this request may take the fast path, else None."""
        if scope["method"] != "POST":
            return None
        action = FAST_POST_ROUTES.get(scope["path"])
        if action is None:
            return None
        found: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"host", b"content-type", b"authorization"):
                found[name] = value
        content_type = found.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        authorization = found.get(b"authorization", b"").decode("latin1")
        if content_type != b"application/json" or authorization[:7].lower() != "bearer ":
            return None
        domain, _port = split_domain_port(found.get(b"host", b"").decode("latin1"))
        if not domain or not validate_host(domain, _allowed_hosts()):
            return None  # Django's path answers it (400 for a disallowed host)
        return action, authorization

    @staticmethod
    def inline_ok(action: str, body: bytes) -> bool:
        return action in INLINE_ACTIONS and len(body) <= INLINE_MAX_BODY and tm_redis.steady()

    def _call_inline(
        self, action: str, authorization: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The fast action on the event loop; None when it needed the database.

        Without the request signals: their receivers look after database connections, the
        query log and Django's cache connections, none of which can be used on the loop (and
        the lookups through asgiref's thread-critical locals cost ~10% of a check's CPU)."""
        try:
            answer = self._run(action, authorization, body)
        except SynchronousOnlyOperation:
            self.inline_deferred += 1
            return None
        self.inline_served += 1
        return answer

    def _call_fast(
        self, action: str, authorization: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        # The request signals carry Django's per-request housekeeping (closing broken or
        # expired database connections, resetting the query log).
        signals.request_started.send(sender=self.__class__, environ=None)
        try:
            return self._run(action, authorization, body)
        finally:
            signals.request_finished.send(sender=self.__class__)

    @staticmethod
    def _run(
        action: str, authorization: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        from usage.apis import fast_action

        try:
            code, payload, extra = fast_action(action, authorization, body)
        except SynchronousOnlyOperation:
            raise  # on the event loop only: _call_inline runs it again in the pool
        except unavailable.DATABASE_ERRORS as exc:  # fast_action maps its own; this is the net
            unavailable.note(exc, action)
            code, payload, extra = 503, unavailable.body(), unavailable.HEADERS
        except Exception:
            logger.exception("Internal Server Error: %s", action)
            code, payload, extra = _SERVER_ERROR
        data = _ENCODER.encode(payload).encode()
        headers = [*FAST_HEADERS, (b"content-length", str(len(data)).encode())]
        headers.extend((k.lower().encode("latin1"), v.encode("latin1")) for k, v in extra.items())
        return code, headers, data

    def _call(self, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return lambda data: None

        result = self.wsgi_app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [(k.lower().encode("latin1"), v.encode("latin1")) for k, v in headers]
        return int(status.split(" ", 1)[0]), encoded, body

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                await self._too_large(send)  # refuse before buffering an unbounded upload
                return
            if not message.get("more_body"):
                break
        request_body = b"".join(chunks)
        loop = asyncio.get_running_loop()
        fast = self.fast_route(scope)
        if fast is not None:
            answer = None
            if self.inline_ok(fast[0], request_body):
                answer = self._call_inline(fast[0], fast[1], request_body)
            if answer is None:
                answer = await loop.run_in_executor(
                    self.executor, self._call_fast, fast[0], fast[1], request_body
                )
            status, headers, body = answer
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        environ: dict[str, Any] = dict(build_environ(scope, io.BytesIO(request_body)))  # type: ignore[arg-type]
        # Chunked uploads carry no Content-Length, and Django reads exactly that many bytes.
        environ["CONTENT_LENGTH"] = str(len(request_body))
        status, headers, body = await loop.run_in_executor(self.executor, self._call, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _too_large(send: Any) -> None:
        from usage.errors import body_too_large_error

        error = body_too_large_error()
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Lifespan:
    """Embedded default (no Redis): the status broadcaster runs in this server process, the
    only place the in-process channel layer reaches. With Redis it is its own process."""

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        from reporting.broadcaster import StatusBroadcaster

        stop = asyncio.Event()
        task: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not settings.REDIS_URL:
                    task = asyncio.create_task(StatusBroadcaster().run(stop))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                stop.set()
                if task is not None:
                    await task
                await send({"type": "lifespan.shutdown.complete"})
                return


def _warm_up_and_freeze() -> None:
    """Load the price catalogue now, then take everything loaded so far out of the garbage
    collector's sight: a full collection over Django, DRF and the catalogue took ~65 ms, a
    stall for whichever request triggered it."""
    from usage import pricing

    pricing.catalogue_model("openai", "gpt-4o")
    gc.collect()
    gc.freeze()


application = ProtocolTypeRouter(
    {
        "http": WsgiBridge(get_wsgi_application(), threads=settings.TOKENMGR_HTTP_THREADS),
        "lifespan": Lifespan(),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
_warm_up_and_freeze()
