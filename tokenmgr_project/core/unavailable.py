"""What every interface answers when the database is unreachable (SPEC §3): a 503 with
`Retry-After` and the JSON error shape, never a 500.

The hot path keeps working from caches and the Redis buffer while PostgreSQL is down; what it
truly cannot decide (an unknown key, a read of the ledger, the admin) ends here. The DRF
exception handler (core.api), the hot path (core.hotpath.run_action) and
`DatabaseUnavailableMiddleware` (every other Django view) all use this module, so the answer is
the same everywhere. Imports no app.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from django import db
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger(__name__)

# "Cannot reach or talk to the database", as Django wraps it and as psycopg raises it where we
# use its cursor directly (COPY). Deadlocks and statement timeouts are OperationalErrors too:
# retrying later is the right advice for those as well.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    db.OperationalError,
    db.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
RETRY_AFTER_SECONDS = 5
HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS)}
# One warning per this many seconds and process: an outage must not write a line per request.
_LOG_EVERY_SECONDS = 5.0
# After a failure, optional reads (the ledger's duplicate check) skip the database this long, so
# an outage costs one connection attempt per second per process, not one per request.
SUSPECT_SECONDS = 1.0

_log_lock = threading.Lock()
_last_logged = float("-inf")
_suppressed = 0
_suspect_until = float("-inf")


def body() -> dict[str, Any]:
    return {
        "error": {
            "code": "unavailable",
            "message": "The database is unreachable; retry after a few seconds.",
            "fields": {},
        }
    }


def note(exc: BaseException, where: str) -> None:
    """Record a database outage seen at `where` (see suspect()); log it at most every few
    seconds per process."""
    global _last_logged, _suppressed, _suspect_until
    now = time.monotonic()
    _suspect_until = now + SUSPECT_SECONDS
    with _log_lock:
        if now - _last_logged < _LOG_EVERY_SECONDS:
            _suppressed += 1
            return
        suppressed, _suppressed, _last_logged = _suppressed, 0, now
    logger.warning(
        "database unreachable (%s: %s: %s); %d more since the last warning",
        where,
        type(exc).__name__,
        str(exc).strip().splitlines()[0] if str(exc).strip() else "",
        suppressed,
    )


def suspect() -> bool:
    """Did the database fail within the last SUSPECT_SECONDS (in this process)?"""
    return time.monotonic() < _suspect_until


def reset() -> None:
    """Trust the database again now (tests)."""
    global _suspect_until
    _suspect_until = float("-inf")


def response() -> JsonResponse:
    return JsonResponse(body(), status=503, headers=HEADERS)


class DatabaseUnavailableMiddleware:
    """A database outage in a plain Django view (the admin, the docs' login) is a 503 with the
    JSON error shape and Retry-After, not Django's HTML 500 page. DRF views answer it
    themselves (core.errors.api_exception_handler)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, DATABASE_ERRORS):
            return None
        note(exception, request.path)
        return response()
