"""Trends (issue 13): period-over-period growth per dimension, with the fastest growers and
decliners. The current period is [since, until) (default: the last 7 days); the previous one
is the same length just before it. Figures come from usage.rollups, in the caller's scope.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field

from reporting.params import QueryInt
from reporting.reports import MAX_GROUPS, _fixed, _fold, _rounded, dimensions
from tokenmgr_project.core.actions import validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.selectors import aggregate_for, parse_range

DEFAULT_DIMENSIONS = ("team_id", "project_id", "user_id", "model", "feature", "agent")
DEFAULT_RANGE = timedelta(days=7)
MAX_RANGE = timedelta(days=366)
MAX_TOP = 100
MAX_FOLDED = 1_000_000  # combined groups of the fine dimensions read at once
Metric = Literal["cost", "tokens", "requests"]


class TrendsIn(BaseModel):
    """GET /trends parameters (query string or /signals data); every name is checked."""

    model_config = ConfigDict(extra="forbid")

    dimensions: str | list[str] | None = Field(
        None, description=f"Comma-separated; default {', '.join(DEFAULT_DIMENSIONS)}."
    )
    metric: Metric = "cost"
    since: str | None = Field(None, description="ISO 8601; default: 7 days before until.")
    until: str | None = Field(None, description="ISO 8601; default: now.")
    top: QueryInt = Field(5, ge=1, le=MAX_TOP, description="Growers and decliners per dimension.")
    min_previous: QueryInt = Field(
        0, ge=0, description="Leave series smaller than this before (metric units) out of pct."
    )
    team_id: str | None = Field(None, max_length=128)
    project_id: str | None = Field(None, max_length=128)
    provider: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)
    feature: str | None = Field(None, max_length=128)
    agent: str | None = Field(None, max_length=128)


MEASURES_OF = {
    "cost": ("cost_units",),
    "tokens": ("input_tokens", "output_tokens"),
    "requests": ("requests",),
}
FILTERS = ("team_id", "project_id", "provider", "model", "feature", "agent")


def _value(values: dict[str, int], metric: str) -> int:
    if metric == "cost":
        return values["cost_units"]
    if metric == "tokens":
        return values["input_tokens"] + values["output_tokens"]
    return values["requests"]


def _text(value: int, metric: str) -> str | int:
    return rollups.units_text(value) if metric == "cost" else value


def _pct(change: int, before: int) -> str | None:
    return _fixed(_rounded(change * 10_000, before), 2) if before else None


def trends(principal: Principal, data: Any, *, now: datetime | None = None) -> dict[str, Any]:
    params = validate(TrendsIn, data)
    dims = dimensions("dimensions", params.dimensions) or list(DEFAULT_DIMENSIONS)
    since, until = parse_range({"since": params.since, "until": params.until})
    until = until or now or timezone.now()
    since = since or until - DEFAULT_RANGE
    if since >= until:
        raise ApiError("Invalid time range.", fields={"since": ["Must be before until."]})
    if until - since > MAX_RANGE:
        raise ApiError("Range too long.", fields={"since": ["At most 366 days at once."]})
    length = until - since
    filters = {n: v for n in FILTERS if (v := getattr(params, n)) not in (None, "")}

    def aggregate(
        group_by: list[str], start: datetime, end: datetime, *, limit: int = MAX_GROUPS
    ) -> rollups.Result:
        return aggregate_for(
            principal,
            filters=filters,
            group_by=group_by,
            since=start,
            until=end,
            limit=limit,
            measures=MEASURES_OF[params.metric],
        )

    metric = params.metric
    sections: dict[str, Any] = {}
    sources, truncated = set(), False
    # Dimensions only the fine rollup holds are read together, once per period, and folded:
    # one scan of it instead of one per dimension.
    fine = [d for d in dims if d not in rollups.COARSE_DIMENSIONS]
    folded: dict[str, tuple[dict[Any, dict[str, int]], dict[Any, dict[str, int]]]] = {}
    if len(fine) > 1:
        now_all = aggregate(fine, since, until, limit=MAX_FOLDED)
        before_all = aggregate(fine, since - length, since, limit=MAX_FOLDED)
        sources |= {now_all.plan.source, before_all.plan.source}
        truncated |= now_all.truncated or before_all.truncated
        for dim in fine:
            folded[dim] = (_fold(now_all.rows, fine, [dim]), _fold(before_all.rows, fine, [dim]))
    for dim in dims:
        if dim in folded:
            now_rows, before_rows = folded[dim]
        else:
            now_r = aggregate([dim], since, until)
            before_r = aggregate([dim], since - length, since)
            sources |= {now_r.plan.source, before_r.plan.source}
            truncated |= now_r.truncated or before_r.truncated
            now_rows, before_rows = now_r.rows, before_r.rows
        rows = []
        for key in set(now_rows) | set(before_rows):
            current = _value(now_rows[key], metric) if key in now_rows else 0
            previous = _value(before_rows[key], metric) if key in before_rows else 0
            change = current - previous
            rows.append(
                {
                    "value": key[0],
                    "current": current,
                    "previous": previous,
                    "change": change,
                    "state": "new" if not previous else ("gone" if not current else "both"),
                }
            )
        comparable = [r for r in rows if r["previous"] and r["previous"] >= params.min_previous]
        growers = sorted(
            (r for r in rows if r["change"] > 0), key=lambda r: (-r["change"], str(r["value"]))
        )
        decliners = sorted(
            (r for r in rows if r["change"] < 0), key=lambda r: (r["change"], str(r["value"]))
        )
        fastest = sorted(
            comparable,
            key=lambda r: (-Decimal(r["change"]) / Decimal(r["previous"]), str(r["value"])),
        )
        sections[dim] = {
            "series": len(rows),
            "growers": [_row(r, dim, metric) for r in growers[: params.top]],
            "decliners": [_row(r, dim, metric) for r in decliners[: params.top]],
            "fastest_growing_pct": [
                _row(r, dim, metric) for r in fastest[: params.top] if r["change"] > 0
            ],
            "fastest_declining_pct": [
                _row(r, dim, metric) for r in reversed(fastest[-params.top :]) if r["change"] < 0
            ],
            "new": sum(r["state"] == "new" for r in rows),
            "gone": sum(r["state"] == "gone" for r in rows),
        }
    total_now = aggregate([], since, until).rows.get((), None)
    total_before = aggregate([], since - length, since).rows.get((), None)
    current = _value(total_now, metric) if total_now else 0
    previous = _value(total_before, metric) if total_before else 0
    return {
        "metric": metric,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "previous_since": (since - length).isoformat(),
        "previous_until": since.isoformat(),
        "filters": filters,
        "currency": "USD",
        "source": "rollups" if sources <= {"rollups"} else "rollups+ledger",
        "truncated": truncated,
        "totals": {
            "current": _text(current, metric),
            "previous": _text(previous, metric),
            "change": _text(current - previous, metric),
            "change_pct": _pct(current - previous, previous),
        },
        "dimensions": sections,
    }


def _row(r: dict[str, Any], dim: str, metric: str) -> dict[str, Any]:
    return {
        dim: r["value"],
        "current": _text(r["current"], metric),
        "previous": _text(r["previous"], metric),
        "change": _text(r["change"], metric),
        "change_pct": _pct(r["change"], r["previous"]),
        "state": r["state"],
    }
