"""Budget periods (SPEC §5): spend resets by window on its own; the period job archives closed
periods and announces the roll-over."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.alerts import alerts_evaluate, budget_periods_close
from budgets.models import Budget, BudgetAlert, BudgetPeriod, _calendar_window, period_window
from budgets.selectors import budget_status
from budgets.tasks import alert_deliveries_send_due
from budgets.tasks import budget_periods_close as budget_periods_close_task
from reporting.services import status_take
from tests.budgets.test_alerts import (  # noqa: F401 - _dollar_per_token is an autouse fixture
    _budget,
    _channel,
    _dollar_per_token,
    _spend,
)
from tests.conftest import Persona

pytestmark = pytest.mark.django_db
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def test_a_new_period_starts_at_zero_without_any_job_having_run(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "this-month", 60)
    next_month = budget.window_at(timezone.now()).end + HOUR

    assert budget_status(budget).cost_spent == 60
    fresh = budget_status(budget, now=next_month)
    assert (fresh.cost_spent, fresh.cost_percent, fresh.cost_remaining) == (0, 0, 100)
    assert not BudgetPeriod.objects.exists()


def test_the_period_job_archives_the_closed_period_and_announces_it(platform: Persona) -> None:
    _channel("status", "budget-feed")
    budget = _budget()
    _spend(platform, "closing", 60)
    period = budget.window_at(timezone.now())
    alerts_evaluate(budget_id=budget.pk, now=period.end - HOUR)

    assert budget_periods_close(now=period.end + HOUR) == 1

    archived = BudgetPeriod.objects.get(budget=budget)
    assert (archived.period_start, archived.period_end) == (period.start, period.end)
    assert (archived.cost_spent, archived.tokens_spent, archived.requests) == (60, 60, 1)
    assert archived.cost_limit == 100
    alert_deliveries_send_due.apply().get()
    feed = [m["message"] for m in status_take(100)]
    assert feed[1:] == [
        f"Team search monthly budget rolled over: the period from {period.start:%Y-%m-%d} "
        "closed at 60.00 USD of 100.00 USD",
        "Team search monthly budget back under 50 % of 100.00 USD: a new period started",
    ]


def test_the_period_job_is_idempotent(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "once", 60)
    after = budget.window_at(timezone.now()).end + HOUR

    assert budget_periods_close(now=after) == 1
    assert budget_periods_close(now=after) == 0
    assert budget_periods_close(now=after + HOUR) == 0
    assert BudgetPeriod.objects.count() == 1
    assert BudgetAlert.objects.filter(kind="rollover").count() == 1


def test_it_archives_every_period_the_budget_lived_through_while_the_job_was_down(
    platform: Persona,
) -> None:
    budget = _budget(cost_limit=Decimal(10), period="daily")
    today = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    Budget.objects.filter(pk=budget.pk).update(created_at=today - timedelta(days=3))
    _spend(platform, "two-days-ago", 7, occurred_at=(today - timedelta(days=2)).isoformat())

    assert budget_periods_close(now=today) == 3

    archived = BudgetPeriod.objects.filter(budget=budget).order_by("period_start")
    days = [(p.period_start.date(), p.cost_spent) for p in archived]
    assert days == [((today - timedelta(days=n)).date(), c) for n, c in ((3, 0), (2, 7), (1, 0))]
    # Only the period that has just ended is announced; older news would be stale.
    assert BudgetAlert.objects.filter(kind="rollover").count() == 1


def test_a_lifetime_budget_never_rolls_over(platform: Persona) -> None:
    budget = _budget(cost_limit=Decimal(100), period="lifetime")
    Budget.objects.filter(pk=budget.pk).update(created_at=timezone.now() - timedelta(days=400))
    _spend(platform, "forever", 60)

    assert budget_periods_close_task.apply().get() == 0
    assert budget_status(budget, now=timezone.now() + timedelta(days=90)).cost_spent == 60
    assert not BudgetPeriod.objects.exists()


BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        # 2026-03-29: Berlin moves from +01:00 to +02:00, a 23-hour day.
        ("daily", "2026-03-29T12:00+02:00", "2026-03-28T23:00Z", "2026-03-29T22:00Z"),
        ("weekly", "2026-03-29T12:00+02:00", "2026-03-22T23:00Z", "2026-03-29T22:00Z"),
        ("monthly", "2026-03-31T23:30+02:00", "2026-02-28T23:00Z", "2026-03-31T22:00Z"),
        ("monthly", "2026-12-31T23:59+01:00", "2026-11-30T23:00Z", "2026-12-31T23:00Z"),
        ("yearly", "2026-01-01T00:00+01:00", "2025-12-31T23:00Z", "2026-12-31T23:00Z"),
    ],
)
def test_periods_are_calendar_aligned_in_the_budgets_time_zone(
    period: str, at: str, start: str, end: str
) -> None:
    window = period_window(period, BERLIN, datetime.fromisoformat(at))
    expected = (datetime.fromisoformat(start), datetime.fromisoformat(end))
    assert (window.start, window.end) == expected


def test_the_remembered_window_is_only_reused_for_instants_inside_it() -> None:
    midnight = datetime.fromisoformat("2026-11-21T23:00Z")  # Berlin midnight
    for at in (midnight - MINUTE, midnight, midnight - MINUTE, midnight + 24 * HOUR - MINUTE):
        remembered = period_window("daily", BERLIN, at)
        assert remembered == _calendar_window("daily", BERLIN, at)
        assert remembered.start <= at < remembered.end
