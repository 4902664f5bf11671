"""Celery tasks of the budgets app: take ids, call one service, safe to run twice."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import OperationalError
from django.dispatch import receiver

from budgets import alerts, deliveries, overrides, services, signals
from tokenmgr_project.core.redis import REDIS_ERRORS

logger = logging.getLogger(__name__)

# Transient: a dropped database connection, a deadlock victim, Redis failing over.
TRANSIENT = (OperationalError, *REDIS_ERRORS)


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=5)
def budget_alerts_evaluate(budget_id: int) -> int:
    """Fire the alerts one budget's spend calls for; returns how many were new."""
    return len(alerts.alerts_evaluate(budget_id=budget_id))


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=60
)
def budget_alerts_evaluate_all() -> int:
    return alerts.alerts_evaluate_all()


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=5)
def alert_delivery_send(delivery_id: int) -> str | None:
    """One attempt at one delivery (failures are rescheduled by the service, not by Celery)."""
    delivery = deliveries.alert_delivery_send(delivery_id=delivery_id)
    return None if delivery is None else delivery.status


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=30, max_retries=3, expires=15
)
def alert_deliveries_send_due() -> int:
    return deliveries.alert_deliveries_send_due()


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=60
)
def budget_periods_close() -> int:
    return alerts.budget_periods_close()


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=30, max_retries=3, expires=10
)
def reservations_expire() -> int:
    """Free holds past their TTL (checks also sweep as they go); returns how many."""
    return services.reservations_expire()


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=60
)
def counters_reconcile() -> int:
    """Set Redis budget counters to the ledger plus buffer exactly; returns how many were off."""
    return services.counters_reconcile()


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=10, max_retries=3, expires=5
)
def counters_rebuild() -> int:
    """Rebuild counters that usage written straight to the database skipped (Redis was down)."""
    return services.counters_rebuild_if_marked()


@shared_task(
    autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=3, expires=60
)
def overrides_expire() -> int:
    """Approved and pending overrides past their expiry become expired; returns how many."""
    return overrides.overrides_expire()


# --- the services' after-commit announcements, as Celery messages ------------------------------


@receiver(signals.evaluations_wanted)
def _enqueue_evaluations(budget_ids: list[int], **_kwargs: Any) -> None:
    for budget_id in budget_ids:
        try:
            budget_alerts_evaluate.apply_async(
                (budget_id,), countdown=alerts.EVALUATE_SOON_SECONDS, retry=False
            )
        except deliveries.ENQUEUE_ERRORS:
            logger.warning("could not enqueue alert evaluation; the beat will evaluate it")
            return


@receiver(signals.deliveries_created)
def _enqueue_deliveries(delivery_ids: list[int], **_kwargs: Any) -> None:
    for delivery_id in delivery_ids:
        try:
            alert_delivery_send.apply_async((delivery_id,), retry=False)
        except deliveries.ENQUEUE_ERRORS:
            logger.warning("could not enqueue alert delivery; the sweep will send it")
            return
