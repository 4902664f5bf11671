"""Anomaly detection (issue 13): hours or days whose cost or tokens for one series (a team, a
project, a user, a model, a feature, an agent) lie far outside that series' own recent history.

The method, per series and bucket t (every figure from usage.rollups, so it agrees with the
ledger):

- the baseline is a set of earlier buckets of the same series:
  - days: the same weekday of the previous 8 weeks when the series has at least 3 weeks of
    history (weekly seasonality), else the days of the same kind (weekday or weekend) of the
    previous 14 days (needs 7 days and 3 such days);
  - hours: the same hour of the previous 28 days' days of the same kind (weekday or weekend)
    when the series has 14 days of history, else the same hour of the same kind of day of the
    previous 14 days (needs 7 days and 3 such days);
- expected = the median of the baseline; scale = 1.4826 x its median absolute deviation (the
  robust standard deviation), or the series' pooled noise if larger (1.4826 x the median
  week-over-week difference of the previous 28 days / sqrt 2; hours: day-over-day, 7 days), so
  3-4 same weekdays cannot make the range implausibly tight; at least 10 % of expected and a
  floor (1 US cent of cost, 1,000 tokens), so a flat series does not turn noise into alarms;
- score = (value - expected) / scale; |score| >= the threshold (default 4) is an anomaly, `up`
  or `down`; the expected range is expected +/- threshold x scale (never below 0).

Median and MAD ignore a few outliers, so one earlier spike in the window does not hide the next.
A bucket with no usage counts as 0 once a series has started. A series without the history a
method needs is listed under `insufficient_history` with what it has and needs; if no series in
the range has it, the request is a 400 naming `since`.

Drivers: for an anomalous bucket, each driver dimension (model, user, feature, agent, and the
project under a team) splits the series; a driver's excess is its value minus its median over
the days of the same kind (weekday or weekend) of the previous 14 days (days) or the same hour
of those of the previous 7 days (hours); the largest
positive excesses (for a drop: the largest shortfalls) explain it, with their share of the
series' excess.
"""

from __future__ import annotations

import statistics
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, field_validator

from budgets.deliveries import Notice, notices_deliver
from reporting.models import Anomaly
from reporting.publisher import publisher
from reporting.reports import ALIASES, DIMENSIONS
from tokenmgr_project.core.actions import validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.selectors import aggregate_for, parse_range

# The dimensions a series may be (a scope or an attribution the rollups keep).
SERIES_DIMENSIONS = ("team_id", "project_id", "user_id", "model", "feature", "agent", "provider")
DRIVER_DIMENSIONS = ("model", "user_id", "feature", "agent", "project_id")
DEFAULT_THRESHOLD = 4.0
REL_FLOOR = 0.10
COST_FLOOR = rollups.UNITS_PER_USD // 100  # 1 US cent
TOKENS_FLOOR = 1_000
MAD_SCALE = 1.4826
# Days: weekly seasonality from 3 same weekdays (of the previous 8 weeks), else 14 days (>= 7).
DAY_SEASON_WEEKS = 8
DAY_SEASON_MIN = 3
DAY_WINDOW = 14
DAY_MIN_HISTORY = 7
# Hours: the same hour of 28 days' same day-kind from 14 days of history, else of 7-14 days.
HOUR_SEASON_DAYS = 28
HOUR_SEASON_MIN_DAYS = 14
HOUR_WINDOW_DAYS = 14
HOUR_MIN_HISTORY_DAYS = 7
MIN_BASELINE = 4
MIN_BASELINE_OF = {"day": DAY_SEASON_MIN, "hour": 3}
MIN_PAIRS = 7
SQRT2 = 2**0.5
DRIVERS_SHOWN = 3
DEFAULT_DRIVERS = 10  # anomalies whose drivers one request works out (largest scores first)
MAX_DRIVERS = 50
MAX_RANGE_DAYS = {"day": 400, "hour": 92}
MAX_SERIES_BUCKETS = 600_000  # series x buckets one request may read
_UTC = zoneinfo.ZoneInfo("UTC")
STEP = {"day": timedelta(days=1), "hour": timedelta(hours=1)}
METHOD = (
    "median and 1.4826 x MAD of the series' own earlier buckets (days: the same weekday of 8 "
    "weeks, else the same kind of day of 14 days; hours: the same hour of the same kind of "
    "day of 28 days, else of 14 days); scale at least the pooled week-over-week noise, 10 % "
    "of expected and 1 cent / 1,000 tokens"
)
Granularity = Literal["hour", "day"]
Metric = Literal["cost", "tokens"]


