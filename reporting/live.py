"""The project's own events onto the live feeds (issue 10): receivers of the usage and budgets
signals, connected in ReportingConfig.ready(). Each one only hands its news to the process's
publisher (reporting.publisher), which never blocks.

- usage recorded → a `usage` message in the event's conversation (in the usage's scope) and the
  dashboard's figures;
- alert fired (threshold crossed, exhausted, resolved, rolled over, burn rate) → the dashboard;
- override requested / approved / rejected → the dashboard;
- buffer flushed → the dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.dispatch import receiver

from budgets import deliveries, signals
from budgets.models import BudgetAlert, BudgetOverride
from reporting.publisher import publisher
from usage import hooks
from usage.rows import Row


@receiver(hooks.usage_stored, dispatch_uid="reporting.live.usage")
def _usage_recorded(rows: Sequence[Row] = (), **_kwargs: Any) -> None:
    if rows:
        publisher.usage(rows)


@receiver(hooks.usage_flushed, dispatch_uid="reporting.live.flush")
def _buffer_flushed(inserted: int, dead: int, at: str, **_kwargs: Any) -> None:
    publisher.dashboard("flush", inserted=inserted, dead=dead, flushed_at=at)


@receiver(signals.alerts_created, dispatch_uid="reporting.live.alerts")
def _alerts_fired(alerts: Sequence[BudgetAlert], **_kwargs: Any) -> None:
    for alert in alerts:
        publisher.dashboard("alert", alert=deliveries.alert_payload(alert))


@receiver(signals.override_changed, dispatch_uid="reporting.live.overrides")
def _override_changed(override: BudgetOverride, change: str, **_kwargs: Any) -> None:
    publisher.dashboard(
        "override",
        change=change,
        override={
            "id": override.pk,
            "budget_id": override.budget_id,
            "status": override.status,
            "reason": override.reason[:300],
        },
    )
