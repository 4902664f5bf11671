"""Agent runs read from the ledger (`manage.py token budget` and `token cost`).

A run is what the agent token guard counts against a profile's per-run budget: the ledger rows
of one agent with one workflow_id (budgets.guard.run_tokens_used). Rollups carry no workflow_id,
so these reads are the raw ledger's, over a bounded range.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db.models import CharField, Count, Max, Min, Q, Sum, Value
from django.db.models.functions import Cast, Concat, Length

from budgets.guard import DEFAULT_WARNING_PERCENT, budget_context
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.pricing import LEDGER_QUANTUM, money
from usage.selectors import usage_for_principal


def agent_runs(
    principal: Principal,
    *,
    agent: str,
    token_budget: int,
    warning_threshold: int | None,
    since: datetime,
    until: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    """The agent's `limit` most recently active runs in [since, until), newest first: tokens
    used against its profile's per-run budget (and warning threshold; None: the guard's
    default), percent, remaining and state. Only what the ledger holds: usage still in the
    Redis buffer (seconds old) is not counted here."""
    rows = (
        usage_for_principal(principal)
        .filter(agent=agent, occurred_at__gte=since, occurred_at__lt=until)
        .exclude(workflow_id="")
        .values("workflow_id")
        .annotate(
            requests=Count("id"),
            tokens=Sum("total_tokens"),
            cost=Sum("cost"),
            first=Min("occurred_at"),
            last=Max("occurred_at"),
        )
        .order_by("-last", "workflow_id")[:limit]
    )
    budget = token_budget
    threshold = warning_threshold or budget * DEFAULT_WARNING_PERCENT // 100
    out = []
    for row in rows:
        used = int(row["tokens"] or 0)
        context = budget_context(budget=budget, warning_threshold=threshold, used=used, this_call=0)
        if used > budget:
            state = "over"
        elif used > threshold:
            state = "warning"
        else:
            state = "ok"
        out.append(
            {
                "run_id": row["workflow_id"],
                "requests": row["requests"],
                "tokens": used,
                "token_budget": budget,
                "percent": f"{context.percent:.2f}",
                "remaining": context.remaining,
                "state": state,
                "cost": money(row["cost"]),
                "first_activity": row["first"].isoformat(),
                "last_activity": row["last"].isoformat(),
            }
        )
    return out


@dataclass(frozen=True, slots=True)
class Executions:
    runs: int  # distinct (agent, workflow_id) runs
    lone_requests: int  # requests outside any run (no workflow_id): each its own execution

    @property
    def total(self) -> int:
        return self.runs + self.lone_requests

    @property
    def basis(self) -> str:
        if self.runs and self.lone_requests:
            return "runs+requests"
        return "runs" if self.runs else "requests"

    def cost_per(self, cost: str) -> str | None:
        """`cost` (Decimal text) divided by the executions, at the ledger's scale."""
        if not self.total:
            return None
        return money((Decimal(cost) / self.total).quantize(LEDGER_QUANTUM, ROUND_HALF_UP))


# Count(distinct) over two columns: one text per run, agent length-prefixed so that no two
# (agent, workflow_id) pairs can spell the same text.
_RUN_KEY = Concat(
    Cast(Length("agent"), CharField()), Value(":"), "agent", Value("/"), "workflow_id"
)


def executions_by(
    principal: Principal,
    *,
    dimension: str,
    filters: dict[str, str],
    since: datetime,
    until: datetime,
) -> tuple[dict[str, Executions], Executions] | None:
    """Per value of `dimension` (a ledger column), and over all of them, the runs and the
    requests outside runs in [since, until) matching `filters`: the total is counted apart,
    since one run can span groups (two models). None when retention deleted raw usage inside
    the range: the ledger can no longer count them."""
    cutoff = rollups.purged_before()
    if cutoff is not None and since < cutoff:
        return None
    rows = usage_for_principal(principal).filter(
        occurred_at__gte=since, occurred_at__lt=until, **filters
    )
    counts = {
        "runs": Count(_RUN_KEY, distinct=True, filter=~Q(workflow_id="")),
        "lone": Count("id", filter=Q(workflow_id="")),
    }
    groups = rows.values(dimension).annotate(**counts).order_by(dimension)
    total = rows.aggregate(**counts)
    return (
        {row[dimension]: Executions(row["runs"], row["lone"]) for row in groups},
        Executions(total["runs"], total["lone"]),
    )