class AnomaliesIn(BaseModel):
    """GET /anomalies parameters (query string or /signals data); every name is checked."""

    model_config = ConfigDict(extra="forbid")

    dimension: str = Field("team_id", description=f"One of {', '.join(SERIES_DIMENSIONS)}.")
    metric: Metric = "cost"
    granularity: Granularity = "day"
    since: str | None = Field(None, description="ISO 8601; default: 7 days before until.")
    until: str | None = Field(None, description="ISO 8601; default: now (whole buckets only).")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=2, le=50, description="Robust z-score.")
    direction: Literal["up", "down", "both"] = "both"
    drivers: int = Field(DEFAULT_DRIVERS, ge=0, le=MAX_DRIVERS)
    series: str | None = Field(None, max_length=128, description="Only this series.")
    team_id: str | None = Field(None, max_length=128)
    project_id: str | None = Field(None, max_length=128)
    provider: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)

    @field_validator("threshold", "drivers", mode="before")
    @classmethod
    def _number_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value) if "." in value else int(value)
            except ValueError:
                return value
        return value


@dataclass(slots=True)
class Finding:
    """One anomalous bucket of one series."""

    dimension: str
    series: str
    team_id: str
    project_id: str
    granularity: str
    metric: str
    bucket: datetime
    value: int
    expected: int
    lower: int
    upper: int
    score: float
    method: str
    drivers: list[dict[str, Any]] | None = None

    @property
    def direction(self) -> str:
        return "up" if self.value >= self.expected else "down"

    @property
    def key(self) -> tuple[str, str, str, str, str, str, datetime]:
        return (
            self.dimension,
            self.series,
            self.team_id,
            self.project_id,
            self.granularity,
            self.metric,
            self.bucket,
        )


@dataclass(slots=True)
class Detection:
    findings: list[Finding]
    # The latest bucket's verdict per series (for resolution): key → in range?
    latest_in_range: dict[tuple[str, str, str], bool] = field(default_factory=dict)
    insufficient: list[dict[str, Any]] = field(default_factory=list)
    evaluated_series: int = 0
    truncated: bool = False
    source: str = "rollups"


# --- the statistics --------------------------------------------------------------------------


def baseline_indexes(
    weekend: Sequence[bool], t: int, start: int, granularity: str
) -> tuple[list[int], str] | None:
    """Indexes of the earlier buckets t is compared with, and the method's name; None when the
    series (started at index `start`) lacks the history. `weekend[i]`: bucket i is on a
    Saturday or Sunday (UTC); buckets are consecutive."""
    history = t - start
    kind = weekend[t]
    if granularity == "day":
        if history >= DAY_SEASON_MIN * 7:
            idx = [t - 7 * k for k in range(1, DAY_SEASON_WEEKS + 1) if t - 7 * k >= start]
            return idx, "same weekday, previous 8 weeks"
        if history >= DAY_MIN_HISTORY:
            idx = [i for i in range(max(start, t - DAY_WINDOW), t) if weekend[i] == kind]
            return idx, "same kind of day, previous 14 days"
        return None
    days = history // 24
    if days >= HOUR_SEASON_MIN_DAYS:
        idx = [
            i
            for i in range(t - 24, max(start, t - 24 * HOUR_SEASON_DAYS) - 1, -24)
            if weekend[i] == kind
        ]
        if len(idx) >= MIN_BASELINE:
            return idx, "same hour, same kind of day, previous 28 days"
    if days >= HOUR_MIN_HISTORY_DAYS:
        idx = [
            i
            for i in range(t - 24, max(start, t - 24 * HOUR_WINDOW_DAYS) - 1, -24)
            if weekend[i] == kind
        ]
        return idx, "same hour, same kind of day, previous 14 days"
    return None


