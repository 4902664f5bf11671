"""Delivery of budget alerts (SPEC §5) through the alert channels: status feed, email and
signed webhooks. Other apps' notices (reporting's anomalies) go the same way: `notices_deliver`.

Each new alert gets one `AlertDelivery` per active channel whose kind is enabled in the manager
settings (budgets.alerts creates the alerts); deliveries are sent after commit and retried with
exponential backoff by the sweep task (budgets.tasks).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from budgets import signals
from budgets.models import AlertChannel, AlertDelivery, BudgetAlert
from budgets.selectors import plain
from tokenmgr_project.core import redis as tm_redis
from usage.services import manager_config

logger = logging.getLogger(__name__)

# Delivery retries: 30 s, 1 min, 2 min, … until MAX_ATTEMPTS, then the delivery is failed.
RETRY_BASE_SECONDS = 30
MAX_ATTEMPTS = 8
WEBHOOK_TIMEOUT_SECONDS = 5.0
# A claimed delivery is not due again for this long, so the sweep and the after-commit task
# never send it twice; longer than any one attempt (the webhook timeout) can take.
CLAIM_LEASE = timedelta(seconds=60)
# The sweep stops starting new sends after this long; the rest stay due for its next run.
SWEEP_TIME_BUDGET_SECONDS = 10.0

# Publishing a Celery message failed (broker unreachable); the beat jobs make up for it.
ENQUEUE_ERRORS: tuple[type[Exception], ...] = (BrokerError, *tm_redis.REDIS_ERRORS)


def alert_deliveries_create(alerts: Sequence[BudgetAlert]) -> None:
    """One pending delivery per alert and enabled channel, sent after commit."""
    if not alerts:
        return
    transaction.on_commit(partial(_announce_alerts, list(alerts)))
    kinds = set(manager_config().alert_channels)
    channels = list(AlertChannel.objects.filter(is_active=True, kind__in=kinds))
    if not channels:
        return
    now = timezone.now()
    deliveries = AlertDelivery.objects.bulk_create(
        [
            AlertDelivery(alert=alert, channel=channel, next_attempt_at=now)
            for alert in alerts
            for channel in channels
        ]
    )
    ids = [d.pk for d in deliveries]
    transaction.on_commit(partial(_enqueue_deliveries, ids))


@dataclass(frozen=True, slots=True)
class Notice:
    """What a channel sends: the one-line message, email lines under it, the JSON body a webhook
    and the status feed carry, and the scope whose viewers may see it on the live feed."""

    kind: str  # budget_alert, anomaly, …
    message: str
    payload: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    team_id: str = ""
    project_id: str = ""

    @classmethod
    def of(cls, delivery: AlertDelivery) -> Notice:
        if delivery.alert is not None:
            return alert_notice(delivery.alert)
        return cls(**(delivery.notice or {}))


def alert_notice(alert: BudgetAlert) -> Notice:
    budget = alert.budget
    return Notice(
        kind="budget_alert",
        message=alert.message,
        payload=alert_payload(alert),
        lines=[
            f"Budget: {budget}",
            f"Alert: {alert.get_kind_display()} ({alert.metric})",
            f"Period starting: {alert.period_start.astimezone(budget.tz):%Y-%m-%d %H:%M %Z}",
        ],
        team_id=budget.team_id,
        project_id=budget.project_id,
    )


def notices_deliver(notices: Sequence[Notice]) -> int:
    """One pending delivery per notice and enabled channel, sent after commit (retried like
    alerts). Returns how many deliveries were created."""
    kinds = set(manager_config().alert_channels)
    channels = list(AlertChannel.objects.filter(is_active=True, kind__in=kinds))
    if not notices or not channels:
        return 0
    now = timezone.now()
    deliveries = AlertDelivery.objects.bulk_create(
        [
            AlertDelivery(notice=asdict(notice), channel=channel, next_attempt_at=now)
            for notice in notices
            for channel in channels
        ]
    )
    ids = [d.pk for d in deliveries]
    transaction.on_commit(partial(_enqueue_deliveries, ids))
    return len(ids)


def _announce_alerts(alerts: list[BudgetAlert]) -> None:
    signals.alerts_created.send(sender=BudgetAlert, alerts=alerts)


def _enqueue_deliveries(delivery_ids: list[int]) -> None:
    signals.deliveries_created.send(sender=AlertDelivery, delivery_ids=delivery_ids)


def alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    """The alert as webhook body and status-feed data (amounts as strings: exact decimals)."""
    budget = alert.budget
    return {
        "id": alert.pk,
        "kind": alert.kind,
        "metric": alert.metric,
        "threshold": plain(alert.threshold),
        "spent": plain(alert.spent),
        "limit": None if alert.limit is None else plain(alert.limit),
        "percent": None if alert.percent is None else f"{alert.percent:f}",
        "unit": "USD" if alert.metric == BudgetAlert.Metric.COST else "tokens",
        "period_start": alert.period_start.isoformat(),
        "message": alert.message,
        "created_at": alert.created_at.isoformat(),
        "budget": {
            "id": budget.pk,
            "name": budget.name,
            "scope": budget.scope,
            "scope_id": budget.scope_id,
            "team_id": budget.team_id,
            "project_id": budget.project_id,
            "period": budget.period,
            "enforcement": budget.enforcement,
        },
    }


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>"), as in X-Tokenmgr-Signature."""
    signed = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would re-send (or drop) the signed body elsewhere: treat it as a failure."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def _send_webhook(channel: AlertChannel, notice: Notice) -> None:
    if urlsplit(channel.target).scheme not in {"http", "https"}:
        raise DeliveryError("webhook target is not an http(s) URL", permanent=True)
    body = json.dumps(notice.payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(timezone.now().timestamp()))
    request = urllib.request.Request(
        channel.target,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "tokenmgr-alerts/1",
            "X-Tokenmgr-Timestamp": timestamp,
            "X-Tokenmgr-Signature": webhook_signature(channel.secret, timestamp, body),
        },
    )
    try:
        with _opener.open(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= code < 300:
        raise DeliveryError(f"HTTP {code}")


def _send_email(channel: AlertChannel, notice: Notice) -> None:
    lines = [notice.message, "", *notice.lines]
    try:
        send_mail(
            subject=f"[tokenmgr] {notice.message}"[:200],
            message="\n".join(lines),
            from_email=None,
            recipient_list=[channel.target],
        )
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc


Sender = Callable[[AlertChannel, Notice], None]
_SENDERS: dict[str, Sender] = {
    AlertChannel.Kind.EMAIL: _send_email,
    AlertChannel.Kind.WEBHOOK: _send_webhook,
}


def register_sender(kind: str, sender: Sender) -> None:
    """How alerts and notices reach a channel kind that another app provides (reporting: the
    live status feed, registered in ReportingConfig.ready())."""
    _SENDERS[kind] = sender


def _due(now: datetime) -> Q:
    return Q(status=AlertDelivery.Status.PENDING) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )


