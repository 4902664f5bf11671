"""Reads of the reporting app: who may watch a conversation, and the live dashboard's figures."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Max, Sum
from django.db.models.functions import TruncMinute
from django.urls import reverse
from django.utils import timezone

from budgets import counters
from budgets.deliveries import alert_payload
from budgets.models import Budget, BudgetAlert, BudgetOverride
from budgets.selectors import BudgetStatus, budget_burn, budget_status, plain
from reporting import services
from reporting.anomalies import anomaly_payload
from reporting.models import Anomaly
from reporting.publisher import usage_figures
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.principal import GLOBAL, Principal
from usage import pricing
from usage.models import TokenUsage
from usage.rows import ROW_INDEX
from usage.selectors import buffer_state, usage_for_principal, usage_summary

BUDGET_BARS = 12  # budgets shown on the dashboard: hard ones near their limit first
BUDGETS_CONSIDERED = 500  # active budgets whose utilisation is read to pick those
LATEST_ALERTS = 10
CHART_MINUTES = 60
ACTIVE_CONVERSATIONS = 50
ACTIVE_WITHIN = timedelta(hours=24)
# The pages are staff-only (pages.py checks the permission): they read what the organisation has.
_ORGANISATION = Principal(scope=GLOBAL, is_staff=True)


class _SeenConversations:
    """Conversations a scoped principal was admitted to in the last TTL seconds (usage in a
    scope is not taken back, short of retention), so a stream of status messages into one
    conversation asks the database once a minute, not once a message. Per process; bounded."""

    TTL = 60.0
    LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[tuple[str, str, str], float] = {}

    def add(self, principal: Principal, conversation_id: str) -> None:
        with self._lock:
            if len(self._until) >= self.LIMIT:
                self._until.clear()
            key = (principal.team_id, principal.project_id, conversation_id)
            self._until[key] = time.monotonic() + self.TTL

    def seen(self, principal: Principal, conversation_id: str) -> bool:
        until = self._until.get((principal.team_id, principal.project_id, conversation_id))
        return until is not None and until > time.monotonic()

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


seen_conversations = _SeenConversations()


def conversation_visible_to(principal: Principal, conversation_id: str) -> bool:
    """The one gate onto a conversation's live status, for publishing and for joining: global
    keys and staff see every conversation, a scoped key those with usage inside its scope."""
    if principal.is_global:
        return True
    if usage_for_principal(principal).filter(conversation_id=conversation_id).exists():
        seen_conversations.add(principal, conversation_id)
        return True
    return False


def conversation_recently_visible(principal: Principal, conversation_id: str) -> bool:
    """conversation_visible_to without the database: False means "ask it"."""
    return principal.is_global or seen_conversations.seen(principal, conversation_id)


# --- the live dashboard (staff) ------------------------------------------------------------------


def _percent(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def budget_bars(*, now: datetime | None = None, limit: int = BUDGET_BARS) -> list[dict[str, Any]]:
    """The active budgets' utilisation as GET /budgets/{id}/status reads it (budget_status), hard
    budgets first, each group nearest its limit first; the ones shown with their exhaustion
    date at the burn rate (budget_burn: one rollups query each at most)."""
    now = now or timezone.now()
    bars: list[dict[str, Any]] = []
    statuses: dict[int, tuple[Budget, BudgetStatus]] = {}
    for budget in Budget.objects.filter(is_active=True).order_by("pk")[:BUDGETS_CONSIDERED]:
        status = budget_status(budget, now=now)
        statuses[budget.pk] = (budget, status)
        shares = [p for p in (status.cost_percent, status.tokens_percent) if p is not None]
        bars.append(
            {
                "id": budget.pk,
                "name": budget.name,
                "scope": budget.scope,
                "scope_id": budget.scope_id,
                "enforcement": budget.enforcement,
                "percent": _percent(max(shares)) if shares else None,
                "cost_spent": pricing.money(status.cost_spent),
                "cost_limit": None
                if status.effective_cost_limit is None
                else pricing.money(status.effective_cost_limit),
                "tokens_spent": status.tokens_spent,
                "token_limit": status.effective_token_limit,
                "period_end": status.period_end.isoformat() if status.period_end else None,
                "url": reverse("admin:budgets_budget_change", args=[budget.pk]),
            }
        )
    bars.sort(key=lambda b: (b["enforcement"] != Budget.Enforcement.HARD, -(b["percent"] or 0.0)))
    shown = bars[:limit]
    for bar in shown:
        burn = budget_burn(*statuses[bar["id"]], now=now)
        bar["exhausts_at"] = burn.exhausts_at.isoformat() if burn.exhausts_at else None
        bar["exhausts_in_period"] = burn.exhausts_in_period
        bar["exhausts_by"] = burn.exhausts_by
        bar["burn_label"] = burn.rate_label
        bar["burn_window"] = burn.window_label
        bar["burn_spends"] = bool(burn.cost_units or burn.tokens)
        bar["unlimited"] = statuses[bar["id"]][1].unlimited_until is not None
    return shown


def _buffer() -> dict[str, Any]:
    if not tm_redis.configured():
        return {"mode": "direct", "depth": 0, "last_flush_at": None, "last_flush_count": None}
    try:
        state = buffer_state()
    except tm_redis.REDIS_ERRORS:
        return {"mode": "unreachable", "depth": None, "last_flush_at": None}
    return {"mode": "buffered", **state}


def dashboard_state(*, now: datetime | None = None) -> dict[str, Any]:
    """What the dashboard stream refreshes (at most about once a second): budget bars, pending
    overrides, the buffer and the status queue."""
    now = now or timezone.now()
    return {
        "at": now.isoformat(),
        "budgets": budget_bars(now=now),
        "overrides_pending": BudgetOverride.objects.filter(
            status=BudgetOverride.Status.PENDING, expires_at__gt=now
        ).count(),
        "buffer": _buffer(),
        "status_messages": {
            k: v
            for k, v in services.status_queue_stats().items()
            if k in ("queued", "dropped", "connected_clients")
        },
    }


def _buffered_rows_not_in_ledger() -> list[tuple[Any, ...]]:
    """Acknowledged usage still in the Redis buffer (the dashboard counts it as recorded: the
    stream's updates did, when it was accepted)."""
    if not tm_redis.configured():
        return []
    try:
        rows = counters.buffered_rows()
    except tm_redis.REDIS_ERRORS:
        return []
    return counters.not_in_ledger(rows)


def dashboard_snapshot(*, now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's figures on first load and after a reconnect: today's totals and the last
    hour's requests per minute (ledger plus buffer), the latest alerts, the open anomalies and
    `dashboard_state`."""
    now = now or timezone.now()
    tz = timezone.get_current_timezone()
    day_start = now.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    chart_start = (now - timedelta(minutes=CHART_MINUTES - 1)).replace(second=0, microsecond=0)
    # The buffer first: a row flushed in between is then in the ledger's answer, not lost.
    buffered = _buffered_rows_not_in_ledger()
    # The ledger's part as GET /usage/summary answers it (the organisation's view).
    [today] = usage_summary(principal=_ORGANISATION, params={"since": day_start.isoformat()})[
        "rows"
    ]
    totals: dict[str, Any] = {
        "requests": today["requests"],
        "input_tokens": today["input_tokens"],
        "output_tokens": today["output_tokens"],
        "cost": Decimal(today["cost"]),
        "errors": today["errors"],
    }
    per_minute: dict[str, int] = {}
    minute_rows = (
        TokenUsage.objects.filter(occurred_at__gte=chart_start)
        .annotate(minute=TruncMinute("occurred_at", tzinfo=tz))
        .values("minute")
        .annotate(n=Count("id"))
    )
    for item in minute_rows:
        key = item["minute"].astimezone(tz).strftime("%Y-%m-%dT%H:%M")
        per_minute[key] = per_minute.get(key, 0) + item["n"]
    # The buffer's rows, summed as the stream sums new ones. Keys are local ISO dates and
    # minutes, so "on or after" is a string comparison.
    buffered_days, buffered_minutes = usage_figures(buffered)
    today_key = day_start.date().isoformat()
    chart_key = chart_start.astimezone(tz).strftime("%Y-%m-%dT%H:%M")
    for day, sums in buffered_days.items():
        if day >= today_key:
            for name in totals:
                totals[name] += sums[name]
    for minute, n in buffered_minutes.items():
        if minute >= chart_key:
            per_minute[minute] = per_minute.get(minute, 0) + n
    alerts = BudgetAlert.objects.select_related("budget").order_by("-pk")[:LATEST_ALERTS]
    open_anomalies = Anomaly.objects.filter(status=Anomaly.Status.OPEN).order_by(
        "-bucket", "-score"
    )[:LATEST_ALERTS]
    return {
        "day": day_start.date().isoformat(),
        "today": {**totals, "cost": plain(totals["cost"])},
        "currency": pricing.CURRENCY,
        "minutes": per_minute,
        "chart_minutes": CHART_MINUTES,
        "alerts": [alert_payload(alert) for alert in alerts],
        "anomalies": [anomaly_payload(row) for row in open_anomalies],
        **dashboard_state(now=now),
    }


def active_conversations(*, now: datetime | None = None) -> list[dict[str, Any]]:
    """Conversations with usage in the last day (ledger plus buffer), most recent first, with
    their totals."""
    now = now or timezone.now()
    since = now - ACTIVE_WITHIN
    buffered = _buffered_rows_not_in_ledger()
    rows: Any = (
        TokenUsage.objects.filter(occurred_at__gte=since)
        .exclude(conversation_id="")
        .values("conversation_id")
        .annotate(
            last_at=Max("occurred_at"),
            requests=Count("id"),
            cost=Sum("cost"),
            teams=Count("team_id", distinct=True),
        )
        .order_by("-last_at")[:ACTIVE_CONVERSATIONS]
    )
    found: dict[str, dict[str, Any]] = {
        row["conversation_id"]: {**row, "cost": row["cost"] or Decimal(0), "team_ids": None}
        for row in rows
    }
    i = ROW_INDEX
    for row in buffered:
        conversation_id, occurred = row[i["conversation_id"]], row[i["occurred_at"]]
        if not conversation_id or occurred < since:
            continue
        item = found.setdefault(
            conversation_id,
            {
                "conversation_id": conversation_id,
                "last_at": occurred,
                "requests": 0,
                "cost": Decimal(0),
                "teams": 0,
                "team_ids": set(),
            },
        )
        item["last_at"] = max(item["last_at"], occurred)
        item["requests"] += 1
        item["cost"] += row[i["cost"]] or 0
        if item["team_ids"] is not None:
            item["team_ids"].add(row[i["team_id"]])
            item["teams"] = len(item["team_ids"])
    ordered = sorted(found.values(), key=lambda c: c["last_at"], reverse=True)
    return [
        {
            "conversation_id": c["conversation_id"],
            "last_at": c["last_at"],
            "requests": c["requests"],
            "cost": pricing.money(c["cost"]),
            "teams": c["teams"],
        }
        for c in ordered[:ACTIVE_CONVERSATIONS]
    ]