def need_text(granularity: str) -> str:
    return (
        f"{DAY_MIN_HISTORY} days of history (weekly seasonality from {DAY_SEASON_MIN * 7})"
        if granularity == "day"
        else f"{HOUR_MIN_HISTORY_DAYS} days of hourly history (day kinds from "
        f"{HOUR_SEASON_MIN_DAYS})"
    )


def noise_scale(values: Sequence[int], t: int, start: int, granularity: str) -> float:
    """The series' noise from many pairs: 1.4826 x the median |v(i) - v(i - lag)| / sqrt(2)
    over the buckets before t (lag: a week of days, else a day; a day of hours), so a baseline
    of only 3-4 same weekdays cannot make the expected range implausibly tight. 0 with fewer
    than MIN_PAIRS pairs."""
    spans: tuple[tuple[int, int], ...] = (
        ((7, 28), (1, DAY_WINDOW)) if granularity == "day" else ((24, 24 * HOUR_MIN_HISTORY_DAYS),)
    )
    for lag, span in spans:
        lo = max(start + lag, t - span)
        if t - lo >= MIN_PAIRS:
            diffs = [abs(values[i] - values[i - lag]) for i in range(lo, t)]
            return MAD_SCALE * statistics.median(diffs) / SQRT2
    return 0.0


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def expected_range(
    values: Sequence[int], metric: str, threshold: float, noise: float = 0.0
) -> tuple[int, float]:
    """(expected, scale) of a baseline: its median, and the larger of its robust deviation and
    the series' pooled noise, floored."""
    expected = _median(sorted(values))
    mad = _median(sorted(abs(v - expected) for v in values))
    floor = COST_FLOOR if metric == "cost" else TOKENS_FLOOR
    scale = max(MAD_SCALE * mad, noise, REL_FLOOR * expected, floor)
    return round(expected), scale


def score_series(
    values: Sequence[int],
    buckets: Sequence[datetime],
    *,
    first: int,
    granularity: str,
    metric: str,
    threshold: float,
) -> tuple[list[tuple[int, int, int, int, float, str]], bool | None, bool]:
    """Every scored bucket from index `first` on: (index, expected, lower, upper, score,
    method) for those outside the range; whether the last bucket is in range (None: not
    scored); whether any bucket had the history to be scored."""
    start = next((i for i, v in enumerate(values) if v), None)
    out: list[tuple[int, int, int, int, float, str]] = []
    last_in_range: bool | None = None
    scored = False
    if start is None:
        return out, None, False
    per_day = 1 if granularity == "day" else 24
    weekend = [b.weekday() >= 5 for b in buckets]
    noise_of: dict[int, float] = {}  # hours: one pooled noise per day
    for t in range(max(first, start), len(values)):
        found = baseline_indexes(weekend, t, start, granularity)
        if found is None:
            continue
        idx, method = found
        if len(idx) < MIN_BASELINE_OF[granularity]:
            continue
        scored = True
        day = t // per_day
        if day not in noise_of:
            noise_of[day] = noise_scale(values, day * per_day, start, granularity)
        expected, scale = expected_range([values[i] for i in idx], metric, threshold, noise_of[day])
        score = (values[t] - expected) / scale
        inside = abs(score) < threshold
        if t == len(values) - 1:
            last_in_range = inside
        if not inside:
            lower = max(0, round(expected - threshold * scale))
            upper = round(expected + threshold * scale)
            out.append((t, expected, lower, upper, score, method))
    return out, last_in_range, scored


