"""Budget kinds, from the archived periods of active budgets: budget_exhausted_early and
budget_underused, control recommendations with no money saving of their own."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db.models import F
from django.db.models import Window as Over
from django.db.models.functions import RowNumber

from budgets.models import Budget, BudgetAlert, BudgetPeriod
from budgets.selectors import budgets_for_principal
from reporting.opportunities.common import (
    CENT,
    EARLY_OF,
    EARLY_PERIODS,
    EARLY_SHARE,
    MIN_PERIODS,
    PERIODS_LOOKED_AT,
    UNDERUSED_SHARE,
    Opportunity,
    Window,
)
from tokenmgr_project.core.principal import Principal
from usage import pricing


def _used_share(period: BudgetPeriod) -> Decimal | None:
    """The larger share of its limits a closed period used (None: no limit recorded)."""
    shares = []
    if period.cost_limit:
        shares.append(period.cost_spent / period.cost_limit)
    if period.token_limit:
        shares.append(Decimal(period.tokens_spent) / period.token_limit)
    return max(shares) if shares else None


def budget_periods(
    principal: Principal, until: datetime
) -> dict[int, tuple[Budget, list[BudgetPeriod], dict[datetime, datetime]]]:
    """Each visible active budget's last PERIODS_LOOKED_AT periods closed by `until` (newest
    first), with when each was exhausted (its first exhausted alert)."""
    visible = budgets_for_principal(principal).filter(is_active=True)
    periods = list(
        BudgetPeriod.objects.filter(budget__in=visible, period_end__lte=until)
        .annotate(
            n=Over(RowNumber(), partition_by=[F("budget_id")], order_by=F("period_start").desc())
        )
        .filter(n__lte=PERIODS_LOOKED_AT)
        .select_related("budget")
        .order_by("budget_id", "-period_start")
    )
    out: dict[int, tuple[Budget, list[BudgetPeriod], dict[datetime, datetime]]] = {}
    for period in periods:
        out.setdefault(period.budget_id, (period.budget, [], {}))[1].append(period)
    starts = {p.period_start for _b, ps, _e in out.values() for p in ps}
    alerts = BudgetAlert.objects.filter(
        budget_id__in=list(out), kind=BudgetAlert.Kind.EXHAUSTED, period_start__in=list(starts)
    ).values_list("budget_id", "period_start", "created_at")
    for budget_id, start, at in alerts:
        exhausted = out[budget_id][2]
        if start not in exhausted or at < exhausted[start]:
            exhausted[start] = at
    return out


def _period_row(period: BudgetPeriod, exhausted_at: datetime | None) -> dict[str, Any]:
    share = _used_share(period)
    length = (period.period_end - period.period_start).total_seconds()
    row: dict[str, Any] = {
        "period_start": period.period_start.isoformat(),
        "period_end": period.period_end.isoformat(),
        "cost_spent": pricing.money(period.cost_spent),
        "cost_limit": pricing.money(period.cost_limit) if period.cost_limit is not None else None,
        "tokens_spent": period.tokens_spent,
        "token_limit": period.token_limit,
        "used": f"{share * 100:.1f}%" if share is not None else None,
    }
    if exhausted_at is not None:
        elapsed = Decimal((exhausted_at - period.period_start).total_seconds()) / Decimal(length)
        row["exhausted_at"] = exhausted_at.isoformat()
        row["exhausted_after"] = f"{min(elapsed, Decimal(1)) * 100:.1f}% of the period"
    return row


def budget_recommendations(principal: Principal, until: datetime) -> list[Opportunity]:
    out = []
    for budget, periods, exhausted in budget_periods(principal, until).values():
        if len(periods) < MIN_PERIODS:
            continue
        item = _exhausted_early(budget, periods[:EARLY_OF], exhausted) or _underused(
            budget, periods, exhausted
        )
        if item is not None:
            item.saves_money = False
            item.value = str(budget.pk)
            item.team_id, item.project_id = budget.team_id, budget.project_id
            out.append(item)
    return out


def _budget_evidence(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> dict[str, Any]:
    return {
        "budget_id": budget.pk,
        "budget": budget.name,
        "scope": budget.scope if not budget.scope_id else f"{budget.scope} {budget.scope_id}",
        "period": budget.period,
        "periods_looked_at": len(looked),
        "periods": [_period_row(p, exhausted.get(p.period_start)) for p in looked],
        "money": "none: a control recommendation (the limit changes, not the spend)",
    }


def _budget_window(looked: list[BudgetPeriod]) -> Window:
    return Window(looked[-1].period_start, looked[0].period_end, None, "budget periods")


def _exhausted_early(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> Opportunity | None:
    """Ran out before EARLY_SHARE of the period in >= EARLY_PERIODS of the last EARLY_OF."""
    early = 0
    for p in looked:
        at = exhausted.get(p.period_start)
        length = Decimal((p.period_end - p.period_start).total_seconds())
        if at is not None and Decimal((at - p.period_start).total_seconds()) < EARLY_SHARE * length:
            early += 1
    if early < EARLY_PERIODS:
        return None
    median = sorted(p.cost_spent for p in looked)[len(looked) // 2]
    return Opportunity(
        kind="budget_exhausted_early",
        dimension="budget",
        target=f"budget #{budget.pk}",
        savings=Decimal(0),
        requests=sum(p.requests for p in looked),
        action=(
            f"Raise the limit of {budget.name!r} (median spend of a period: "
            f"{pricing.money(median)}) or cut its usage (see its other recommendations): it ran "
            f"out before {EARLY_SHARE * 100:.0f} % of the period in {early} of the last "
            f"{len(looked)} periods."
        ),
        evidence={**_budget_evidence(budget, looked, exhausted), "exhausted_early": early},
        window=_budget_window(looked),
        confidence="high" if early == len(looked) == EARLY_OF else "medium",
    )


def _underused(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> Opportunity | None:
    """Used less than UNDERUSED_SHARE of its limits in every one of >= MIN_PERIODS periods."""
    shares = [_used_share(p) for p in looked]
    if len(looked) < MIN_PERIODS or any(s is None or s >= UNDERUSED_SHARE for s in shares):
        return None
    largest = max(s for s in shares if s is not None)
    suggested = []
    if budget.cost_limit is not None:
        peak = max(p.cost_spent for p in looked)
        suggested.append(f"cost {pricing.money((peak * 2).quantize(CENT, ROUND_HALF_UP))}")
    if budget.token_limit is not None:
        suggested.append(f"{max(p.tokens_spent for p in looked) * 2:,} tokens")
    return Opportunity(
        kind="budget_underused",
        dimension="budget",
        target=f"budget #{budget.pk}",
        savings=Decimal(0),
        requests=sum(p.requests for p in looked),
        action=(
            f"Lower the limit of {budget.name!r} to about {' and '.join(suggested)} (twice the "
            f"largest period): it never used {UNDERUSED_SHARE * 100:.0f} % of it in the last "
            f"{len(looked)} periods, so it would not stop a runaway early."
        ),
        evidence={
            **_budget_evidence(budget, looked, exhausted),
            "largest_share_used": f"{largest * 100:.1f}%",
        },
        window=_budget_window(looked),
        confidence="high" if len(looked) >= PERIODS_LOOKED_AT else "medium",
    )
