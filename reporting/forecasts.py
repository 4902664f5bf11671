"""Forecasts (issue 13): projected spend to period end and month end per budget and per
dimension, each with an 80 % prediction interval, the date a budget runs out at its burn rate,
and the backtest that measures the method's error on history (`manage.py token backtest`).

Every figure comes from the rollups (usage.rollups.aggregate by day, scoped by the caller's
Principal; the raw ledger only for the current hour's sub-hour edge), never from scanning the
ledger, so a forecast costs a few grouped rollup reads however large the ledger is.

The method ("robust daily rate"), for one series of daily spend (cost units per day in the time
zone of the forecast: UTC or `tz` for dimensions, the budget's own for budgets):

1. History: the `window` (7..90, default 28) complete days before the forecast day, from the
   series' first day with usage. Fewer than MIN_HISTORY_DAYS (7) such days: no forecast, the
   item says `insufficient_history: {have_days, need_days}`.
2. Day-of-week factors, with WEEKDAY_FACTOR_DAYS (21, three weeks) of history or more: the median
   spend of each weekday divided by the mean of the seven medians (a weekday that never spends
   gets 0); without them every factor is 1. Dividing by them deseasonalises the series.
3. Level: the 20 % trimmed mean of the last LEVEL_DAYS (14) deseasonalised days (the highest
   and lowest fifth are dropped, so spikes and outages do not move it; two weeks, not the whole
   window, so it lags a growing series less). A day's forecast is the level times its weekday
   factor. No trend term: on the backtest (bench/forecast_backtest.py) the trend estimates
   tried cost more in noise on noisy series than they won in bias on smooth growing ones.
4. Interval: sigma is the relative residuals' (day / fit - 1) spread: their root mean square
   about the median, spikes included (they recur: leaving the largest tenth out held only
   64-71 % of the backtest's outcomes in the "80 %" interval; all of them, 76-79 %). Over a
   range of days with weights w (the part of each day inside the range) and forecasts e, the
   sum's variance is sum (sigma w e)^2 (each day's noise) + (sum sigma w e)^2 / n (the
   level's error from its n days) + (sum w f (c + k) d)^2, the drift: d is how much the level
   of the window's second half differs from its first's, per day, f the day's factor, k its
   days ahead and c the days from the level's middle day to its last (how far it already
   lags). The 80 % interval is the point +/- 1.2816 standard deviations, its lower end never
   below zero; what is already spent is added to all three.

The part of today still to come counts as that fraction of today's forecast. Budgets' exhaustion
dates are the budgets app's (budgets.selectors.budget_burn: the trailing 7 days' rate, stated
with its window), the same as GET /budgets/{id}/status shows.
"""

from __future__ import annotations

import math
import statistics
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, get_args

from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, field_validator

from budgets.models import Budget
from budgets.selectors import budget_status, budgets_for_principal
from reporting.reports import ALIASES, DIMENSIONS, dimensions
from tokenmgr_project.core.actions import validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.pricing import money
from usage.selectors import aggregate_for, parse_range, parse_tz

MIN_HISTORY_DAYS = 7
WEEKDAY_FACTOR_DAYS = 21
DEFAULT_WINDOW = 28
MIN_WINDOW, MAX_WINDOW = 7, 90
TRIM = 0.2
LEVEL_DAYS = 14  # the level is the last two weeks': it lags growth half as much as 28 days'
Z_80 = 1.2816  # the standard normal's 90th percentile: a two-sided 80 % interval
MAX_AHEAD = timedelta(days=366)  # `until` at most this far ahead
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
MAX_BUDGETS = 200
MAX_GROUPS = 100_000  # (series, day) groups read at most; past it `truncated`
UTC_ZONE = zoneinfo.ZoneInfo("UTC")
METHOD = {
    "name": "robust daily rate",
    "min_history_days": MIN_HISTORY_DAYS,
    "weekday_factors_from_days": WEEKDAY_FACTOR_DAYS,
    "level_days": LEVEL_DAYS,
    "interval": "80 % prediction interval",
    "description": (
        "Daily spend: the last 14 days' 20 % trimmed mean times day-of-week factors (from 3 "
        "weeks of the window); the interval from the residuals' robust spread, the level's "
        "error and its drift between the window's halves (README, Forecasts)."
    ),
}


