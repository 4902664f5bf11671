"""The admin's Reports page (issue 12): a range, a grouping and an interval in; the usage, cost
and optimization reports out, as tables, charts and download links of every export.

A staff page inside the admin, for users allowed to view usage; the cost sections also need
budgets.view_budget, as the cost report's API does. It runs the same registered actions as
GET /api/v1/reports/… (so the page, the API and the exports cannot disagree), renders the tables
server-side and hands the charts their figures as JSON (static/reporting/reports.js draws them
with the vendored Chart.js). Mounted under /admin/reports/ by the project's URLconf.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, QueryDict
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from reporting import reports
from reporting.actions import VIEW_BUDGET
from tokenmgr_project.core import actions
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.actions import VIEW_USAGE
from usage.admin.display import EMPTY
from usage.selectors import parse_tz

DEFAULT_DAYS = 30
DEFAULT_GROUP_BY, DEFAULT_INTERVAL, DEFAULT_TZ = "team_id", "day", "UTC"
INTERVALS = ("hour", "day", "week", "month")
FILTERS = ("team_id", "project_id", "model")
FORMATS = (("json", "JSON"), ("csv", "CSV"), ("md", "Markdown"))
# The charts name this many groups (by cost over the range) and fold the rest into one.
CHART_GROUPS = 8
LABELS = {
    "team_id": "Team",
    "project_id": "Project",
    "user_id": "User",
    "feature": "Feature",
    "agent": "Agent",
    "task_type": "Task type",
    "provider": "Provider",
    "model": "Model",
}
# How a bucket's start is written on the chart's axis and in the table, by interval.
AXIS_FORMATS = {"hour": "%d %b %H:%M", "day": "%d %b", "week": "wk %d %b", "month": "%b %Y"}
CELL_FORMATS = {"hour": "%Y-%m-%d %H:%M", "day": "%Y-%m-%d", "week": "%Y-%m-%d", "month": "%Y-%m"}
TEXT_COLUMNS = {*reports.DIMENSIONS, "period", "name", "scope", "enforcement", "period_end"}
TEXT_COLUMNS |= {"kind", "dimension", "target", "evidence", "action"}


MONEY_COLUMNS = {
    "cost",
    "estimated_cost",
    "previous_cost",
    "change",
    "cost_per_1k_tokens",
    "cost_limit",
    "cost_spent",
    "projected_cost",
    "savings",
    "monthly_savings",
}


HEADINGS = {
    **LABELS,
    "change_pct": "Change %",
    "cost_percent": "Spent %",
    "projected_percent": "Projected %",
    "output_input_ratio": "Output / input",
    "avg_latency_ms": "Avg latency (ms)",
    "budget_id": "Budget",
    "period_end": "Period ends",
}


def _heading(column: str) -> str:
    if column in HEADINGS:
        return HEADINGS[column]
    text = column.replace("_", " ").capitalize()
    return f"{text} (USD)" if column in MONEY_COLUMNS else text


# --- the form ------------------------------------------------------------------------------------


def _form(query: QueryDict) -> dict[str, Any]:
    """What the person asked for, as the form shows it again (defaults filled in)."""
    form: dict[str, Any] = {
        name: query.get(name, "").strip() for name in ("since", "until", "tz", *FILTERS)
    }
    form["tz"] = form["tz"] or DEFAULT_TZ
    form["group_by"] = query.get("group_by", "").strip() or DEFAULT_GROUP_BY
    form["interval"] = query.get("interval", "").strip() or DEFAULT_INTERVAL
    # No zone asked for: reports.js offers the browser's (Intl) and reloads once.
    form["tz_from_browser"] = "tz" not in query
    return form


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _params(form: dict[str, Any]) -> dict[str, Any]:
    """The reports' parameters, as the API takes them: dates become the start of that day in
    the chosen zone, `until` inclusive (so 1 to 30 November ends at 1 December 00:00). Writes
    the days and the dimension it settled on back into `form`, which the page shows."""
    tz = parse_tz({"tz": form["tz"]})
    # One dimension (the charts stack by it); the API's own check names a wrong one.
    dims = reports.dimensions("group_by", form["group_by"])
    if len(dims) != 1:
        raise ApiError("Invalid input.", fields={"group_by": ["Pick one dimension."]})
    form["group_by"] = dims[0]
    today = timezone.now().astimezone(tz).date()
    since_day = _day(form["since"]) if form["since"] else today - timedelta(days=DEFAULT_DAYS - 1)
    until_day = _day(form["until"]) if form["until"] else today
    form["since"] = since_day.isoformat() if since_day else form["since"]
    form["until"] = until_day.isoformat() if until_day else form["until"]
    params: dict[str, Any] = {
        # Not a date (a link with a full ISO time, or a typo): the API parses or names it.
        "since": _start_of(since_day, tz, name="since") if since_day else form["since"],
        "until": _start_of(until_day, tz, name="until", days=1) if until_day else form["until"],
        "tz": form["tz"],
        "group_by": form["group_by"],
        "interval": form["interval"],
        "top_by": form["group_by"],
    }
    params.update({name: form[name] for name in FILTERS if form[name]})
    return params


def _start_of(day: date, tz: zoneinfo.ZoneInfo, *, name: str, days: int = 0) -> str:
    try:
        return datetime.combine(day + timedelta(days=days), time(0), tzinfo=tz).isoformat()
    except OverflowError:  # the day after 9999-12-31
        raise ApiError(
            "Invalid time range.", fields={name: ["Out of range: use a year from 1 to 9999."]}
        ) from None


# --- the page ------------------------------------------------------------------------------------


def reports_page(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(VIEW_USAGE):
        raise PermissionDenied(f"The Reports page needs the {VIEW_USAGE} permission.")
    principal = Principal.for_staff(request.user)
    may_cost = request.user.has_perm(VIEW_BUDGET)
    form = _form(request.GET)
    context: dict[str, Any] = {
        **admin.site.each_context(request),
        "title": "Reports",
        "form": form,
        "dimensions": [(d, LABELS[d]) for d in reports.DIMENSIONS],
        "intervals": INTERVALS,
        "zones": sorted(zoneinfo.available_timezones() | {DEFAULT_TZ}),
        "may_cost": may_cost,
        "view_budget": VIEW_BUDGET,
    }
    try:
        params = _params(form)
        usage = actions.run("get_usage_report", principal, params).body
        cost = actions.run("get_cost_report", principal, params).body if may_cost else None
        optimization = actions.run("get_optimization_report", principal, params).body
    except ApiError as exc:
        if exc.status_code != 400:
            raise
        context["error"] = {
            "message": exc.message,
            "fields": [(name, "; ".join(messages)) for name, messages in exc.fields.items()],
        }
        return TemplateResponse(request, "admin/reporting/reports.html", context, status=400)
    context.update(_sections(form["group_by"], usage, cost, optimization))
    context["downloads"] = _downloads(params, may_cost)
    return TemplateResponse(request, "admin/reporting/reports.html", context)


def _sections(
    dim: str, usage: dict[str, Any], cost: dict[str, Any] | None, optimization: dict[str, Any]
) -> dict[str, Any]:
    tz = zoneinfo.ZoneInfo(usage["tz"])
    interval = usage["interval"]
    top = usage["top_consumers"].get(dim, [])
    charts: dict[str, Any] = {
        "top": {
            "labels": [_value(row[dim]) for row in top],
            "cost": [row["cost"] for row in top],
        },
        "mix": _mix(usage["model_mix"]),
    }
    sections: dict[str, Any] = {
        "dimension": LABELS[dim],
        "range": _range(usage["since"], usage["until"], tz),
        "usage": usage,
        "totals": _totals(usage["totals"]),
        "main": _table(usage["columns"], usage["rows"], interval, tz),
        "top": _table([dim, "cost", "share_of_cost", "requests", "total_tokens"], top, None, tz),
        "mix": _table(
            ["provider", "model", "requests", "cost", "share_of_cost", "share_of_requests"],
            usage["model_mix"],
            None,
            tz,
        ),
        "unpriced": _table(
            ["provider", "model", "requests", "tokens"], usage["unpriced"], None, tz
        ),
        "optimization": optimization,
        "opportunities": _table(optimization["columns"], optimization["rows"], None, tz),
    }
    if cost is not None:
        charts["series"] = _series(dim, cost, tz)
        sections["cost"] = cost
        sections["previous_range"] = _range(cost["previous_since"], cost["previous_until"], tz)
        sections["spend"] = _table(cost["columns"], cost["rows"], None, tz)
        sections["budgets"] = _table(
            list(reports.BUDGET_COLUMNS),
            cost["budgets"],
            None,
            tz,
            links={"budget_id": _budget_url},
        )
    sections["charts"] = charts
    return sections


def _series(dim: str, cost: dict[str, Any], tz: zoneinfo.ZoneInfo) -> dict[str, Any]:
    """The stacked chart: one bar per bucket of the range (empty ones too), one stack segment
    per group, the dearest CHART_GROUPS groups by name and the rest as one."""
    interval = cost["interval"]
    since, until = datetime.fromisoformat(cost["since"]), datetime.fromisoformat(cost["until"])
    starts = rollups.bucket_starts(since, until, interval, tz)
    slot = {start: i for i, start in enumerate(starts)}
    ranked = [row[dim] for row in cost["rows"] if Decimal(row["cost"])]
    named = ranked[:CHART_GROUPS]
    others = len(ranked) - len(named)
    groups: dict[str | None, list[Decimal]] = {
        key: [Decimal(0)] * len(starts) for key in [*named, *([None] if others else [])]
    }
    for item in cost["series"]:
        at = slot.get(datetime.fromisoformat(item["period"]))
        group = item[dim] if item[dim] in groups else None
        if at is not None and group in groups:
            groups[group][at] += Decimal(item["cost"])
    return {
        "labels": [start.astimezone(tz).strftime(AXIS_FORMATS[interval]) for start in starts],
        "datasets": [
            {
                "label": f"other ({others})" if key is None else _value(key),
                "data": [str(v) for v in values],
            }
            for key, values in groups.items()
        ],
    }


def _mix(model_mix: list[dict[str, Any]]) -> dict[str, Any]:
    """The doughnut: cost by model, or requests where nothing was priced (all cost 0)."""
    by_cost = any(Decimal(row["cost"]) for row in model_mix)
    measure = "cost" if by_cost else "requests"
    named, rest = model_mix[:CHART_GROUPS], model_mix[CHART_GROUPS:]
    labels = [f"{row['provider']}/{row['model']}" for row in named]
    values = [Decimal(row[measure]) for row in named]
    if rest:
        labels.append(f"other ({len(rest)})")
        values.append(sum((Decimal(row[measure]) for row in rest), Decimal(0)))
    return {"measure": measure, "labels": labels, "values": [str(v) for v in values]}


def _range(since: str, until: str, tz: zoneinfo.ZoneInfo) -> str:
    ends = [
        datetime.fromisoformat(t).astimezone(tz).strftime("%Y-%m-%d %H:%M") for t in (since, until)
    ]
    return " → ".join(ends)


def _value(value: Any) -> str:
    return "(none)" if value in ("", None) else str(value)


def _cell(column: str, value: Any, interval: str | None, tz: zoneinfo.ZoneInfo) -> str:
    if value is None or value == "":
        return EMPTY
    if column == "period" and interval:
        return datetime.fromisoformat(value).astimezone(tz).strftime(CELL_FORMATS[interval])
    if column == "period_end":
        return datetime.fromisoformat(value).astimezone(tz).strftime("%Y-%m-%d %H:%M")
    if column in TEXT_COLUMNS or column.endswith("_id"):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if column in MONEY_COLUMNS:
        return f"{Decimal(value):,f}"
    return str(value)


def _table(
    columns: list[str],
    rows: list[dict[str, Any]],
    interval: str | None,
    tz: zoneinfo.ZoneInfo,
    *,
    links: dict[str, Callable[[Any], str]] | None = None,
) -> dict[str, Any]:
    """Headings and cells as the page shows them: (text, numeric?, link or "")."""
    links = links or {}
    return {
        "head": [(_heading(c), c not in TEXT_COLUMNS) for c in columns],
        "rows": [
            [
                (
                    _cell(c, row.get(c), interval, tz),
                    c not in TEXT_COLUMNS,
                    links[c](row[c]) if c in links and row.get(c) is not None else "",
                )
                for c in columns
            ]
            for row in rows
        ],
    }


def _budget_url(pk: Any) -> str:
    return reverse("admin:budgets_budget_change", args=[pk])


def _percent(ratio: str | None) -> str:
    return EMPTY if ratio is None else f"{Decimal(ratio) * 100:.2f} %"


def _totals(totals: dict[str, Any]) -> list[dict[str, str]]:
    """The cards: unpriced and estimated usage apart from the priced cost, never folded in."""
    per_1k = totals["cost_per_1k_tokens"]
    return [
        {"id": "cost", "label": "Cost (USD)", "value": f"{Decimal(totals['cost']):,f}"},
        {"id": "requests", "label": "Requests", "value": f"{totals['requests']:,}"},
        {
            "id": "tokens",
            "label": "Tokens",
            "value": f"{totals['total_tokens']:,}",
            "sub": f"{totals['input_tokens']:,} in · {totals['output_tokens']:,} out",
        },
        {
            "id": "unpriced",
            "label": "Unpriced requests",
            "value": f"{totals['unpriced_requests']:,}",
            "sub": f"{totals['unpriced_tokens']:,} tokens, not in the cost",
        },
        {
            "id": "estimated",
            "label": "Estimated cost (USD)",
            "value": f"{Decimal(totals['estimated_cost']):,f}",
            "sub": f"{totals['estimated_requests']:,} requests with estimated tokens",
        },
        {
            "id": "errors",
            "label": "Error share",
            "value": _percent(totals["error_share"]),
            "sub": f"{totals['errors']:,} errors",
        },
        {
            "id": "cache",
            "label": "Cache-hit share",
            "value": _percent(totals["cache_hit_share"]),
            "sub": f"{totals['cache_read_tokens']:,} tokens read from cache",
        },
        {
            "id": "per1k",
            "label": "Cost per 1k tokens",
            "value": EMPTY if per_1k is None else f"{Decimal(per_1k):,f}",
            "sub": "priced tokens only",
        },
    ]


def _downloads(params: dict[str, Any], may_cost: bool) -> list[dict[str, Any]]:
    """Every report in every format, with the page's parameters: the API's own exports."""
    kinds = [("usage", "Usage"), *([("cost", "Cost")] if may_cost else [])]
    kinds.append(("optimization", "Optimization"))
    return [
        {
            "kind": kind,
            "label": label,
            "links": [
                (name, reverse("report", args=[kind]) + "?" + urlencode({**params, "format": fmt}))
                for fmt, name in FORMATS
            ],
        }
        for kind, label in kinds
    ]


app_name = "reports_pages"
urlpatterns = [
    path("", admin.site.admin_view(reports_page), name="reports"),
]
