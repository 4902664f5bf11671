"""Celery tasks: take ids/flags, call one service, safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import connection
from django.dispatch import receiver

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from tokenmgr_project.core.redis import REDIS_ERRORS
from usage import hooks, services

_NOTHING = {"entries": 0, "events": 0, "inserted": 0}


def _outage_key() -> str:
    return tm_redis.key("usage", "flush-db-down")


@shared_task(
    autoretry_for=REDIS_ERRORS, retry_backoff=True, retry_backoff_max=30, max_retries=5, expires=10
)
def usage_flush_buffer(force: bool = False) -> dict[str, int]:
    """Flush the Redis buffer when due (forced, size reached, or interval elapsed).

    A flush that finds the database unreachable leaves what it read pending (never
    acknowledged: nothing is lost) and marks the outage in Redis, for every worker process.
    While marked, a flush first checks that the database answers, so an outage does not pull
    ever more entries into pending, and once it does, re-claims all pending entries at once
    rather than after TOKENMGR_RECLAIM_IDLE_MS: the backlog drains as soon as the database is
    back, and the insert-if-absent keeps it exactly once.
    """
    if not services.flush_due(force=force):
        return dict(_NOTHING)
    client = tm_redis.client()
    recovering = bool(client.exists(_outage_key()))
    try:
        if recovering:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        result = services.usage_flush(reclaim_idle_ms=0 if recovering else None)
    except unavailable.DATABASE_ERRORS as exc:
        unavailable.note(exc, "buffer flush")
        client.set(_outage_key(), "1", ex=86_400)
        return dict(_NOTHING)
    if recovering:
        client.delete(_outage_key())
    return {"entries": result.entries, "events": result.events, "inserted": result.inserted}


@shared_task(retry_backoff=True, max_retries=3)
def usage_purge_expired() -> int:
    return services.usage_purge_expired()


@receiver(hooks.flush_wanted)
def _flush_now(**_kwargs: Any) -> None:
    """The buffer reached buffer_size: one flush message, however many processes ask at once."""
    if tm_redis.client().set(tm_redis.key("usage", "flush-trigger"), "1", nx=True, px=250):
        usage_flush_buffer.delay(force=True)
