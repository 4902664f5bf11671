"""Celery tasks of the reporting app (analytics beat jobs): each calls one service and is safe
to run twice."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import OperationalError

from reporting import recommendations
from reporting.anomalies import anomalies_record
from tokenmgr_project.core.redis import REDIS_ERRORS

logger = logging.getLogger(__name__)

# Transient: a dropped database connection, a deadlock victim, Redis failing over.
TRANSIENT = (OperationalError, *REDIS_ERRORS)


# --- analytics: anomalies ---


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=600
)
def anomalies_detect() -> dict[str, int]:
    """Record new anomalies of the last whole hours and days, alert each once, resolve those
    back in range."""
    recorded = anomalies_record()
    return {"new": len(recorded.new), "resolved": len(recorded.resolved)}


# --- analytics: recommendations ---


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=3000
)
def recommendations_refresh() -> dict[str, int]:
    """Organisation-wide recommendations stored or refreshed, the unseen marked stale; nothing
    when optimization_enabled is off."""
    return recommendations.recommendations_refresh()
