"""Provenance's periodic job: retention of relationships (scheduled in tokenmgr_project.celery)."""

from __future__ import annotations

from celery import shared_task

from provenance import services


@shared_task(retry_backoff=True, max_retries=3)
def provenance_purge_expired() -> int:
    return services.provenance_purge_expired()
