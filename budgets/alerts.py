"""Budget alerts (SPEC §5): evaluation and period roll-over.

Every alert is a `BudgetAlert` row whose unique constraint (budget, period, kind, metric,
threshold) is the "fires at most once per period" rule: concurrent evaluators race on the insert
and the loser's savepoint rolls back. Each new alert is handed to budgets.deliveries, which
delivers it through the alert channels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import partial

from django.db import IntegrityError, transaction
from django.utils import timezone

from budgets import signals
from budgets.deliveries import alert_deliveries_create
from budgets.models import Budget, BudgetAlert, BudgetPeriod, Window
from budgets.selectors import (
    BudgetStatus,
    budget_status,
    effective_limits,
    ledger_spend,
    plain,
)
from tokenmgr_project.core import redis as tm_redis
from usage.services import manager_config

logger = logging.getLogger(__name__)

Kind = BudgetAlert.Kind
Metric = BudgetAlert.Metric

EXHAUSTED = Decimal(100)
# Burn-rate projections are noise early in a period: wait for this share of it, and this long.
BURN_MIN_SHARE = 0.05
BURN_MIN_ELAPSED = timedelta(minutes=10)
# BudgetAlert.percent is DecimalField(max_digits=9, decimal_places=2).
PERCENT_CAP = Decimal("9999999.99")

# Ingestion asks for evaluation at most once per budget per this interval, and the evaluation
# runs at the end of it, so it sees every event of the burst that triggered it.
EVALUATE_SOON_SECONDS = 1.0

# Only periods that ended within this window are archived by budget_periods_close.
ARCHIVE_LOOKBACK = timedelta(days=35)
# A closed period is archived only after buffered usage for it had time to reach the ledger.
CLOSE_GRACE_MIN = timedelta(minutes=5)


# --- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reading:
    """One metric of a budget's status: what the rules below compare."""

    metric: str
    spent: Decimal
    limit: Decimal | None  # the effective limit; None when unlimited by an override
    base_limit: Decimal | None  # the budget's own limit; None: no limit of this kind
    projected: Decimal | None

    @property
    def percent(self) -> Decimal:
        if self.limit is None:
            return Decimal(0)
        return self.spent * 100 / self.limit


def _readings(status: BudgetStatus) -> list[_Reading]:
    readings = []
    if status.cost_limit is not None:
        readings.append(
            _Reading(
                Metric.COST,
                status.cost_spent,
                status.effective_cost_limit,
                status.cost_limit,
                status.projected_cost,
            )
        )
    if status.token_limit is not None:
        readings.append(
            _Reading(
                Metric.TOKENS,
                Decimal(status.tokens_spent),
                _dec(status.effective_token_limit),
                Decimal(status.token_limit),
                _dec(status.projected_tokens),
            )
        )
    return readings


def alerts_evaluate(*, budget_id: int, now: datetime | None = None) -> list[BudgetAlert]:
    """Fire the alerts the budget's current spend calls for; returns the ones created now.

    Idempotent: an alert that exists for this period is never created again, also when several
    evaluators run at once. Percentages are of spend (reservations are not spend) against the
    effective limit (overrides included).
    """
    now = now or timezone.now()
    budget = Budget.objects.filter(pk=budget_id, is_active=True).first()
    if budget is None:
        return []
    thresholds = sorted(budget.thresholds.values_list("percent", flat=True))
    status = budget_status(budget, now=now)
    existing = set(
        BudgetAlert.objects.filter(budget=budget, period_start=status.period_start).values_list(
            "kind", "metric", "threshold"
        )
    )
    candidates: list[BudgetAlert] = []
    for reading in _readings(status):
        candidates.extend(
            _due_alerts(
                budget,
                status=status,
                reading=reading,
                thresholds=thresholds,
                existing=existing,
                now=now,
            )
        )
    if not candidates:
        return []
    with transaction.atomic():
        created = [alert for alert in candidates if _insert_once(alert)]
        alert_deliveries_create(created)
    return created