# --- reading the series ----------------------------------------------------------------------


def _floor(at: datetime, granularity: str) -> datetime:
    at = at.astimezone(UTC)
    if granularity == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(minute=0, second=0, microsecond=0)


def history_span(granularity: str) -> timedelta:
    return timedelta(days=DAY_SEASON_WEEKS * 7) if granularity == "day" else timedelta(days=28)


METRIC_MEASURES = {"cost": ("cost_units",), "tokens": ("input_tokens", "output_tokens")}


def _metric_value(values: dict[str, int], metric: str) -> int:
    if metric == "cost":
        return values["cost_units"]
    return values["input_tokens"] + values["output_tokens"]


def _series_keys(dimension: str) -> list[str]:
    """What a series is grouped by: a project is a project of one team."""
    return ["team_id", "project_id"] if dimension == "project_id" else [dimension]


def _scope_of(dimension: str, key: tuple[Any, ...]) -> tuple[str, str, str]:
    """(series, team_id, project_id) of a grouped key."""
    if dimension == "project_id":
        return key[1], key[0], key[1]
    if dimension == "team_id":
        return key[0], key[0], ""
    return key[0], "", ""


def detect(
    principal: Principal,
    *,
    dimension: str,
    metric: str,
    granularity: str,
    since: datetime,
    until: datetime,
    threshold: float = DEFAULT_THRESHOLD,
    direction: str = "both",
    filters: dict[str, str] | None = None,
    series: str | None = None,
) -> Detection:
    """Anomalies in whole buckets of [since, until) for every series of `dimension` the
    caller may see, scored against history read from before `since`."""
    filters = dict(filters or {})
    since, until = _floor(since, granularity), _floor(until, granularity)
    step = STEP[granularity]
    if since >= until:
        raise ApiError(
            "Invalid time range.",
            fields={"until": [f"Must be at least one whole {granularity} after since."]},
        )
    start = since - history_span(granularity)
    buckets = [start + step * i for i in range(int((until - start) / step))]
    if series is not None:
        filters[dimension] = series
    keys = _series_keys(dimension)
    limit = MAX_SERIES_BUCKETS
    result = aggregate_for(
        principal,
        filters=filters,
        group_by=keys,
        since=start,
        until=until,
        interval=granularity,
        tz=_UTC,
        limit=limit,
        check=False,  # history before retention's cutoff is read from the rollups
        measures=METRIC_MEASURES[metric],
    )
    index = {b: i for i, b in enumerate(buckets)}
    by_series: dict[tuple[Any, ...], list[int]] = {}
    for key, measures in result.rows.items():
        i = index.get(key[-1].astimezone(UTC))
        if i is None:
            continue
        series_values = by_series.setdefault(key[:-1], [0] * len(buckets))
        series_values[i] += _metric_value(measures, metric)
    first = index[since]
    out = Detection([], truncated=result.truncated, source=result.plan.source)
    for group, values in sorted(by_series.items()):
        name, team_id, project_id = _scope_of(dimension, group)
        found, last_in_range, scored = score_series(
            values,
            buckets,
            first=first,
            granularity=granularity,
            metric=metric,
            threshold=threshold,
        )
        if not scored:
            if any(values[first:]):
                started = next(i for i, v in enumerate(values) if v)
                out.insufficient.append(
                    {
                        "series": name,
                        "team_id": team_id,
                        "project_id": project_id,
                        "first_usage": buckets[started].isoformat(),
                        "need": need_text(granularity),
                    }
                )
            continue
        out.evaluated_series += 1
        if last_in_range is not None:
            out.latest_in_range[(name, team_id, project_id)] = last_in_range
        for t, expected, lower, upper, score, method in found:
            finding = Finding(
                dimension=dimension,
                series=name,
                team_id=team_id,
                project_id=project_id,
                granularity=granularity,
                metric=metric,
                bucket=buckets[t],
                value=values[t],
                expected=expected,
                lower=lower,
                upper=upper,
                score=score,
                method=method,
            )
            if direction in ("both", finding.direction):
                out.findings.append(finding)
    out.findings.sort(key=lambda f: (-abs(f.score), f.bucket, f.series))
    return out