# --- the method: pure functions of a daily series -------------------------------------------


@dataclass(frozen=True, slots=True)
class Insufficient:
    have_days: int
    need_days: int = MIN_HISTORY_DAYS

    def as_dict(self) -> dict[str, int]:
        return {"have_days": self.have_days, "need_days": self.need_days}


@dataclass(frozen=True, slots=True)
class Fit:
    """A series fitted on the days before `start`: its forecast of any later day."""

    start: date  # the first day forecast; history ends the day before
    level: float  # deseasonalised spend a day (units)
    factors: tuple[float, ...] | None  # per weekday, Monday first, mean 1
    sigma: float  # a day's relative residual standard deviation
    drift: float  # |second half's level - first half's| per day (units)
    days: int  # days fitted
    level_days: int  # the last days the level is the trimmed mean of

    def factor(self, day: date) -> float:
        return self.factors[day.weekday()] if self.factors else 1.0

    def expected(self, day: date) -> float:
        return max(0.0, self.level * self.factor(day))


@dataclass(frozen=True, slots=True)
class Projection:
    point: int
    low: int
    high: int

    def plus(self, units: int) -> Projection:
        return Projection(self.point + units, self.low + units, self.high + units)

    def as_dict(self) -> dict[str, str]:
        return {
            "cost": rollups.units_text(self.point),
            "low": rollups.units_text(self.low),
            "high": rollups.units_text(self.high),
        }


def _trimmed_mean(values: Sequence[float], share: float = TRIM) -> float:
    ordered = sorted(values)
    cut = int(len(ordered) * share)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


def _residual_sd(values: Sequence[float]) -> float:
    """The residuals' spread: their root mean square about the median, every day counted (a
    spike in the window says spikes happen). Unlike the MAD it does not vanish when most days
    sit exactly on the fit (counts of identical calls)."""
    centre = statistics.median(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / len(values))


def history_days(daily: Mapping[date, int], *, start: date, window: int) -> int:
    """Complete days of history before `start` within the window, from the first with usage."""
    first = start - timedelta(days=window)
    seen = [d for d in daily if first <= d < start]
    return (start - min(seen)).days if seen else 0


def fit(
    daily: Mapping[date, int], *, start: date, window: int = DEFAULT_WINDOW
) -> Fit | Insufficient:
    """Fit the days before `start` (at most `window` of them): `daily` maps each day with usage
    to its spend in units (a day missing from it spent nothing). Pure: the endpoint and the
    backtest call it alike."""
    have = history_days(daily, start=start, window=window)
    if have < MIN_HISTORY_DAYS:
        return Insufficient(have)
    days = [start - timedelta(days=have - i) for i in range(have)]
    xs = [float(daily.get(d, 0)) for d in days]
    factors: tuple[float, ...] | None = None
    if have >= WEEKDAY_FACTOR_DAYS:
        medians = [
            statistics.median(x for d, x in zip(days, xs, strict=True) if d.weekday() == w)
            for w in range(7)
        ]
        mean = sum(medians) / 7
        if mean > 0:
            factors = tuple(m / mean for m in medians)
    weights = [factors[d.weekday()] if factors else 1.0 for d in days]
    # Deseasonalised; a weekday that never spends says nothing of the level.
    ys = [x / f if f > 0 else None for x, f in zip(xs, weights, strict=True)]
    level = _trimmed_mean([y for y in ys[-LEVEL_DAYS:] if y is not None] or [0.0])
    level_days = min(have, LEVEL_DAYS)
    half = have // 2
    first = [y for y in ys[:half] if y is not None]
    second = [y for y in ys[half:] if y is not None]
    drift = abs(_trimmed_mean(second) - _trimmed_mean(first)) / half if first and second else 0.0
    relative = [x / (level * f) - 1 for x, f in zip(xs, weights, strict=True) if level * f > 0]
    sigma = _residual_sd(relative) if relative else 0.0
    return Fit(start, level, factors, sigma, drift, have, level_days)