def _due_alerts(
    budget: Budget,
    *,
    status: BudgetStatus,
    reading: _Reading,
    thresholds: Sequence[Decimal],
    existing: set[tuple[str, str, Decimal]],
    now: datetime,
) -> list[BudgetAlert]:
    percent = reading.percent
    due: list[BudgetAlert] = []

    def add(kind: str, threshold: Decimal, message: str) -> None:
        if (kind, reading.metric, threshold) not in existing:
            due.append(
                _alert(budget, status.period_start, kind, reading, threshold, message=message)
            )

    if reading.limit is not None:
        for threshold in thresholds:
            if percent >= threshold:
                add(Kind.THRESHOLD, threshold, _threshold_message(budget, reading, threshold))
        if percent >= EXHAUSTED:
            add(Kind.EXHAUSTED, EXHAUSTED, _exhausted_message(budget, reading))
    fired = {
        threshold
        for kind, metric, threshold in existing
        if kind in (Kind.THRESHOLD, Kind.EXHAUSTED) and metric == reading.metric
    }
    for threshold in sorted(fired):
        if percent < threshold:
            add(Kind.RESOLVED, threshold, _resolved_message(budget, reading, threshold))
    projected = _projection(budget, status, reading, now)
    if (
        projected is not None
        and reading.limit is not None
        and percent < EXHAUSTED
        and projected > reading.limit
    ):
        add(Kind.BURN_RATE, Decimal(0), _burn_message(budget, reading, projected))
    return due


def _projection(
    budget: Budget, status: BudgetStatus, reading: _Reading, now: datetime
) -> Decimal | None:
    """Projected period-end spend, or None while it would be noise (or for lifetime budgets)."""
    if budget.period == Budget.Period.LIFETIME or status.period_end is None:
        return None
    length = status.period_end - status.period_start
    elapsed = now - status.period_start
    if elapsed < BURN_MIN_ELAPSED or elapsed < length * BURN_MIN_SHARE:
        return None
    if reading.projected is not None:
        return reading.projected
    return reading.spent * Decimal(length / elapsed)


def _alert(
    budget: Budget,
    period_start: datetime,
    kind: str,
    reading: _Reading,
    threshold: Decimal,
    *,
    message: str,
) -> BudgetAlert:
    percent = None if reading.limit is None else min(_q(reading.percent), PERCENT_CAP)
    return BudgetAlert(
        budget=budget,
        period_start=period_start,
        kind=kind,
        metric=reading.metric,
        threshold=threshold,
        spent=reading.spent,
        limit=reading.limit,
        percent=percent,
        message=message[:500],
    )


def _insert_once(alert: BudgetAlert) -> bool:
    """Insert unless an equal alert exists (another evaluator won the race)."""
    try:
        with transaction.atomic():
            alert.save(force_insert=True)
    except IntegrityError:
        return False
    return True


# --- messages ------------------------------------------------------------------------------------


def _dec(value: int | Decimal | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _q(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), ROUND_HALF_UP)


def _amount(metric: str, value: Decimal | None) -> str:
    if value is None:
        return "no limit"
    if metric == Metric.COST:
        return f"{_q(value):,.2f} USD"
    return f"{int(value):,} tokens"


def _used(reading: _Reading) -> str:
    verb = "spent" if reading.metric == Metric.COST else "used"
    return f"{_amount(reading.metric, reading.spent)} {verb}"


def _title(budget: Budget) -> str:
    return f"{budget.name} {budget.period} budget"


def _threshold_message(budget: Budget, reading: _Reading, threshold: Decimal) -> str:
    limit = _amount(reading.metric, reading.limit)
    return f"{_title(budget)} at {plain(threshold)} % of {limit} ({_used(reading)})"


def _exhausted_message(budget: Budget, reading: _Reading) -> str:
    limit = _amount(reading.metric, reading.limit)
    return f"{_title(budget)} exhausted: 100 % of {limit} ({_used(reading)})"


