"""The hot path: the one place where requests bypass Django (STYLE 6c).

Agents POST usage and budget checks many times a second. A POST to a view marked `fast_post`
(core.api.ActionView) that carries a Bearer key, a JSON body and an allowed Host skips Django's
request object, middleware and URL resolving (~40% of such a request's CPU) and runs the same
action (core.actions) with the same authentication, error bodies and response headers.
Everything else, and these routes with any other content type or a session, goes to Django.

What it borrows from the layers it skips is derived, never copied by hand:
- the route table, from the URLconf: every view class with `fast_post = True`;
- the response headers, from running a response through `settings.MIDDLEWARE` at start-up;
- what each middleware does to a request, from `MIDDLEWARE_ACCOUNTS`: an entry per middleware
  saying why the hot path may skip it. A middleware missing there turns the hot path off (with
  a warning) and fails tests/test_asgi.py, so a CORS or rate-limit middleware added later cannot
  silently miss the hottest routes.

An action may answer on the event loop itself (no thread hop: on 2 cores the hop cost a budget
check ~0.12 ms of CPU and most of its p99) only through its registered cache-only first phase
(`@action(inline=...)`), which returns None, before any side effect, when it needs the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.http.request import split_domain_port, validate_host
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.module_loading import import_string
from rest_framework import exceptions, status

from tokenmgr_project.core import actions, unavailable
from tokenmgr_project.core.errors import ApiError, error_body
from tokenmgr_project.core.http import read_body
from tokenmgr_project.core.parsers import load_json
from tokenmgr_project.core.principal import (
    BEARER_CHALLENGE,
    cached_principal_for_bearer,
    principal_for_bearer,
)

logger = logging.getLogger("django.request")

Message = dict[str, Any]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

# Why each middleware's work does not apply to a Bearer JSON POST to a fast route, or where the
# hot path does the same. Response headers are captured from the real chain (`captured_headers`),
# so an entry here only has to speak for the request side.
MIDDLEWARE_ACCOUNTS: dict[str, str] = {
    "django.middleware.security.SecurityMiddleware": "response headers captured; "
    "SECURE_SSL_REDIRECT and SECURE_HSTS_SECONDS turn the hot path off (request_conditions)",
    "whitenoise.middleware.WhiteNoiseMiddleware": "serves STATIC_URL paths only",
    "django.contrib.sessions.middleware.SessionMiddleware": "a Bearer request never touches "
    "the session, so no cookie is set",
    "django.middleware.common.CommonMiddleware": "the Host check is Django's validate_host "
    "with ALLOWED_HOSTS; APPEND_SLASH only acts on 404s; DISALLOWED_USER_AGENTS turns the hot "
    "path off",
    "django.middleware.csrf.CsrfViewMiddleware": "API views are csrf_exempt; a Bearer key is "
    "not a cookie",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "request.user is the session's; "
    "the hot path authenticates the Bearer key as ApiKeyAuthentication does",
    "django.contrib.messages.middleware.MessageMiddleware": "no message is added",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "response header captured",
    "tokenmgr_project.core.unavailable.DatabaseUnavailableMiddleware": "database errors answer "
    "the same 503 and Retry-After (run_action)",
}


def unaccounted_middleware() -> list[str]:
    """Entries of settings.MIDDLEWARE the hot path does not account for."""
    return [m for m in settings.MIDDLEWARE if m not in MIDDLEWARE_ACCOUNTS]


def request_conditions() -> list[str]:
    """Settings under which some middleware acts on every request: the hot path is then off."""
    found = []
    if getattr(settings, "SECURE_SSL_REDIRECT", False):
        found.append("SECURE_SSL_REDIRECT")
    if getattr(settings, "DISALLOWED_USER_AGENTS", None):
        found.append("DISALLOWED_USER_AGENTS")
    if getattr(settings, "SECURE_HSTS_SECONDS", 0):
        # Added to https responses only: the headers are captured from one plain-http request.
        found.append("SECURE_HSTS_SECONDS")
    return found


def fast_views(patterns: list[Any] | None = None, prefix: str = "") -> dict[str, Any]:
    """path -> view class of every URLconf view marked `fast_post` (paths without converters)."""
    found: dict[str, Any] = {}
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        route = str(entry.pattern)
        if isinstance(entry, URLResolver):
            found.update(fast_views(entry.url_patterns, prefix + route))
        elif isinstance(entry, URLPattern):
            view = getattr(entry.callback, "view_class", None)
            if view is not None and getattr(view, "fast_post", False) and "<" not in route:
                found["/" + prefix + route] = view
    return found


def fast_routes() -> dict[str, str]:
    """path -> the POST action of each fast view."""
    return {path: view.actions_by_method["post"] for path, view in fast_views().items()}


def view_headers(view: Any) -> list[tuple[bytes, bytes]]:
    """What DRF's finalize_response adds to every JSON answer of this view: Allow (its
    methods) and Vary: Accept (content negotiation)."""
    instance = view()
    if hasattr(instance, "get") and not hasattr(instance, "head"):
        instance.head = instance.get  # as View.setup() does before each request: Allow has HEAD
    allowed = ", ".join(instance.allowed_methods)
    return [(b"vary", b"Accept"), (b"allow", allowed.encode("latin1"))]


def captured_headers() -> list[tuple[bytes, bytes]]:
    """The headers `settings.MIDDLEWARE` adds to a JSON response of a fast route, found by
    running one through the real chain (each middleware's __call__, innermost a JSON view)."""
    path = next(iter(fast_routes()), "/")
    request = HttpRequest()
    request.method = "POST"
    request.path = request.path_info = path
    request.META = {
        "SERVER_NAME": "hotpath",
        "SERVER_PORT": "80",
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": "Bearer capture",
    }
    # Host validation is not a response effect: the hot path checks it itself (fast_route).
    request.get_host = lambda: "hotpath"  # type: ignore[method-assign]

    handler: Callable[[HttpRequest], HttpResponseBase] = lambda _request: JsonResponse({})  # noqa: E731
    for dotted in reversed(settings.MIDDLEWARE):
        handler = import_string(dotted)(handler)
    response = handler(request)
    skip = {"content-type", "content-length"}
    return [
        (name.lower().encode("latin1"), value.encode("latin1"))
        for name, value in response.items()
        if name.lower() not in skip
    ]


@dataclass(frozen=True, slots=True)
class Route:
    action: str
    authorization: str
    headers: list[tuple[bytes, bytes]]


_ENCODER = DjangoJSONEncoder(separators=(",", ":"), ensure_ascii=False)
_SERVER_ERROR: tuple[int, dict[str, Any], dict[str, str]] = (
    500,
    {"error": {"code": "server_error", "message": "Internal server error."}},
    {},
)
# Bodies above this size never run on the loop: tokenizing messages could hold it for ms.
INLINE_MAX_BODY = 4096


def _data(raw_body: bytes) -> Any:
    # DRF gives a view {} for an empty body (there is no stream to parse), not a parse error.
    return load_json(raw_body) if raw_body else {}


def run_action(
    name: str, authorization: str, raw_body: bytes, *, inline: bool = False
) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """(status, body, extra headers) of action `name` for a Bearer JSON POST. With `inline`,
    only from caches (the event loop): None when the action needs the database."""
    try:
        if inline:
            principal = cached_principal_for_bearer(authorization)
            if principal is None:
                return None
            outcome = actions.run_inline(name, principal, _data(raw_body))
            if outcome is None:
                return None
        else:
            principal = principal_for_bearer(authorization)
            outcome = actions.run(name, principal, _data(raw_body))
    except ApiError as exc:
        return exc.status_code, exc.body(), {}
    except exceptions.APIException as exc:
        unauthorized = exc.status_code == status.HTTP_401_UNAUTHORIZED
        headers = {"WWW-Authenticate": BEARER_CHALLENGE} if unauthorized else {}
        return exc.status_code, error_body(exc, exc.status_code), headers
    except unavailable.DATABASE_ERRORS as exc:
        # Known keys, rules and prices are served from cache and usage is buffered while the
        # database is down; only what needs it (an unknown key, say) arrives here.
        unavailable.note(exc, name)
        return 503, unavailable.body(), dict(unavailable.HEADERS)
    except Exception:
        logger.exception("Internal Server Error: %s", name)
        return _SERVER_ERROR
    return outcome.status, outcome.body, {}


class HotPath:
    """ASGI app in front of `fallback` (the Django bridge): answers the fast routes itself."""

    def __init__(self, fallback: Any, executor: Any) -> None:
        self.fallback = fallback
        self.executor = executor
        self.inline_served = 0
        self.inline_deferred = 0  # tried on the loop, needed the database: run in the pool
        self.routes: dict[str, str] = {}
        self.headers: dict[str, list[tuple[bytes, bytes]]] = {}
        self.inline_actions: set[str] = set()
        missing, conditions = unaccounted_middleware(), request_conditions()
        if missing or conditions:
            # Every request takes Django's path until the hot path accounts for the change.
            logger.warning("hot path off: %s", ", ".join([*missing, *conditions]))
            return
        views = fast_views()
        self.routes = {path: view.actions_by_method["post"] for path, view in views.items()}
        chain = captured_headers()
        self.headers = {
            path: [(b"content-type", b"application/json"), *view_headers(view), *chain]
            for path, view in views.items()
        }
        self.inline_actions = {
            name
            for name in self.routes.values()
            if name in actions.REGISTRY and actions.REGISTRY[name].inline is not None
        }

    def route(self, scope: Message) -> Route | None:
        """The fast route this request may take, else None (Django answers it)."""
        if scope["method"] != "POST":
            return None
        action = self.routes.get(scope["path"])
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
        return Route(action, authorization, self.headers[scope["path"]])

    @staticmethod
    def answer(route: Route, code: int, payload: dict[str, Any], extra: dict[str, str]) -> Answer:
        data = _ENCODER.encode(payload).encode()
        headers = [*route.headers, (b"content-length", str(len(data)).encode())]
        headers.extend((k.lower().encode("latin1"), v.encode("latin1")) for k, v in extra.items())
        return code, headers, data

    def _in_pool(self, route: Route, body: bytes) -> Answer:
        # The request signals carry Django's per-request housekeeping (closing broken or
        # expired database connections, resetting the query log).
        signals.request_started.send(sender=self.__class__, environ=None)
        try:
            result = run_action(route.action, route.authorization, body)
            assert result is not None  # only inline runs answer None
            return self.answer(route, *result)
        finally:
            signals.request_finished.send(sender=self.__class__)

    async def serve(self, route: Route, body: bytes, send: Any) -> None:
        answer = None
        if route.action in self.inline_actions and len(body) <= INLINE_MAX_BODY:
            # Without the request signals: their receivers look after database connections,
            # none of which the loop may use.
            result = run_action(route.action, route.authorization, body, inline=True)
            if result is None:
                self.inline_deferred += 1
            else:
                self.inline_served += 1
                answer = self.answer(route, *result)
        if answer is None:
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(self.executor, self._in_pool, route, body)
        status_code, headers, data = answer
        await send({"type": "http.response.start", "status": status_code, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        route = self.route(scope) if self.routes else None
        if route is None:
            await self.fallback(scope, receive, send)
            return
        body = await read_body(receive, send)
        if body is not None:
            await self.serve(route, body, send)


def _allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]  # as HttpRequest.get_host() does
    return hosts
