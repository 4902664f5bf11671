"""Usage, cost and optimization reports (SPEC §7): what a team lead reads on Monday and finance
exports at month end. Every figure comes from usage.rollups (hourly rollups; the raw ledger only
for what they cannot answer), so a report agrees with the ledger to the unit.

A report is a dict: `columns` + `rows` (the main table: one row per group, what CSV holds), and
sections (`totals`, `top_consumers`, `unpriced`, …) that JSON and Markdown show too. Every value
is already what the API shows (money as Decimal text, ratios to 4 places), so the three formats
carry the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from django.utils import timezone
from pydantic import ConfigDict, Field

from budgets.models import Budget
from budgets.selectors import budget_status, budgets_for_principal
from reporting import opportunities, recommendations
from reporting.params import Filters, QueryInt
from tokenmgr_project.core.actions import validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.pricing import money
from usage.selectors import aggregate_for, parse_range, parse_tz

KINDS = ("usage", "cost", "optimization")
DIMENSIONS = rollups.FINE_DIMENSIONS
# Friendlier names accepted for the dimensions (the CLI's --by team, ?group_by=team).
ALIASES = {"team": "team_id", "project": "project_id", "user": "user_id"}
DEFAULT_RANGE = timedelta(days=30)
DEFAULT_TOP_BY = ("team_id", "project_id", "model")
MAX_GROUPS = 50_000
MAX_TOP = 100
MAX_BUDGETS = 500
RATIO = Decimal("0.0001")
MEASURE_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "total_tokens",
    "cost",
    "errors",
    "unpriced_requests",
    "unpriced_tokens",
    "estimated_requests",
    "estimated_cost",
)
EFFICIENCY_COLUMNS = (
    "output_input_ratio",
    "cost_per_1k_tokens",
    "cache_hit_share",
    "error_share",
    "avg_latency_ms",
)


class ReportIn(Filters):
    """A report's parameters (query string or /signals data); every name is checked."""

    model_config = ConfigDict(extra="forbid")

    report: Literal["usage", "cost", "optimization"] = "usage"
    since: str | None = Field(None, description="ISO 8601; default: 30 days before until.")
    until: str | None = Field(None, description="ISO 8601; default: now.")
    tz: str | None = Field(None, description="IANA time zone of days, weeks and months.")
    group_by: str | list[str] | None = Field(None, description="Comma-separated dimensions.")
    interval: Literal["hour", "day", "week", "month"] | None = None
    top: QueryInt = Field(10, ge=1, le=MAX_TOP, description="Rows per top-consumers table.")
    top_by: str | list[str] | None = Field(None, description="Dimensions of the top tables.")