def _resolved_message(budget: Budget, reading: _Reading, threshold: Decimal) -> str:
    if reading.limit is None:
        return f"{_title(budget)} back under {plain(threshold)} %: unlimited by an override"
    limit = _amount(reading.metric, reading.limit)
    return f"{_title(budget)} back under {plain(threshold)} % of {limit} ({_used(reading)})"


def _burn_message(budget: Budget, reading: _Reading, projected: Decimal) -> str:
    return (
        f"{_title(budget)} on pace for {_amount(reading.metric, projected)} by period end, over "
        f"its {_amount(reading.metric, reading.limit)} limit ({_used(reading)})"
    )


# --- ingestion hook ------------------------------------------------------------------------------

_soon_lock = threading.Lock()
_soon_last: dict[int, float] = {}


def alerts_evaluate_soon(budget_ids: Iterable[int]) -> None:
    """Ask for an evaluation of these budgets about a second from now (after commit).

    Cheap enough for every accepted usage event: one Redis round trip (or a dict lookup without
    Redis) and at most one Celery message per budget per EVALUATE_SOON_SECONDS. A lost request
    is harmless: the beat evaluates every budget every minute.
    """
    ids = sorted(set(budget_ids))
    if not ids:
        return
    due = _claim_evaluations(ids)
    if due:
        transaction.on_commit(partial(_enqueue_evaluations, due))


def _claim_evaluations(ids: list[int]) -> list[int]:
    now = time.monotonic()
    with _soon_lock:
        # Asked (by this process or, as Redis said, another) within the interval: nothing to do,
        # and no Redis round trip on the ingestion path.
        fresh = [i for i in ids if now - _soon_last.get(i, float("-inf")) >= EVALUATE_SOON_SECONDS]
        for budget_id in fresh:
            _soon_last[budget_id] = now
        if len(_soon_last) > 10_000:  # forget old entries so the dict cannot grow without end
            for budget_id, at in list(_soon_last.items()):
                if now - at >= EVALUATE_SOON_SECONDS:
                    del _soon_last[budget_id]
    if not fresh or not tm_redis.available():
        return fresh
    try:
        with tm_redis.client().pipeline(transaction=False) as pipe:
            for budget_id in fresh:
                pipe.set(
                    tm_redis.key("alerts", "soon", str(budget_id)),
                    "1",
                    nx=True,
                    px=int(EVALUATE_SOON_SECONDS * 1000),
                )
            replies = pipe.execute()
    except tm_redis.REDIS_ERRORS:
        tm_redis.trip()
        return fresh
    return [budget_id for budget_id, ok in zip(fresh, replies, strict=True) if ok]


def _enqueue_evaluations(budget_ids: list[int]) -> None:
    if tm_redis.configured() and not tm_redis.available():
        return  # the broker is this Redis and it just failed: the beat will catch up
    signals.evaluations_wanted.send(sender=Budget, budget_ids=budget_ids)


def alerts_evaluate_all(*, now: datetime | None = None) -> int:
    """Evaluate every active budget; returns the number of alerts created."""
    created = 0
    for budget_id in Budget.objects.filter(is_active=True).values_list("pk", flat=True):
        try:
            created += len(alerts_evaluate(budget_id=budget_id, now=now))
        except Exception:
            logger.exception("alert evaluation failed for budget %s", budget_id)
    return created


# --- period roll-over ----------------------------------------------------------------------------


def _closed_windows(budget: Budget, *, now: datetime, grace: timedelta) -> list[Window]:
    """Periods that ended (more than `grace` ago) within ARCHIVE_LOOKBACK while the budget
    existed, newest first."""
    cutoff = max(budget.created_at, now - ARCHIVE_LOOKBACK)
    windows: list[Window] = []
    window = budget.window_at(now)
    while True:
        window = budget.window_at(window.start - timedelta(microseconds=1))
        if window.end <= cutoff:
            return windows
        if window.end + grace <= now:
            windows.append(window)


