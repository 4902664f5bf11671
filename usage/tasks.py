"""Celery tasks: take ids/flags, call one service, safe to run twice."""

from __future__ import annotations

from celery import shared_task

from tokenmgr_project.redis import REDIS_ERRORS
from usage import services


@shared_task(
    autoretry_for=REDIS_ERRORS, retry_backoff=True, retry_backoff_max=30, max_retries=5, expires=10
)
def usage_flush_buffer(force: bool = False) -> dict[str, int]:
    """Flush the Redis buffer when due (forced, size reached, or interval elapsed)."""
    if not services.flush_due(force=force):
        return {"entries": 0, "events": 0, "inserted": 0}
    result = services.usage_flush()
    return {"entries": result.entries, "events": result.events, "inserted": result.inserted}


@shared_task(retry_backoff=True, max_retries=3)
def usage_purge_expired() -> int:
    return services.usage_purge_expired()