def _local_midnight(day: date, tz: zoneinfo.ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def project(
    model: Fit,
    *,
    since: datetime,
    until: datetime,
    tz: zoneinfo.ZoneInfo = UTC_ZONE,
) -> Projection:
    """The spend forecast for [since, until) (days in `tz`; a day cut by the range counts by
    the part inside it), with its 80 % interval (module docstring)."""
    point = noise = level = drift = 0.0
    lag = (model.level_days - 1) / 2  # the level's days are centred this many days back
    day = since.astimezone(tz).date()
    while True:
        begins, ends = _local_midnight(day, tz), _local_midnight(day + timedelta(days=1), tz)
        if begins >= until:
            break
        inside = (min(ends, until) - max(begins, since)).total_seconds()
        if inside > 0:
            w = inside / (ends - begins).total_seconds()
            expected = w * model.expected(day)
            point += expected
            noise += (model.sigma * expected) ** 2
            level += model.sigma * expected
            ahead = (day - model.start).days + 1
            drift += w * model.factor(day) * (lag + ahead) * model.drift
        day += timedelta(days=1)
    spread = Z_80 * math.sqrt(noise + level * level / model.level_days + drift * drift)
    return Projection(round(point), max(0, round(point - spread)), round(point + spread))


# --- reading the rollups -----------------------------------------------------------------------


def _daily(
    principal: Principal,
    *,
    group_by: Sequence[str],
    filters: dict[str, str],
    since: datetime,
    until: datetime,
    tz: zoneinfo.ZoneInfo,
) -> tuple[dict[tuple[Any, ...], dict[date, int]], str, bool]:
    """Cost units per local day per group: ({group: {day: units}}, source, truncated). A
    visible budget's filters hold the caller's scope, so its spend reads the same in scope."""
    result = aggregate_for(
        principal,
        filters=filters,
        group_by=group_by,
        since=since,
        until=until,
        interval="day",
        tz=tz,
        limit=MAX_GROUPS,
    )
    out: dict[tuple[Any, ...], dict[date, int]] = {}
    for key, values in result.rows.items():
        *group, period = key
        day = period.astimezone(tz).date()
        into = out.setdefault(tuple(group), {})
        into[day] = into.get(day, 0) + values["cost_units"]
    return out, result.plan.source, result.truncated


def _month_bounds(at: datetime, tz: zoneinfo.ZoneInfo) -> tuple[datetime, datetime]:
    first = at.astimezone(tz).date().replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return _local_midnight(first, tz), _local_midnight(following, tz)


def _spent(daily: Mapping[date, int], since: datetime, tz: zoneinfo.ZoneInfo) -> int:
    """Units spent from `since` (a local midnight) on, in `daily`."""
    first = since.astimezone(tz).date()
    return sum(units for day, units in daily.items() if day >= first)


# --- the endpoint --------------------------------------------------------------------------------


DimensionName = Literal[
    "team_id", "project_id", "user_id", "feature", "agent", "task_type", "provider", "model",
    "team", "project", "user",
]  # fmt: skip
if set(get_args(DimensionName)) != {*DIMENSIONS, *ALIASES}:  # a tripwire: the reports' names
    raise RuntimeError("forecasts.DimensionName must list reports.DIMENSIONS and ALIASES")


class ForecastIn(BaseModel):
    """GET /forecast's parameters; every name is checked."""

    model_config = ConfigDict(extra="forbid")

    dimension: DimensionName = Field(
        "team_id", description="The series to forecast, one per value of this dimension."
    )
    window: int = Field(
        DEFAULT_WINDOW,
        ge=MIN_WINDOW,
        le=MAX_WINDOW,
        description="Trailing days of history the method reads.",
    )
    until: str | None = Field(None, description="ISO 8601: also project each series to it.")
    tz: str | None = Field(None, description="IANA time zone of the series' days and months.")
    limit: int = Field(
        DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Series at most, the largest first."
    )

    @field_validator("window", "limit", mode="before")
    @classmethod
    def _int_from_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value


@dataclass(frozen=True, slots=True)
class _Params:
    dimension: str
    window: int
    until: datetime | None
    tz: zoneinfo.ZoneInfo
    limit: int


def _params(data: Any, now: datetime) -> _Params:
    params = validate(ForecastIn, data)
    [dimension] = dimensions("dimension", params.dimension)  # an alias to its column
    _since, until = parse_range({"until": params.until})
    if until is not None and not now < until <= now + MAX_AHEAD:
        raise ApiError(
            "Invalid until.",
            fields={"until": [f"Must be after now and at most {MAX_AHEAD.days} days ahead."]},
        )
    return _Params(dimension, params.window, until, parse_tz({"tz": params.tz}), params.limit)


def _series_item(
    daily: dict[date, int],
    *,
    now: datetime,
    params: _Params,
    month: tuple[datetime, datetime],
) -> dict[str, Any]:
    today = now.astimezone(params.tz).date()
    model = fit(daily, start=today, window=params.window)
    item: dict[str, Any] = {
        "month_to_date": rollups.units_text(_spent(daily, month[0], params.tz)),
        "projected_month_end": None,
        "projected_until": None,
        "expected_today": None,  # the whole of today's forecast spend
        "weekday_factors": False,
        "history_days": history_days(daily, start=today, window=params.window),
        "insufficient_history": None,
    }
    if isinstance(model, Insufficient):
        item["insufficient_history"] = model.as_dict()
        return item
    spent = _spent(daily, month[0], params.tz)
    ahead = project(model, since=now, until=month[1], tz=params.tz)
    item["projected_month_end"] = ahead.plus(spent).as_dict()
    if params.until is not None:
        item["projected_until"] = project(
            model, since=now, until=params.until, tz=params.tz
        ).as_dict()
    item["expected_today"] = rollups.units_text(round(model.expected(today)))
    item["weekday_factors"] = model.factors is not None
    return item


def _budget_item(
    principal: Principal, budget: Budget, *, now: datetime, window: int
) -> dict[str, Any]:
    status = budget_status(budget, now=now, burn=True)
    tz = budget.tz
    month = _month_bounds(now, tz)
    today = now.astimezone(tz).date()
    since = min(_local_midnight(today - timedelta(days=window), tz), month[0])
    found, _source, _truncated = _daily(
        principal,
        group_by=(),
        filters=budget.filters(),
        since=since,
        until=now,
        tz=tz,
    )
    daily = found.get((), {})
    model = fit(daily, start=today, window=window)
    burn = status.burn
    assert burn is not None
    cost_spent = rollups.money_to_units(status.cost_spent)
    item: dict[str, Any] = {
        "budget_id": budget.pk,
        "name": budget.name,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "team_id": budget.team_id,
        "project_id": budget.project_id,
        "period": budget.period,
        "timezone": budget.timezone,
        "period_start": status.period_start.isoformat(),
        "period_end": status.period_end.isoformat() if status.period_end else None,
        "cost_limit": None
        if status.effective_cost_limit is None
        else money(status.effective_cost_limit),
        "token_limit": status.effective_token_limit,
        "cost_spent": rollups.units_text(cost_spent),
        "tokens_spent": status.tokens_spent,
        "month_end": month[1].isoformat(),
        "projected_period_end": None,
        "projected_month_end": None,
        "weekday_factors": False,
        "history_days": history_days(daily, start=today, window=window),
        "insufficient_history": None,
        **burn.as_dict(),
    }
    if isinstance(model, Insufficient):
        item["insufficient_history"] = model.as_dict()
        return item
    if status.period_end is not None:
        ahead = project(model, since=now, until=status.period_end, tz=tz)
        item["projected_period_end"] = ahead.plus(cost_spent).as_dict()
    month_spent = (
        cost_spent if budget.period == Budget.Period.MONTHLY else _spent(daily, month[0], tz)
    )
    item["projected_month_end"] = (
        project(model, since=now, until=month[1], tz=tz).plus(month_spent).as_dict()
    )
    item["weekday_factors"] = model.factors is not None
    return item


def forecast_usage(
    principal: Principal, data: Any, *, now: datetime | None = None
) -> dict[str, Any]:
    """GET /forecast: every budget the caller may see and the largest `limit` series of the
    dimension, projected (module docstring). A 400 naming `window` when nothing can be
    forecast at all: no series has MIN_HISTORY_DAYS of history and no budget spent in its
    burn window."""
    now = now or timezone.now()
    params = _params(data, now)
    tz = params.tz
    month = _month_bounds(now, tz)
    today = now.astimezone(tz).date()
    since = min(_local_midnight(today - timedelta(days=params.window), tz), month[0])
    found, source, truncated = _daily(
        principal,
        group_by=(params.dimension,),
        filters={},
        since=since,
        until=now,
        tz=tz,
    )
    largest = sorted(found.items(), key=lambda kv: (-sum(kv[1].values()), str(kv[0][0])))
    series = []
    for (value,), daily in largest[: params.limit]:
        item = _series_item(daily, now=now, params=params, month=month)
        series.append({params.dimension: value, **item})
    visible = budgets_for_principal(principal).filter(is_active=True).order_by("pk")
    budgets = [
        _budget_item(principal, budget, now=now, window=params.window)
        for budget in visible[:MAX_BUDGETS]
    ]
    if not any(s["insufficient_history"] is None for s in series) and not any(
        map(_answered, budgets)
    ):
        have = max((s["history_days"] for s in series), default=0)
        raise ApiError(
            "Not enough usage history to forecast.",
            fields={
                "window": [
                    f"The method needs {MIN_HISTORY_DAYS} complete days of usage before today "
                    f"({today.isoformat()}, {tz}) within the window; the longest series here "
                    f"has {have}, and no visible budget has spend in its burn window."
                ]
            },
        )
    return {
        "as_of": now.isoformat(),
        "currency": "USD",
        "dimension": params.dimension,
        "window": params.window,
        "tz": str(tz),
        "month_start": month[0].isoformat(),
        "month_end": month[1].isoformat(),
        "until": params.until.isoformat() if params.until else None,
        "method": METHOD,
        "source": source,
        "series": series,
        "truncated": truncated or len(largest) > params.limit,
        "budgets": budgets,
        "budgets_truncated": len(budgets) == MAX_BUDGETS and visible.count() > MAX_BUDGETS,
    }


def _answered(budget: dict[str, Any]) -> bool:
    """A budget item says something: a projection, or a burn rate to date its exhaustion."""
    rate = budget["burn_rate"] or {}
    return budget["insufficient_history"] is None or bool(
        rate.get("cost_per_day", "0") != "0" or rate.get("tokens_per_day")
    )


# --- the backtest --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Errors:
    """Forecast errors at one horizon: percentage errors of the days with actual spend."""

    signed: list[float]
    absolute_units: int = 0
    actual_units: int = 0
    zero_actual: int = 0
    held: int = 0  # actuals inside the 80 % interval
    intervals: int = 0

    def add(self, forecast: Projection, actual: int) -> None:
        self.intervals += 1
        self.held += forecast.low <= actual <= forecast.high
        if actual <= 0:
            self.zero_actual += 1
            return
        self.signed.append((forecast.point - actual) / actual * 100)
        self.absolute_units += abs(forecast.point - actual)
        self.actual_units += actual

    def as_dict(self, *, interval: bool = True) -> dict[str, Any]:
        ape = [abs(e) for e in self.signed]
        out: dict[str, Any] = {
            "forecasts": len(self.signed),
            "mape": round(sum(ape) / len(ape), 2) if ape else None,
            "median_ape": round(statistics.median(ape), 2) if ape else None,
            "bias": round(sum(self.signed) / len(ape), 2) if ape else None,
            "wape": round(self.absolute_units / self.actual_units * 100, 2) if ape else None,
            "zero_actual": self.zero_actual,
        }
        if interval:
            out["coverage"] = round(self.held / self.intervals * 100, 1) if self.intervals else None
        return out


def _naive(daily: Mapping[date, int], start: date, days: int) -> Projection:
    """The baseline: the mean of the 7 days before `start`, for each day forecast."""
    week = [daily.get(start - timedelta(days=i + 1), 0) for i in range(7)]
    point = round(sum(week) / 7 * days)
    return Projection(point, point, point)


def forecast_backtest(
    principal: Principal,
    *,
    dimension: str = "team_id",
    days: int = 28,
    horizon: int = 7,
    window: int = DEFAULT_WINDOW,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Replay the last `days` days (UTC): from each day D with MIN_HISTORY_DAYS of history
    before it, forecast the spend of D .. D+h-1 from the days before D only (fit/project, as
    the endpoint does), for h = 1 and `horizon`, and compare with what the rollups say was
    spent. Only origins whose horizon has ended (D + horizon <= today) count. Errors in
    percent of the actual: MAPE, median APE, bias (mean signed error) and WAPE (sum of
    absolute errors over the sum of actuals), and `coverage`, the share of actuals inside the
    80 % interval; and the same errors for the naive baseline (the last 7 days' mean)."""
    if not 1 <= horizon <= days:
        raise ApiError("Invalid horizon.", fields={"horizon": [f"From 1 to --days ({days})."]})
    dims = dimensions("dimension", dimension)
    if len(dims) != 1:
        raise ApiError("Invalid dimension.", fields={"dimension": ["Name one dimension."]})
    now = now or timezone.now()
    utc = UTC_ZONE
    today = now.astimezone(UTC).date()
    first_origin = today - timedelta(days=days)
    found, source, truncated = _daily(
        principal,
        group_by=(dims[0],),
        filters={},
        since=_local_midnight(first_origin - timedelta(days=window), utc),
        until=_local_midnight(today, utc),
        tz=utc,
    )
    horizons = sorted({1, horizon})
    overall = {h: _Errors([]) for h in horizons}
    baseline = {h: _Errors([]) for h in horizons}
    rows = []
    skipped = 0
    for (value,), daily in sorted(found.items(), key=lambda kv: str(kv[0][0])):
        mine = {h: _Errors([]) for h in horizons}
        origin = first_origin
        while origin + timedelta(days=horizon) <= today:
            model = fit(daily, start=origin, window=window)
            if isinstance(model, Insufficient):
                skipped += 1
                origin += timedelta(days=1)
                continue
            begins = _local_midnight(origin, utc)
            for h in horizons:
                ends = _local_midnight(origin + timedelta(days=h), utc)
                forecast = project(model, since=begins, until=ends, tz=utc)
                actual = sum(daily.get(origin + timedelta(days=i), 0) for i in range(h))
                mine[h].add(forecast, actual)
                overall[h].add(forecast, actual)
                baseline[h].add(_naive(daily, origin, h), actual)
            origin += timedelta(days=1)
        rows.append({dims[0]: value, **{f"h{h}": mine[h].as_dict() for h in horizons}})
    return {
        "as_of": now.isoformat(),
        "dimension": dims[0],
        "days": days,
        "horizon": horizon,
        "window": window,
        "first_origin": first_origin.isoformat(),
        "method": METHOD,
        "source": source,
        "truncated": truncated,
        "overall": {f"h{h}": overall[h].as_dict() for h in horizons},
        "baseline": {f"h{h}": baseline[h].as_dict(interval=False) for h in horizons},
        "insufficient_history": skipped,
        "series": rows,
    }