# --- drivers ---------------------------------------------------------------------------------


def drivers_for(principal: Principal, finding: Finding, filters: dict[str, str]) -> list[dict]:
    """What explains one anomaly: per driver dimension, the values whose excess over their own
    recent median is largest (a drop: the largest shortfall), with their share of the series'
    excess; the largest across dimensions first. One grouped read of the series' rollups over
    the bucket and its driver window (the days of the same kind, weekday or weekend, of the
    previous 14 days; an hour: the same hour of those of the previous 7 days), folded per
    dimension."""
    step = STEP[finding.granularity]
    if finding.granularity == "day":
        window, every = timedelta(days=DAY_WINDOW), step
    else:
        window, every = timedelta(days=HOUR_MIN_HISTORY_DAYS), timedelta(days=1)
    base = {**filters, finding.dimension: finding.series}
    if finding.dimension == "project_id":
        base["team_id"] = finding.team_id
    dims = [
        d
        for d in DRIVER_DIMENSIONS
        if d != finding.dimension and (d != "project_id" or finding.dimension == "team_id")
    ]
    # The same kind of day (weekday or weekend) as the anomaly's, as the series' own baseline:
    # a Saturday's driver is not held against the weekdays' level.
    weekend = finding.bucket.weekday() >= 5
    baseline_at = [
        at
        for k in range(1, int(window / every) + 1)
        if ((at := finding.bucket - every * k).weekday() >= 5) == weekend
    ]
    wanted = {finding.bucket, *baseline_at}
    history: dict[str, dict[Any, dict[datetime, int]]] = {d: {} for d in dims}
    for start, end in _driver_ranges(finding.bucket, baseline_at, step):
        result = aggregate_for(
            principal,
            filters=base,
            group_by=dims,
            since=start,
            until=end,
            interval=finding.granularity,
            tz=_UTC,
            limit=500_000,
            check=False,
            measures=METRIC_MEASURES[finding.metric],
        )
        for (*values, period), measures in result.rows.items():
            at = period.astimezone(UTC)
            if at not in wanted:
                continue
            amount = _metric_value(measures, finding.metric)
            for dim, value in zip(dims, values, strict=True):
                seen = history[dim].setdefault(value, {})
                seen[at] = seen.get(at, 0) + amount
    total_excess = finding.value - finding.expected
    sign = 1 if total_excess >= 0 else -1
    out: list[dict[str, Any]] = []
    for dim in dims:
        ranked = []
        for value, seen in history[dim].items():
            actual = seen.get(finding.bucket, 0)
            expected = round(statistics.median(seen.get(b, 0) for b in baseline_at))
            excess = actual - expected
            if excess * sign > 0:
                ranked.append((excess, value, actual, expected))
        ranked.sort(key=lambda r: (-abs(r[0]), str(r[1])))
        for excess, value, actual, expected in ranked[:DRIVERS_SHOWN]:
            out.append(
                {
                    "dimension": dim,
                    "value": value,
                    "actual": _amount(actual, finding.metric),
                    "expected": _amount(expected, finding.metric),
                    "excess": _amount(excess, finding.metric),
                    "share_of_excess": (
                        f"{Decimal(excess * 100) / Decimal(total_excess):.1f}"
                        if total_excess
                        else None
                    ),
                    "_excess": excess,
                }
            )
    out.sort(key=lambda d: (-abs(d["_excess"]), d["dimension"], str(d["value"])))
    for item in out:
        del item["_excess"]
    return out