class Query:
    """A report's validated parameters: range, time zone, dimensions, filters and scope."""

    def __init__(self, principal: Principal, data: Any, *, kind: str | None = None) -> None:
        data = dict(data) if isinstance(data, dict) else data
        if isinstance(data, dict) and kind is not None:
            data.setdefault("report", kind)
        params = validate(ReportIn, data)
        self.principal = principal
        self.kind = params.report
        since, until = parse_range({"since": params.since, "until": params.until})
        self.until = until or timezone.now()
        self.since = since or self.until - DEFAULT_RANGE
        if self.since >= self.until:
            raise ApiError("Invalid time range.", fields={"since": ["Must be before until."]})
        self.tz = parse_tz({"tz": params.tz})
        self.interval = params.interval
        self.group_by = dimensions("group_by", params.group_by)
        self.top = params.top
        self.top_by = dimensions("top_by", params.top_by) or list(DEFAULT_TOP_BY)
        self.filters = {
            name: value for name in DIMENSIONS if (value := getattr(params, name)) not in (None, "")
        }
        if self.interval:
            rollups.bucket_starts(self.since, self.until, self.interval, self.tz)  # 400 if >10k

    def aggregate(
        self,
        group_by: Sequence[str],
        *,
        interval: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> rollups.Result:
        return aggregate_for(
            self.principal,
            filters=self.filters,
            group_by=group_by,
            since=since or self.since,
            until=until or self.until,
            interval=interval,
            tz=self.tz,
            limit=MAX_GROUPS,
        )

    def header(self, source: str) -> dict[str, Any]:
        return {
            "report": self.kind,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "tz": str(self.tz),
            "interval": self.interval,
            "group_by": self.group_by,
            "filters": self.filters,
            "currency": "USD",
            "source": source,
        }


def dimensions(name: str, raw: str | list[str] | None) -> list[str]:
    """Dimension names from `a,b` or a list; a 400 naming `name` for an unknown one."""
    names = raw.split(",") if isinstance(raw, str) else list(raw or [])
    out: list[str] = []
    for item in names:
        dim = ALIASES.get(item.strip(), item.strip())
        if not dim:
            continue
        if dim not in DIMENSIONS:
            known = ", ".join(DIMENSIONS)
            raise ApiError(
                f"Unknown dimension in {name}.",
                fields={name: [f"Unknown dimension {item.strip()!r}; use {known}."]},
            )
        if dim not in out:
            out.append(dim)
    return out


# --- figures -------------------------------------------------------------------------------------


def _rounded(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up (away from zero), in integers: exact, and a
    report formats thousands of these."""
    q, r = divmod(abs(numerator), denominator)
    q += 2 * r >= denominator
    return -q if numerator < 0 else q


def _fixed(scaled: int, places: int) -> str:
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**places)
    return f"{sign}{whole}.{frac:0{places}d}"


def _ratio(part: int, whole: int) -> str | None:
    """part / whole to 4 places ("0.2500"), None for nothing to divide by."""
    return _fixed(_rounded(part * 10_000, whole), 4) if whole else None


units_text = rollups.units_text


def figures(values: dict[str, int]) -> dict[str, Any]:
    """One group's measures and efficiency metrics, as every format shows them."""
    tokens = values["input_tokens"] + values["output_tokens"]
    priced_tokens = tokens - values["unpriced_tokens"]
    latency = values["latency_count"]
    return {
        "requests": values["requests"],
        "input_tokens": values["input_tokens"],
        "output_tokens": values["output_tokens"],
        "cache_read_tokens": values["cache_read_tokens"],
        "cache_write_tokens": values["cache_write_tokens"],
        "total_tokens": tokens,
        "cost": units_text(values["cost_units"]),
        "errors": values["errors"],
        "unpriced_requests": values["unpriced_requests"],
        "unpriced_tokens": values["unpriced_tokens"],
        "estimated_requests": values["estimated_requests"],
        "estimated_cost": units_text(values["estimated_cost_units"]),
        "output_input_ratio": _ratio(values["output_tokens"], values["input_tokens"]),
        # USD per 1,000 priced tokens, at the ledger's scale (10 places).
        "cost_per_1k_tokens": (
            units_text(_rounded(values["cost_units"] * 1000, priced_tokens))
            if priced_tokens
            else None
        ),
        "cache_hit_share": _ratio(values["cache_read_tokens"], values["input_tokens"]),
        "error_share": _ratio(values["errors"], values["requests"]),
        "avg_latency_ms": (
            _fixed(_rounded(values["latency_ms_sum"] * 10, latency), 1) if latency else None
        ),
    }


def _zero() -> dict[str, int]:
    return dict.fromkeys(rollups.MEASURES, 0)


def _fold(
    rows: dict[tuple[Any, ...], dict[str, int]], dims: Sequence[str], keep: Sequence[str]
) -> dict[tuple[Any, ...], dict[str, int]]:
    """Sum groups keyed by `dims` into groups keyed by `keep` (a subset)."""
    index = [dims.index(d) for d in keep]
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    for key, values in rows.items():
        into = out.setdefault(tuple(key[i] for i in index), _zero())
        for m, v in values.items():
            into[m] += v
    return out


def _by_cost(item: tuple[tuple[Any, ...], dict[str, int]]) -> tuple[int, tuple[str, ...]]:
    return -item[1]["cost_units"], tuple(str(k) for k in item[0])


def _top(
    rows: dict[tuple[Any, ...], dict[str, int]], dim: str, total_units: int, n: int
) -> list[dict[str, Any]]:
    ranked = sorted(rows.items(), key=_by_cost)
    out = [
        {
            dim: key[0],
            "cost": units_text(v["cost_units"]),
            "share_of_cost": _ratio(v["cost_units"], total_units),
            "requests": v["requests"],
            "total_tokens": v["input_tokens"] + v["output_tokens"],
        }
        for key, v in ranked[:n]
    ]
    rest = _zero()
    for _key, v in ranked[n:]:
        for m in rest:
            rest[m] += v[m]
    if rest["requests"]:
        out.append(
            {
                dim: f"(other {len(ranked) - n})",
                "cost": units_text(rest["cost_units"]),
                "share_of_cost": _ratio(rest["cost_units"], total_units),
                "requests": rest["requests"],
                "total_tokens": rest["input_tokens"] + rest["output_tokens"],
            }
        )
    return out


def _period(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


# --- usage ---------------------------------------------------------------------------------------


def usage_report(query: Query) -> dict[str, Any]:
    """Totals with efficiency metrics, the table by `group_by` (and `interval`), the top
    consumers per `top_by` dimension, the model mix, and unpriced usage apart."""
    profile_dims = list(dict.fromkeys([*query.group_by, *query.top_by, "provider", "model"]))
    profile = query.aggregate(profile_dims)
    total = _fold(profile.rows, profile_dims, []).get((), _zero())
    if query.interval or query.group_by != profile_dims:
        table = query.aggregate(query.group_by, interval=query.interval)
        table_rows, sources = table.rows, {profile.plan.source, table.plan.source}
        truncated = table.truncated
    else:
        table_rows, sources, truncated = profile.rows, {profile.plan.source}, False
    keys, rows = _table(query, table_rows)
    models = _fold(profile.rows, profile_dims, ["provider", "model"])
    unpriced = [
        {
            "provider": k[0],
            "model": k[1],
            "requests": v["unpriced_requests"],
            "tokens": v["unpriced_tokens"],
        }
        for k, v in sorted(models.items())
        if v["unpriced_requests"]
    ]
    mix = [
        {
            "provider": k[0],
            "model": k[1],
            "requests": v["requests"],
            "cost": units_text(v["cost_units"]),
            "share_of_cost": _ratio(v["cost_units"], total["cost_units"]),
            "share_of_requests": _ratio(v["requests"], total["requests"]),
        }
        for k, v in sorted(models.items(), key=_by_cost)
    ]
    return {
        **query.header(_source(sources)),
        "totals": figures(total),
        "columns": [*keys, *MEASURE_COLUMNS, *EFFICIENCY_COLUMNS],
        "rows": rows,
        "truncated": truncated or profile.truncated,
        "top_consumers": {
            dim: _top(_fold(profile.rows, profile_dims, [dim]), dim, total["cost_units"], query.top)
            for dim in query.top_by
        },
        "model_mix": mix,
        "unpriced": unpriced,
    }


def _table(
    query: Query, groups: dict[tuple[Any, ...], dict[str, int]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The main table's key columns and one row per group (by group, then period)."""
    keys = list(query.group_by) + (["period"] if query.interval else [])
    rows = []
    for key in sorted(groups):  # by dimension values, then chronologically
        row: dict[str, Any] = {k: _period(v) for k, v in zip(keys, key, strict=True)}
        row.update(figures(groups[key]))
        rows.append(row)
    return keys, rows


def _source(sources: set[str]) -> str:
    if sources == {"rollups"}:
        return "rollups"
    if sources == {"ledger"}:
        return "ledger"
    return "rollups+ledger"


# --- cost ----------------------------------------------------------------------------------------


def cost_report(query: Query) -> dict[str, Any]:
    """Spend by `group_by` (default team) with the change from the previous period of the same
    length, the series by `interval`, and every visible active budget's utilisation with its
    projected period-end spend."""
    dims = query.group_by or ["team_id"]
    length = query.until - query.since
    current = query.aggregate(dims)
    previous = query.aggregate(dims, since=query.since - length, until=query.since)
    total_now = _fold(current.rows, dims, []).get((), _zero())
    total_before = _fold(previous.rows, dims, []).get((), _zero())
    rows = []
    for key in sorted(set(current.rows) | set(previous.rows), key=lambda k: tuple(map(str, k))):
        now_units = current.rows.get(key, _zero())["cost_units"]
        before_units = previous.rows.get(key, _zero())["cost_units"]
        row: dict[str, Any] = dict(zip(dims, key, strict=True))
        row.update(_change(now_units, before_units, total_now["cost_units"]))
        row["requests"] = current.rows.get(key, _zero())["requests"]
        rows.append(row)
    rows.sort(key=lambda r: (-Decimal(r["cost"]), *(str(r[d]) for d in dims)))
    series: list[dict[str, Any]] = []
    sources = {current.plan.source, previous.plan.source}
    if query.interval:
        by_time = query.aggregate(dims, interval=query.interval)
        sources.add(by_time.plan.source)
        for key in sorted(by_time.rows, key=lambda k: (_period(k[-1]), *map(str, k[:-1]))):
            item: dict[str, Any] = {"period": _period(key[-1])}
            item.update(zip(dims, key[:-1], strict=True))
            item["cost"] = units_text(by_time.rows[key]["cost_units"])
            series.append(item)
    return {
        **query.header(_source(sources)),
        "group_by": dims,
        "previous_since": (query.since - length).isoformat(),
        "previous_until": query.since.isoformat(),
        "totals": {
            **_change(total_now["cost_units"], total_before["cost_units"], total_now["cost_units"]),
            "requests": total_now["requests"],
            "unpriced_requests": total_now["unpriced_requests"],
            "estimated_cost": units_text(total_now["estimated_cost_units"]),
        },
        "columns": [
            *dims,
            "cost",
            "previous_cost",
            "change",
            "change_pct",
            "share_of_cost",
            "requests",
        ],
        "rows": rows,
        "truncated": current.truncated or previous.truncated,
        "series": series,
        "budgets": budget_table(query.principal),
    }


def _change(now_units: int, before_units: int, total_units: int) -> dict[str, Any]:
    change = now_units - before_units
    return {
        "cost": units_text(now_units),
        "previous_cost": units_text(before_units),
        "change": units_text(change),
        "change_pct": _fixed(_rounded(change * 10_000, before_units), 2) if before_units else None,
        "share_of_cost": _ratio(now_units, total_units),
    }


BUDGET_COLUMNS = (
    "budget_id",
    "name",
    "scope",
    "team_id",
    "project_id",
    "period",
    "enforcement",
    "period_end",
    "cost_limit",
    "cost_spent",
    "cost_percent",
    "projected_cost",
    "projected_percent",
)


def budget_table(principal: Principal, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every active budget the caller may see, fullest first: limit, spent, projected spend at
    period end (the period's rate so far, extended) and what that is of the limit."""
    now = now or timezone.now()
    out: list[dict[str, Any]] = []
    for budget in budgets_for_principal(principal).filter(is_active=True)[:MAX_BUDGETS]:
        status = budget_status(budget, now=now)
        limit = status.effective_cost_limit
        projected = status.projected_cost
        out.append(
            {
                "budget_id": budget.pk,
                "name": budget.name,
                "scope": _scope_label(budget),
                "team_id": budget.team_id,
                "project_id": budget.project_id,
                "period": budget.period,
                "enforcement": budget.enforcement,
                "period_end": status.period_end.isoformat() if status.period_end else None,
                "cost_limit": money(limit) if limit is not None else None,
                "cost_spent": money(status.cost_spent),
                "cost_percent": None
                if status.cost_percent is None
                else f"{status.cost_percent:.2f}",
                "projected_cost": money(projected) if projected is not None else None,
                "projected_percent": (
                    f"{projected * 100 / limit:.2f}" if projected is not None and limit else None
                ),
            }
        )
    out.sort(key=lambda b: (-Decimal(str(b["cost_percent"] or -1)), b["budget_id"]))
    return out


def _scope_label(budget: Budget) -> str:
    return budget.scope if not budget.scope_id else f"{budget.scope} {budget.scope_id}"


# --- optimization --------------------------------------------------------------------------------


def optimization_report(query: Query) -> dict[str, Any]:
    """Savings opportunities with their evidence, each priced from the catalogue
    (reporting.opportunities: the engine later analytics reuse)."""
    found = opportunities.find(
        query.principal,
        query.aggregate,
        since=query.since,
        until=query.until,
        filters=query.filters,
    )
    scale = Decimal(30 * 86400) / Decimal((query.until - query.since).total_seconds())
    rows = []
    for item in found.items:
        rows.append(
            {
                "kind": item.kind,
                "dimension": item.dimension,
                "target": item.target,
                "savings": money(item.savings),
                "monthly_savings": money(
                    (item.savings * scale).quantize(Decimal("0.01"), ROUND_HALF_UP)
                ),
                "requests": item.requests,
                "evidence": item.evidence_text,
                "action": item.action,
            }
        )
    total = sum((i.savings for i in found.items), Decimal(0))
    return {
        **query.header(found.source),
        "totals": {
            "opportunities": len(rows),
            "savings": money(total),
            "monthly_savings": money((total * scale).quantize(Decimal("0.01"), ROUND_HALF_UP)),
        },
        "columns": [
            "kind",
            "dimension",
            "target",
            "savings",
            "monthly_savings",
            "requests",
            "evidence",
            "action",
        ],
        "rows": rows,
        "truncated": False,
        "details": [item.evidence for item in found.items],
        # Accepted recommendations in scope and what each saved up to `until`.
        "accepted": recommendations.accepted_section(query.principal, until=query.until),
    }


def aggregate_table(principal: Principal, data: Any) -> dict[str, Any]:
    """Only the table: measure sums by `group_by` (and `interval`), with efficiency metrics."""
    query = Query(principal, data, kind="usage")
    table = query.aggregate(query.group_by, interval=query.interval)
    keys, rows = _table(query, table.rows)
    return {
        **query.header(table.plan.source),
        "columns": [*keys, *MEASURE_COLUMNS, *EFFICIENCY_COLUMNS],
        "rows": rows,
        "truncated": table.truncated,
    }


BUILDERS = {"usage": usage_report, "cost": cost_report, "optimization": optimization_report}


def report_generate(principal: Principal, data: Any, *, kind: str | None = None) -> dict[str, Any]:
    query = Query(principal, data, kind=kind)
    return BUILDERS[query.kind](query)