def alert_delivery_send(*, delivery_id: int, now: datetime | None = None) -> AlertDelivery | None:
    """Attempt one delivery if it is due; returns it, or None when it is not due (sent, failed,
    waiting for its retry, or being sent by another worker right now)."""
    now = now or timezone.now()
    # Claim by pushing next_attempt_at past a lease: of two concurrent senders only one updates.
    claimed = (
        AlertDelivery.objects.filter(_due(now), pk=delivery_id).update(
            next_attempt_at=now + CLAIM_LEASE
        )
        == 1
    )
    if not claimed:
        return None
    delivery = AlertDelivery.objects.select_related("alert__budget", "channel").get(pk=delivery_id)
    delivery.attempts += 1
    try:
        if not delivery.channel.is_active:
            raise DeliveryError("channel is deactivated", permanent=True)
        sender = _SENDERS.get(delivery.channel.kind)
        if sender is None:
            raise DeliveryError(f"no sender for {delivery.channel.kind} channels", permanent=True)
        sender(delivery.channel, Notice.of(delivery))
    except DeliveryError as exc:
        delivery.last_error = str(exc)[:500]
        if exc.permanent or delivery.attempts >= MAX_ATTEMPTS:
            delivery.status = AlertDelivery.Status.FAILED
            delivery.next_attempt_at = None
        else:
            backoff = RETRY_BASE_SECONDS * 2 ** (delivery.attempts - 1)
            delivery.next_attempt_at = now + timedelta(seconds=backoff)
        logger.warning("alert delivery %s failed: %s", delivery.pk, delivery.last_error)
    else:
        delivery.status = AlertDelivery.Status.SENT
        delivery.delivered_at = timezone.now()
        delivery.next_attempt_at = None
        delivery.last_error = ""
    delivery.save(
        update_fields=["status", "attempts", "last_error", "next_attempt_at", "delivered_at"]
    )
    return delivery


def alert_deliveries_send_due(*, now: datetime | None = None, limit: int = 500) -> int:
    """Send deliveries that are due (new ones whose task was lost, and retries); returns how many
    were sent successfully."""
    now = now or timezone.now()
    ids = list(
        AlertDelivery.objects.filter(_due(now))
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    deadline = time.monotonic() + SWEEP_TIME_BUDGET_SECONDS
    sent = 0
    for delivery_id in ids:
        if time.monotonic() > deadline:
            break
        delivery = alert_delivery_send(delivery_id=delivery_id, now=now)
        if delivery is not None and delivery.status == AlertDelivery.Status.SENT:
            sent += 1
    return sent