def _driver_ranges(
    bucket: datetime, baseline_at: list[datetime], step: timedelta
) -> list[tuple[datetime, datetime]]:
    """The time ranges a driver read covers: days are contiguous; hours are the same hour of
    earlier days, read hour by hour rather than the 7 days between them."""
    if step == STEP["day"]:
        return [(min(baseline_at), bucket + step)]
    return [(at, at + step) for at in sorted([*baseline_at, bucket])]


def _amount(value: int, metric: str) -> str | int:
    return rollups.units_text(value) if metric == "cost" else value


# --- the endpoint ----------------------------------------------------------------------------


def _dimension(raw: str) -> str:
    dim = ALIASES.get(raw.strip(), raw.strip())
    if dim not in SERIES_DIMENSIONS or dim not in DIMENSIONS:
        raise ApiError(
            "Unknown dimension.",
            fields={
                "dimension": [f"Unknown dimension {raw!r}; use {', '.join(SERIES_DIMENSIONS)}."]
            },
        )
    return dim


def _same_series_as_job(principal: Principal, dimension: str) -> bool:
    """Whether the caller's series of `dimension` are the organisation-wide job's (so its
    stored anomalies, their state and drivers, are about the same usage): global callers', a
    team key's teams and projects, a project key's projects."""
    if principal.is_global:
        return True
    if principal.project_id:
        return dimension == "project_id"
    return dimension in ("team_id", "project_id")


def finding_body(finding: Finding) -> dict[str, Any]:
    return {
        "dimension": finding.dimension,
        "series": finding.series,
        "team_id": finding.team_id,
        "project_id": finding.project_id,
        "granularity": finding.granularity,
        "metric": finding.metric,
        "bucket": finding.bucket.isoformat(),
        "value": _amount(finding.value, finding.metric),
        "expected": _amount(finding.expected, finding.metric),
        "expected_range": [
            _amount(finding.lower, finding.metric),
            _amount(finding.upper, finding.metric),
        ],
        "score": f"{finding.score:.2f}",
        "direction": finding.direction,
        "method": finding.method,
        "drivers": finding.drivers,
    }


def anomalies_list(principal: Principal, data: Any) -> dict[str, Any]:
    """GET /anomalies: detection over the range in the caller's scope, with the stored state
    (id, status, alerted, resolved) of anomalies the beat job recorded."""
    params = validate(AnomaliesIn, data)
    dimension = _dimension(params.dimension)
    since, until = parse_range({"since": params.since, "until": params.until})
    until = until or timezone.now()
    span = timedelta(days=7)
    since = since or until - span
    if since >= until:
        raise ApiError("Invalid time range.", fields={"since": ["Must be before until."]})
    if until - since > timedelta(days=MAX_RANGE_DAYS[params.granularity]):
        days = MAX_RANGE_DAYS[params.granularity]
        raise ApiError(
            "Range too long.",
            fields={"since": [f"At most {days} days of {params.granularity}s at once."]},
        )
    filters = {
        name: value
        for name in ("team_id", "project_id", "provider", "model")
        if (value := getattr(params, name)) not in (None, "")
    }
    found = detect(
        principal,
        dimension=dimension,
        metric=params.metric,
        granularity=params.granularity,
        since=since,
        until=until,
        threshold=params.threshold,
        direction=params.direction,
        filters=filters,
        series=params.series,
    )
    if not found.evaluated_series and found.insufficient:
        raise ApiError(
            "Not enough history.",
            fields={
                "since": [
                    f"Anomaly detection by {params.granularity} needs "
                    f"{need_text(params.granularity)} before a bucket; the earliest usage in "
                    f"range starts {min(i['first_usage'] for i in found.insufficient)}."
                ]
            },
        )
    stored: dict[tuple[Any, ...], Anomaly] = {}
    if _same_series_as_job(principal, dimension) and not filters and params.series is None:
        stored = {
            (a.dimension, a.series, a.team_id, a.project_id, a.granularity, a.metric, a.bucket): a
            for a in Anomaly.objects.filter(
                dimension=dimension,
                granularity=params.granularity,
                metric=params.metric,
                bucket__in=[f.bucket for f in found.findings],
            )
        }
    for finding in found.findings[: params.drivers]:
        row = stored.get(finding.key)
        finding.drivers = (
            row.drivers
            if row is not None and row.drivers
            else drivers_for(principal, finding, filters)
        )
    items = []
    for finding in found.findings:
        body = finding_body(finding)
        row = stored.get(finding.key)
        if finding.drivers is None and row is not None and row.drivers:
            body["drivers"] = row.drivers
        body.update(
            id=row.pk if row else None,
            status=row.status if row else None,
            alerted_at=row.alerted_at.isoformat() if row and row.alerted_at else None,
            resolved_at=row.resolved_at.isoformat() if row and row.resolved_at else None,
        )
        items.append(body)
    return {
        "dimension": dimension,
        "metric": params.metric,
        "granularity": params.granularity,
        "since": _floor(since, params.granularity).isoformat(),
        "until": _floor(until, params.granularity).isoformat(),
        "threshold": params.threshold,
        "filters": filters,
        "method": METHOD,
        "series_evaluated": found.evaluated_series,
        "insufficient_history": found.insufficient,
        "truncated": found.truncated,
        "source": found.source,
        "anomalies": items,
    }