def budget_periods_close(*, now: datetime | None = None) -> int:
    """Archive every closed period of every active budget not archived yet; returns how many.

    Idempotent (BudgetPeriod is unique per budget and period start). The period that has just
    ended is announced with a `rollover` alert and `resolved` alerts for the thresholds it fired;
    older periods found unarchived (the job was down) are archived silently, as news of them
    would be stale.
    """
    now = now or timezone.now()
    grace = max(CLOSE_GRACE_MIN, timedelta(seconds=2 * manager_config().flush_interval))
    budgets = list(Budget.objects.filter(is_active=True).exclude(period=Budget.Period.LIFETIME))
    archived = set(
        BudgetPeriod.objects.filter(
            budget__in=budgets, period_end__gt=now - ARCHIVE_LOOKBACK
        ).values_list("budget_id", "period_start")
    )
    closed = 0
    for budget in budgets:
        latest = budget.window_at(now).start
        for window in _closed_windows(budget, now=now, grace=grace):
            if (budget.pk, window.start) in archived:
                continue
            if _period_archive(budget, window, announce=window.end == latest, now=now):
                closed += 1
    return closed


def _period_archive(budget: Budget, window: Window, *, announce: bool, now: datetime) -> bool:
    spend = ledger_spend(budget, window)
    limits = effective_limits(budget, now=window.end - timedelta(microseconds=1))
    with transaction.atomic():
        try:
            with transaction.atomic():
                period = BudgetPeriod.objects.create(
                    budget=budget,
                    period_start=window.start,
                    period_end=window.end,
                    cost_spent=spend.cost,
                    tokens_spent=spend.tokens,
                    requests=spend.requests,
                    cost_limit=limits.cost,
                    token_limit=limits.tokens,
                    closed_at=now,
                )
        except IntegrityError:
            return False  # another run archived it first
        if announce:
            alerts = [_rollover_alert(budget, period), *_rollover_resolved(budget, period)]
            alert_deliveries_create([alert for alert in alerts if _insert_once(alert)])
    return True


def _period_readings(budget: Budget, period: BudgetPeriod) -> list[_Reading]:
    readings = []
    if budget.cost_limit is not None:
        readings.append(
            _Reading(Metric.COST, period.cost_spent, period.cost_limit, budget.cost_limit, None)
        )
    if budget.token_limit is not None:
        readings.append(
            _Reading(
                Metric.TOKENS,
                Decimal(period.tokens_spent),
                _dec(period.token_limit),
                Decimal(budget.token_limit),
                None,
            )
        )
    return readings


def _rollover_alert(budget: Budget, period: BudgetPeriod) -> BudgetAlert:
    readings = _period_readings(budget, period)
    closed_at = ", ".join(
        f"{_amount(r.metric, r.spent)} "
        + ("(unlimited)" if r.limit is None else f"of {_amount(r.metric, r.limit)}")
        for r in readings
    )
    label = f"{period.period_start.astimezone(budget.tz):%Y-%m-%d}"
    message = f"{_title(budget)} rolled over: the period from {label} closed at {closed_at}"
    return _alert(
        budget, period.period_start, Kind.ROLLOVER, readings[0], Decimal(0), message=message
    )


def _rollover_resolved(budget: Budget, period: BudgetPeriod) -> list[BudgetAlert]:
    """`resolved` for each threshold the closed period fired: the new period starts under it."""
    fired = BudgetAlert.objects.filter(
        budget=budget, period_start=period.period_start, kind__in=[Kind.THRESHOLD, Kind.EXHAUSTED]
    ).values_list("metric", "threshold")
    already = set(
        BudgetAlert.objects.filter(
            budget=budget, period_start=period.period_start, kind=Kind.RESOLVED
        ).values_list("metric", "threshold")
    )
    readings = {r.metric: r for r in _period_readings(budget, period)}
    alerts = []
    for metric, threshold in sorted(set(fired) - already):
        reading = readings.get(metric)
        if reading is None:
            continue
        message = (
            f"{_title(budget)} back under {plain(threshold)} % of "
            f"{_amount(metric, reading.limit)}: a new period started"
        )
        alerts.append(
            _alert(budget, period.period_start, Kind.RESOLVED, reading, threshold, message=message)
        )
    return alerts