# --- the beat job: record, alert once, resolve ---------------------------------------------------

# What the job watches: cost by team, project, model, feature and agent, by hour and by day.
JOB_DIMENSIONS = ("team_id", "project_id", "model", "feature", "agent")
JOB_LOOKBACK = {"hour": timedelta(hours=6), "day": timedelta(days=2)}
_ORGANISATION = Principal(scope="global", is_staff=True)


@dataclass(slots=True)
class Recorded:
    new: list[Anomaly]
    resolved: list[Anomaly]


def anomalies_record(*, now: datetime | None = None) -> Recorded:
    """Detect over the last whole hours and days (organisation-wide), store what is new with
    its drivers, alert each new anomaly once (alert channels and the live dashboard), and
    resolve open anomalies whose series' latest whole bucket is back in range."""
    now = now or timezone.now()
    recorded = Recorded([], [])
    for granularity in ("hour", "day"):
        until = _floor(now, granularity)
        since = until - JOB_LOOKBACK[granularity]
        for dimension in JOB_DIMENSIONS:
            found = detect(
                _ORGANISATION,
                dimension=dimension,
                metric="cost",
                granularity=granularity,
                since=since,
                until=until,
            )
            recorded.new += _store(found.findings)
            recorded.resolved += _resolve(dimension, granularity, found.latest_in_range, now)
    _alert(recorded.new, now)
    return recorded


def _store(findings: list[Finding]) -> list[Anomaly]:
    new = []
    for finding in findings:
        anomaly, created = Anomaly.objects.get_or_create(
            dimension=finding.dimension,
            series=finding.series,
            team_id=finding.team_id,
            project_id=finding.project_id,
            granularity=finding.granularity,
            metric=finding.metric,
            bucket=finding.bucket,
            defaults={
                "value": finding.value,
                "expected": finding.expected,
                "lower": finding.lower,
                "upper": finding.upper,
                "score": Decimal(f"{max(min(finding.score, 9.9e9), -9.9e9):.2f}"),
                "direction": finding.direction,
                "drivers": drivers_for(_ORGANISATION, finding, {}),
            },
        )
        if created:
            new.append(anomaly)
    return new


def _resolve(
    dimension: str,
    granularity: str,
    latest_in_range: dict[tuple[str, str, str], bool],
    now: datetime,
) -> list[Anomaly]:
    back = [key for key, inside in latest_in_range.items() if inside]
    resolved = []
    for series, team_id, project_id in back:
        rows = list(
            Anomaly.objects.filter(
                status=Anomaly.Status.OPEN,
                dimension=dimension,
                series=series,
                team_id=team_id,
                project_id=project_id,
                granularity=granularity,
            )
        )
        for row in rows:
            claimed = Anomaly.objects.filter(pk=row.pk, status=Anomaly.Status.OPEN).update(
                status=Anomaly.Status.RESOLVED, resolved_at=now
            )
            if claimed:
                row.status, row.resolved_at = Anomaly.Status.RESOLVED, now
                resolved.append(row)
    if resolved:
        for row in resolved:
            publisher.dashboard("anomaly", anomaly=anomaly_payload(row))
    return resolved


def anomaly_payload(row: Anomaly) -> dict[str, Any]:
    """A stored anomaly as the API, webhooks and the live feed show it."""
    return {
        "type": "anomaly",
        "id": row.pk,
        "dimension": row.dimension,
        "series": row.series,
        "team_id": row.team_id,
        "project_id": row.project_id,
        "granularity": row.granularity,
        "metric": row.metric,
        "bucket": row.bucket.isoformat(),
        "value": _amount(row.value, row.metric),
        "expected": _amount(row.expected, row.metric),
        "expected_range": [_amount(row.lower, row.metric), _amount(row.upper, row.metric)],
        "score": f"{row.score:.2f}",
        "direction": row.direction,
        "drivers": row.drivers,
        "status": row.status,
        "message": anomaly_message(row),
        "detected_at": row.detected_at.isoformat() if row.detected_at else None,
        "resolved_at": row.resolved_at.isoformat() if row.resolved_at else None,
    }


def anomaly_message(row: Anomaly) -> str:
    label = {"team_id": "team", "project_id": "project", "user_id": "user"}.get(
        row.dimension, row.dimension
    )
    when = (
        f"{row.bucket:%Y-%m-%d}" if row.granularity == "day" else f"{row.bucket:%Y-%m-%d %H:00} UTC"
    )
    unit = " USD" if row.metric == "cost" else " tokens"
    value, expected = _amount(row.value, row.metric), _amount(row.expected, row.metric)
    lead = ""
    if row.drivers:
        top = row.drivers[0]
        lead = f"; mostly {top['dimension']} {top['value']} ({_signed(top['excess'])})"
    state = "back in range" if row.status == Anomaly.Status.RESOLVED else f"score {row.score:.1f}"
    return (
        f"Anomaly: {label} {row.series} {row.metric} {value}{unit} in {when} against an expected "
        f"{expected}{unit} ({state}){lead}"
    )[:500]


def _signed(amount: str | int) -> str:
    text = str(amount)
    return text if text.startswith("-") else f"+{text}"


def _alert(new: list[Anomaly], now: datetime) -> int:
    """Each anomaly's alert exactly once: claimed by setting alerted_at, then delivered through
    the alert channels (budgets.deliveries, retried like budget alerts) and the dashboard."""
    claimed = []
    for row in new:
        if Anomaly.objects.filter(pk=row.pk, alerted_at__isnull=True).update(alerted_at=now):
            row.alerted_at = now
            claimed.append(row)
    notices = []
    for row in claimed:
        payload = anomaly_payload(row)
        notices.append(
            Notice(
                kind="anomaly",
                message=payload["message"],
                payload=payload,
                lines=[
                    f"Series: {row.dimension} = {row.series}",
                    f"Expected range: {payload['expected_range'][0]} to "
                    f"{payload['expected_range'][1]}",
                    *(
                        f"Driver: {d['dimension']} {d['value']}: {_signed(d['excess'])}"
                        for d in row.drivers[:DRIVERS_SHOWN]
                    ),
                ],
                team_id=row.team_id,
                project_id=row.project_id,
            )
        )
        publisher.dashboard("anomaly", anomaly=payload)
    notices_deliver(notices)
    return len(claimed)
