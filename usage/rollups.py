"""Rollups: the ledger pre-aggregated per UTC hour, and the one engine that answers a total or a
grouped series from them, from the raw ledger only for what they cannot say.

Two tables (usage.models): `UsageRollup` per combination of every FINE_DIMENSIONS value, and
`ModelRollup` per COARSE_DIMENSIONS only (far fewer rows: reports by team, project, provider or
model read it). Database triggers on the ledger (installed by migration 0005 from `trigger_sql`)
add every inserted row to both in the same statement, whichever path inserted it (COPY, INSERT,
the staged insert), so a report never disagrees with the ledger. Retention deletes raw rows and
leaves rollups (`LedgerPurge` records how far). Repricing and `rebuild` adjust them explicitly.

A query is split by hour: an hour wholly inside the range, and not cut by a bucket boundary of
the requested interval in the requested time zone, is read from a rollup; the rest (sub-hour
edges of the range, hours a half-hour time zone's days cut in two) from the raw ledger; a
dimension rollups do not hold (workflow, conversation, status) makes it all ledger. Results
say which (`source`).
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import (
    BigIntegerField,
    Case,
    F,
    IntegerField,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Cast, Coalesce, Round, Trunc

from tokenmgr_project.core.errors import ApiError
from usage import pricing
from usage.models import (
    LedgerPurge,
    ModelDayRollup,
    ModelRollup,
    RollupMeasures,
    TokenUsage,
    UsageRollup,
)

FINE_DIMENSIONS = (
    "team_id",
    "project_id",
    "user_id",
    "feature",
    "agent",
    "task_type",
    "provider",
    "model",
)
COARSE_DIMENSIONS = ("team_id", "project_id", "provider", "model")
SHORT_OUTPUT_TOKENS = 256
UNITS_PER_USD = 10**pricing.LEDGER_COST_PLACES
HOUR = timedelta(hours=1)
INTERVALS = ("hour", "day", "week", "month")
MAX_BUCKETS = 10_000
# More hours than this that a time zone's buckets cut in two: the whole query reads the ledger.
MAX_SPLIT_HOURS = 500

_COST = f"CAST(ROUND({{r}}cost * {UNITS_PER_USD}) AS BIGINT)"
_SHORT = f"{{r}}output_tokens <= {SHORT_OUTPUT_TOKENS} AND {{r}}status = 'success'"


def _when(condition: str, value: str) -> str:
    return f"CASE WHEN {condition} THEN {value} ELSE 0 END"


# Each measure as the SQL of one ledger row's contribution ({r}: the row's prefix), summed.
MEASURES: dict[str, str] = {
    "requests": "1",
    "input_tokens": "{r}input_tokens",
    "output_tokens": "{r}output_tokens",
    "cache_read_tokens": "{r}cache_read_tokens",
    "cache_write_tokens": "{r}cache_write_tokens",
    "cost_units": _COST,
    "errors": _when("{r}status = 'error'", "1"),
    "error_cost_units": _when("{r}status = 'error'", _COST),
    "unpriced_requests": _when("{r}unpriced", "1"),
    "unpriced_tokens": _when("{r}unpriced", "{r}input_tokens + {r}output_tokens"),
    "estimated_requests": _when("{r}estimated", "1"),
    "estimated_cost_units": _when("{r}estimated", _COST),
    "cache_hits": _when("{r}cache_hit", "1"),
    "latency_ms_sum": "COALESCE({r}latency_ms, 0)",
    "latency_count": _when("{r}latency_ms IS NOT NULL", "1"),
    "short_requests": _when(_SHORT, "1"),
    "short_input_tokens": _when(_SHORT, "{r}input_tokens"),
    "short_output_tokens": _when(_SHORT, "{r}output_tokens"),
    "short_cost_units": _when(_SHORT, _COST),
}
# The hourly rollups, smallest first: a query reads the first that holds its dimensions.
TABLES: tuple[tuple[type[RollupMeasures], tuple[str, ...]], ...] = (
    (ModelRollup, COARSE_DIMENSIONS),
    (UsageRollup, FINE_DIMENSIONS),
)
# ModelRollup per UTC day: the whole days of a range whose buckets are whole UTC days.
DAY_TABLE = ModelDayRollup
# Every rollup the trigger keeps: (table, dimensions, grain).
ROLLUPS: tuple[tuple[type[RollupMeasures], tuple[str, ...], str], ...] = (
    *((m, d, "hour") for m, d in TABLES),
    (ModelDayRollup, COARSE_DIMENSIONS, "day"),
)
DAY = timedelta(days=1)
_LEDGER = TokenUsage._meta.db_table


def _bucket_sql(vendor: str, column: str, grain: str = "hour") -> str:
    if vendor == "postgresql":
        return f"date_trunc('{grain}', {column}, 'UTC')"
    return f"strftime('%Y-%m-%d {'%H' if grain == 'hour' else '00'}:00:00', {column})"


def upsert_sql(
    vendor: str,
    model: type[RollupMeasures],
    dims: Sequence[str],
    source: str,
    *,
    per_row: bool = False,
    grain: str = "hour",
) -> str:
    """INSERT … ON CONFLICT DO UPDATE adding ledger rows into one rollup (per `grain`): those
    of table `source` grouped, or (`per_row`, a SQLite row trigger) the one row NEW."""
    table = model._meta.db_table
    prefix = "NEW." if per_row else ""
    names = ["bucket", *dims, *MEASURES]
    bucket = _bucket_sql(vendor, f"{prefix}occurred_at", grain)
    values = [bucket, *(f"{prefix}{d}" for d in dims)]
    update = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in MEASURES)
    conflict = ", ".join(["bucket", *dims])
    if per_row:
        select = f"SELECT {', '.join(values + [e.format(r=prefix) for e in MEASURES.values()])}"
        select += " WHERE true"  # SQLite: an upsert's SELECT needs a WHERE (parser ambiguity)
    else:
        sums = [f"SUM({expr.format(r='')})" for expr in MEASURES.values()]
        groups = ", ".join(str(i + 1) for i in range(len(values)))
        # ORDER BY: concurrent inserts lock rollup rows in one order, so never deadlock.
        select = (
            f"SELECT {', '.join(values + sums)} FROM {source} WHERE true "
            f"GROUP BY {groups} ORDER BY {groups}"
        )
    return (
        f"INSERT INTO {table} ({', '.join(names)}) {select} "
        f"ON CONFLICT ({conflict}) DO UPDATE SET {update}"
    )


def trigger_sql(vendor: str) -> list[str]:
    """The statements that install the ledger's rollup trigger (frozen into migration 0007)."""
    if vendor == "postgresql":
        body = ";\n".join(upsert_sql(vendor, m, d, "new_rows", grain=g) for m, d, g in ROLLUPS)
        return [
            "CREATE OR REPLACE FUNCTION usage_rollup_add() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN\n{body};\nRETURN NULL; END $$",
            f"CREATE TRIGGER usage_rollup_insert AFTER INSERT ON {_LEDGER} "
            "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION usage_rollup_add()",
        ]
    body = ";\n".join(upsert_sql(vendor, m, d, "", per_row=True, grain=g) for m, d, g in ROLLUPS)
    return [
        f"CREATE TRIGGER usage_rollup_insert AFTER INSERT ON {_LEDGER} "
        f"FOR EACH ROW BEGIN\n{body};\nEND"
    ]


def drop_trigger_sql(vendor: str) -> list[str]:
    if vendor == "postgresql":
        return [
            f"DROP TRIGGER IF EXISTS usage_rollup_insert ON {_LEDGER}",
            "DROP FUNCTION IF EXISTS usage_rollup_add()",
        ]
    return ["DROP TRIGGER IF EXISTS usage_rollup_insert"]


# --- money ---------------------------------------------------------------------------------------


def units_to_money(units: int) -> Decimal:
    return Decimal(int(units)).scaleb(-pricing.LEDGER_COST_PLACES)


def units_text(units: int) -> str:
    """Units as `usage.pricing.money` shows the same amount ("0.00725", "12", "-0.5")."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_USD)
    if not frac:
        return f"{sign}{whole}" if whole else "0"
    return f"{sign}{whole}.{frac:0{pricing.LEDGER_COST_PLACES}d}".rstrip("0")


def money_to_units(value: Decimal) -> int:
    return int(pricing.ledger_cost(value).scaleb(pricing.LEDGER_COST_PLACES))


# --- retention -----------------------------------------------------------------------------------


def purged_before() -> datetime | None:
    """Raw usage before this instant may have been deleted by retention (rollups remain)."""
    return LedgerPurge.objects.aggregate(at=Max("cutoff"))["at"]


# --- planning a query ----------------------------------------------------------------------------


def parse_tz(raw: str | None, name: str = "tz") -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(raw or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ApiError(
            "Invalid time zone.", fields={name: ["Use an IANA time zone such as Europe/Paris."]}
        ) from None


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + HOUR


def bucket_starts(
    since: datetime, until: datetime, interval: str, tz: zoneinfo.ZoneInfo
) -> list[datetime]:
    """The starts (UTC) of every `interval` bucket in `tz` that meets [since, until): a 400
    naming `interval` past MAX_BUCKETS."""
    local = since.astimezone(tz)
    if interval == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    else:
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if interval == "week":
            start -= timedelta(days=start.weekday())
        elif interval == "month":
            start = start.replace(day=1)
    starts: list[datetime] = []
    naive = start.replace(tzinfo=None)
    while True:
        at = _local_instant(naive, tz)
        if at >= until:
            return starts
        starts.append(at)
        if len(starts) > MAX_BUCKETS:
            raise ApiError(
                "Too many buckets.",
                fields={
                    "interval": [
                        f"The range holds more than {MAX_BUCKETS:,} {interval} buckets: "
                        "use a longer interval or a shorter range."
                    ]
                },
            )
        naive = _next_local(naive, interval)


def _local_instant(naive: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    if tz.key == "UTC":
        return naive.replace(tzinfo=UTC)
    return naive.replace(tzinfo=tz).astimezone(UTC)


def _next_local(naive: datetime, interval: str) -> datetime:
    if interval == "hour":
        return naive + HOUR
    if interval == "day":
        return naive + timedelta(days=1)
    if interval == "week":
        return naive + timedelta(days=7)
    year, month = (naive.year + 1, 1) if naive.month == 12 else (naive.year, naive.month + 1)
    return naive.replace(year=year, month=month)


@dataclass(frozen=True, slots=True)
class Plan:
    """Which hours a rollup answers and which ranges the raw ledger must."""

    table: type[RollupMeasures] | None  # None: the ledger answers everything
    rollup_from: datetime | None = None
    rollup_until: datetime | None = None
    split_hours: tuple[datetime, ...] = ()  # hours inside the rollup range read from the ledger
    ledger_ranges: tuple[tuple[datetime | None, datetime | None], ...] = ()
    reason: str = ""
    # The whole UTC days of the rollup range that DAY_TABLE answers ([day_from, day_until)).
    days: bool = False
    day_from: datetime | None = None
    day_until: datetime | None = None

    def parts(
        self,
    ) -> list[tuple[type[RollupMeasures], list[tuple[datetime | None, datetime | None]]]]:
        """(rollup, ranges): the rollup range split between the day and the hour table (the
        hours before the first whole day and after the last, one query)."""
        if self.table is None:
            return []
        if not self.days:
            return [(self.table, [(self.rollup_from, self.rollup_until)])]
        before, after = (self.rollup_from, self.day_from), (self.day_until, self.rollup_until)
        hours: list[tuple[datetime | None, datetime | None]] = [
            (a, b) for a, b in (before, after) if a is not None and b is not None and a < b
        ]
        out: list[tuple[type[RollupMeasures], list[tuple[datetime | None, datetime | None]]]] = [
            (DAY_TABLE, [(self.day_from, self.day_until)])
        ]
        if hours:
            out.append((self.table, hours))
        return out

    @property
    def source(self) -> str:
        if self.table is None:
            return "ledger"
        return "rollups+ledger" if self.ledger_ranges or self.split_hours else "rollups"


def plan(
    *,
    dimensions: Iterable[str],
    since: datetime | None,
    until: datetime | None,
    interval: str | None = None,
    tz: zoneinfo.ZoneInfo | None = None,
) -> Plan:
    """How to answer a query over [since, until) naming `dimensions` (filters and groups)."""
    needed = set(dimensions)
    table = next((m for m, dims in TABLES if needed <= set(dims)), None)
    if table is None:
        outside = sorted(needed - set(FINE_DIMENSIONS))
        return Plan(None, ledger_ranges=((since, until),), reason=f"by {', '.join(outside)}")
    start = _ceil_hour(since) if since else None
    end = _floor_hour(until) if until else None
    if start and end and start >= end:
        return Plan(None, ledger_ranges=((since, until),), reason="the range is under an hour")
    edges: list[tuple[datetime | None, datetime | None]] = []
    if since and start != since:
        edges.append((since, start))
    if until and end != until:
        edges.append((end, until))
    split: list[datetime] = []
    # In UTC every bucket starts on an hour; elsewhere an offset of :30 or :45 cuts hours.
    if interval and tz is not None and tz.key != "UTC":
        bounds = _known_bounds(table, start, end)
        if bounds:
            for at in bucket_starts(bounds[0], bounds[1], interval, tz or zoneinfo.ZoneInfo("UTC")):
                if at != _floor_hour(at) and bounds[0] <= at < bounds[1]:
                    split.append(_floor_hour(at))
        if len(split) > MAX_SPLIT_HOURS:
            return Plan(
                None,
                ledger_ranges=((since, until),),
                reason=f"{tz} cuts {len(split)} hours into two buckets",
            )
    utc_days = interval is None or (
        interval in ("day", "week", "month") and (tz is None or tz.key == "UTC")
    )
    if table is ModelRollup and utc_days:
        day_from = _ceil_day(start) if start else None
        day_until = _floor_day(end) if end else None
        if day_from is None or day_until is None or day_from < day_until:
            return Plan(table, start, end, (), tuple(edges), "", True, day_from, day_until)
    return Plan(table, start, end, tuple(split), tuple(edges))


def _floor_day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil_day(at: datetime) -> datetime:
    floor = _floor_day(at)
    return floor if floor == at else floor + DAY


def _known_bounds(
    table: type[RollupMeasures], start: datetime | None, end: datetime | None
) -> tuple[datetime, datetime] | None:
    """[start, end) with an open side closed at the rollups' first / last hour."""
    if start and end:
        return start, end
    found = table.objects.aggregate(first=Min("bucket"), last=Max("bucket"))
    if found["first"] is None:
        return None
    return start or found["first"], end or found["last"] + HOUR


def check_retained(plan_: Plan, *, name: str = "since") -> None:
    """A 400 naming `name` when the plan must read raw usage that retention deleted."""
    cutoff = purged_before()
    if cutoff is None:
        return
    ranges = list(plan_.ledger_ranges) + [(h, h + HOUR) for h in plan_.split_hours]
    if any(start is None or start < cutoff for start, _end in ranges):
        why = f" (rollups cannot answer {plan_.reason})" if plan_.reason else ""
        raise ApiError(
            "Raw usage in this range was deleted by retention.",
            fields={
                name: [
                    f"Raw usage before {cutoff.isoformat()} was deleted by retention{why}: "
                    "start at or after it, or use whole hours, a whole-hour time zone and "
                    f"only the dimensions {', '.join(FINE_DIMENSIONS)}."
                ]
            },
        )


# --- answering it --------------------------------------------------------------------------------


def _cost_units() -> Any:
    """A ledger row's cost in units (the trigger's _COST, as an ORM expression)."""
    return Cast(Round(F("cost") * UNITS_PER_USD), output_field=BigIntegerField())


def _ledger_measures() -> dict[str, Any]:
    """MEASURES as ORM aggregates over ledger rows (the raw half of a plan)."""
    cost = _cost_units()
    short = Q(output_tokens__lte=SHORT_OUTPUT_TOKENS, status=TokenUsage.Status.SUCCESS)
    error = Q(status=TokenUsage.Status.ERROR)

    def when(q: Q, value: Any) -> Any:
        return Sum(Case(When(q, then=value), default=Value(0)), output_field=IntegerField())

    # Aliased: an annotation named like a column would shadow it for the measures after it.
    return {
        f"m_{name}": aggregate
        for name, aggregate in {
            "requests": Sum(Value(1), output_field=IntegerField()),
            "input_tokens": Sum("input_tokens"),
            "output_tokens": Sum("output_tokens"),
            "cache_read_tokens": Sum("cache_read_tokens"),
            "cache_write_tokens": Sum("cache_write_tokens"),
            "cost_units": Sum(cost),
            "errors": when(error, Value(1)),
            "error_cost_units": when(error, cost),
            "unpriced_requests": when(Q(unpriced=True), Value(1)),
            "unpriced_tokens": when(Q(unpriced=True), F("input_tokens") + F("output_tokens")),
            "estimated_requests": when(Q(estimated=True), Value(1)),
            "estimated_cost_units": when(Q(estimated=True), cost),
            "cache_hits": when(Q(cache_hit=True), Value(1)),
            "latency_ms_sum": Sum(Coalesce("latency_ms", Value(0))),
            "latency_count": when(Q(latency_ms__isnull=False), Value(1)),
            "short_requests": when(short, Value(1)),
            "short_input_tokens": when(short, F("input_tokens")),
            "short_output_tokens": when(short, F("output_tokens")),
            "short_cost_units": when(short, cost),
        }.items()
    }


def _rollup_measures() -> dict[str, Any]:
    # bigint, not PostgreSQL's numeric sum: the sums then come back as ints, not Decimals.
    return {f"m_{m}": Cast(Sum(m), output_field=BigIntegerField()) for m in MEASURES}


@dataclass(slots=True)
class Result:
    """Grouped totals: `rows` maps (dimension values…, period or None) to measure sums."""

    dimensions: tuple[str, ...]
    plan: Plan
    rows: dict[tuple[Any, ...], dict[str, int]] = field(default_factory=dict)
    truncated: bool = False  # a group limit was reached: some groups are missing
    measures: tuple[str, ...] = tuple(MEASURES)  # what each row holds, in MEASURES order

    def add(self, key: tuple[Any, ...], values: Sequence[Any]) -> None:
        """Add one group's sums (in `measures` order; None for 0)."""
        into = self.rows.get(key)
        if into is None:
            self.rows[key] = {m: int(v or 0) for m, v in zip(self.measures, values, strict=True)}
        else:
            for m, v in zip(self.measures, values, strict=True):
                into[m] += int(v or 0)


def _time_q(column: str, ranges: Iterable[tuple[datetime | None, datetime | None]]) -> Q:
    parts = []
    for start, end in ranges:
        part = Q()
        if start is not None:
            part &= Q(**{f"{column}__gte": start})
        if end is not None:
            part &= Q(**{f"{column}__lt": end})
        if not part:
            return Q()  # unbounded: every row (an empty Q in an OR would drop the others)
        parts.append(part)
    q = Q(pk__in=[])
    for part in parts:
        q |= part
    return q


def aggregate(
    *,
    ledger: QuerySet[TokenUsage],
    filters: dict[str, str],
    group_by: Sequence[str] = (),
    since: datetime | None,
    until: datetime | None,
    interval: str | None = None,
    tz: zoneinfo.ZoneInfo | None = None,
    scope: dict[str, str] | None = None,
    limit: int | None = None,
    check: bool = True,
    measures: Sequence[str] = tuple(MEASURES),
) -> Result:
    """Measure sums over [since, until) grouped by `group_by` (and `interval` buckets in `tz`).
    Only `measures` are summed (default all): a long series of one figure reads faster.

    `ledger` is the caller's already scoped ledger queryset (its filters are applied to the raw
    half); `scope` the same scope as column values for the rollup half (a team/project key).
    `filters` are exact column matches. A 400 if the raw half needs purged usage (`check`).
    At most `limit` groups are read from each half (`truncated` says when more exist)."""
    scope = scope or {}
    dims = tuple(group_by)
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"unknown measures: {sorted(unknown)}")
    measures = tuple(m for m in MEASURES if m in set(measures))
    if any(filters.get(name, value) != value for name, value in scope.items()):
        # A filter outside the caller's scope matches nothing (and says nothing about it).
        empty = plan(dimensions=[], since=since, until=until, interval=interval, tz=tz)
        return Result(dims, empty, measures=measures)
    filters = {name: value for name, value in filters.items() if name not in scope}
    the_plan = plan(
        dimensions=[*filters, *dims, *scope], since=since, until=until, interval=interval, tz=tz
    )
    if check:
        check_retained(the_plan)
    result = Result(dims, the_plan, measures=measures)
    wanted = set(measures)
    keys = list(dims) + (["period"] if interval else [])
    period_tz = (tz or zoneinfo.ZoneInfo("UTC")) if interval else None
    for table, ranges in the_plan.parts():
        qs: QuerySet[Any] = table.objects.filter(_time_q("bucket", ranges), **filters, **scope)
        if the_plan.split_hours:
            qs = qs.exclude(bucket__in=the_plan.split_hours)
        if interval:
            qs = qs.annotate(period=Trunc("bucket", interval, tzinfo=period_tz))
        _collect(result, qs, keys, _only(_rollup_measures(), wanted), limit, period_tz=period_tz)
    raw_ranges = list(the_plan.ledger_ranges) + [(h, h + HOUR) for h in the_plan.split_hours]
    if raw_ranges:
        raw = ledger.filter(_time_q("occurred_at", raw_ranges), **filters)
        if interval:
            raw = raw.annotate(period=Trunc("occurred_at", interval, tzinfo=period_tz))
        _collect(result, raw, keys, _only(_ledger_measures(), wanted), limit, period_tz=period_tz)
    return result


def _only(aggregates: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    """The aggregates of the wanted measures, in MEASURES order (Result.add's)."""
    return {k: v for k, v in aggregates.items() if k[2:] in wanted}


def _collect(
    result: Result,
    qs: QuerySet[Any],
    keys: list[str],
    measures: dict[str, Any],
    limit: int | None,
    *,
    period_tz: zoneinfo.ZoneInfo | None = None,
) -> None:
    """Add `qs` grouped by `keys` (the last one `period` when `period_tz` is given)."""
    if not keys:
        total = qs.aggregate(**measures)
        if any(v is not None for v in total.values()):
            result.add((), [total[f"m_{m}"] for m in result.measures])
        return
    grouped: Any = qs.values(*keys).annotate(**measures).order_by(*keys)
    if limit is not None:
        grouped = grouped[: limit + 1]
    rows = (
        _fetch(grouped, len(keys), period_tz)
        if connection.vendor == "postgresql"
        else [(tuple(r[k] for k in keys), [r[f"m_{m}"] for m in result.measures]) for r in grouped]
    )
    if limit is not None and len(rows) > limit:
        result.truncated = True
        rows = rows[:limit]
    for key, values in rows:
        result.add(key, values)


def _fetch(
    grouped: QuerySet[Any], width: int, period_tz: zoneinfo.ZoneInfo | None
) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """The grouped query's rows as psycopg gives them: thousands of groups times 19 sums would
    otherwise spend most of a report's time in the ORM's per-value converters. PostgreSQL only,
    whose values need one conversion, done here as Trunc's converter does it: the period (a
    local time truncated in `period_tz`) is made aware. The sums are cast to bigint."""
    sql, params = grouped.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchall()
    if period_tz is None:
        return [(tuple(row[:width]), list(row[width:])) for row in found]
    return [
        ((*row[: width - 1], _aware(row[width - 1], period_tz)), list(row[width:])) for row in found
    ]


def _aware(value: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)


def totals_sql(
    *, filters: dict[str, str], since: datetime, until: datetime
) -> tuple[str, list[Any]]:
    """One statement (so one snapshot) selecting (cost units, tokens, requests) of the usage
    matching `filters` in [since, until): whole hours from a rollup (purged usage included),
    the edges from the ledger. The budget counters' ledger figure."""
    the_plan = plan(dimensions=filters, since=since, until=until)
    parts: list[tuple[str, Any]] = []
    for table, ranges in the_plan.parts():
        parts.append(
            table.objects.filter(_time_q("bucket", ranges), **filters)
            .order_by()
            .annotate(c=F("cost_units"), t=F("input_tokens") + F("output_tokens"), n=F("requests"))
            .values_list("c", "t", "n")
            .query.sql_with_params()
        )
    if the_plan.ledger_ranges:
        parts.append(
            TokenUsage.objects.filter(_time_q("occurred_at", the_plan.ledger_ranges), **filters)
            .order_by()
            .annotate(
                c=_cost_units(),
                t=F("total_tokens"),
                n=Value(1, output_field=BigIntegerField()),
            )
            .values_list("c", "t", "n")
            .query.sql_with_params()
        )
    union = " UNION ALL ".join(sql for sql, _params in parts)
    params = [p for _sql, part_params in parts for p in part_params]
    sums = "COALESCE(SUM(u.c), 0) AS c, COALESCE(SUM(u.t), 0) AS t, COALESCE(SUM(u.n), 0) AS n"
    sql = f"SELECT {sums} FROM ({union}) u"
    return sql, params


def totals(*, filters: dict[str, str], since: datetime, until: datetime) -> tuple[int, int, int]:
    sql, params = totals_sql(filters=filters, since=since, until=until)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        cost, tokens, requests = cursor.fetchone()
    return int(cost), int(tokens), int(requests)


# --- rebuild -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rebuilt:
    table: str
    hours: int
    groups_changed: int  # rollup rows added, removed or corrected
    requests_delta: int  # what the correction added to the rollup's request count
    cost_units_delta: int


def rebuild(*, since: datetime, until: datetime) -> list[Rebuilt]:
    """Recompute the hourly rollups for the whole hours of [since, until) from the ledger, and
    the daily one for their days from the hourly, exactly, and report what differed. The
    ledger is held still meanwhile (writes wait; a day at a time keeps that short). A 400 for
    hours whose raw usage retention deleted."""
    start, end = _floor_hour(since), _ceil_hour(until)
    cutoff = purged_before()
    if cutoff is not None and start < cutoff:
        raise ApiError(
            "Raw usage in this range was deleted by retention.",
            fields={
                "since": [f"Rebuild from {cutoff.isoformat()} on: before, only rollups remain."]
            },
        )
    out = {m: [0, 0, 0] for m, _d, _g in ROLLUPS}
    day = start
    while day < end:
        stop = min(day + timedelta(days=1), end)
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(f"LOCK TABLE {_LEDGER} IN SHARE MODE")
            for model, dims in TABLES:
                ledger = TokenUsage.objects.filter(occurred_at__gte=day, occurred_at__lt=stop)
                hourly = ledger.annotate(bucket=Trunc("occurred_at", "hour", tzinfo=UTC))
                found = _rebuild_range(
                    model, dims, day, stop, source=hourly, measures=_ledger_measures()
                )
                out[model] = [a + b for a, b in zip(out[model], found, strict=True)]
            # The days those hours belong to, summed again from the hourly table.
            first, last = _floor_day(day), _ceil_day(stop)
            hours_of_days = ModelRollup.objects.filter(bucket__gte=first, bucket__lt=last)
            daily = hours_of_days.annotate(day=Trunc("bucket", "day", tzinfo=UTC))
            found = _rebuild_range(
                DAY_TABLE,
                COARSE_DIMENSIONS,
                first,
                last,
                source=daily,
                measures=_rollup_measures(),
                bucket_from="day",
            )
            out[DAY_TABLE] = [a + b for a, b in zip(out[DAY_TABLE], found, strict=True)]
        day = stop
    hours = int((end - start) / HOUR)
    return [Rebuilt(m._meta.db_table, hours, *out[m]) for m in out]


def _rebuild_range(
    model: type[RollupMeasures],
    dims: Sequence[str],
    start: datetime,
    end: datetime,
    *,
    source: QuerySet[Any],
    measures: dict[str, Any],
    bucket_from: str = "bucket",
) -> tuple[int, int, int]:
    """Make `model`'s rows in [start, end) equal to `source` grouped by (`bucket_from`, dims)
    with `measures` (m_-prefixed): (groups changed, requests added, cost units added)."""
    keys = ["bucket", *dims]
    stored = {
        tuple(r[k] for k in keys): r
        for r in model.objects.filter(bucket__gte=start, bucket__lt=end).values(
            "id", *keys, *MEASURES
        )
    }
    want: dict[tuple[Any, ...], dict[str, Any]] = {}
    raw = source.values(bucket_from, *dims).annotate(**measures).order_by()
    for row in raw:
        row["bucket"] = row[bucket_from]
        want[tuple(row[k] for k in keys)] = {m: int(row[f"m_{m}"] or 0) for m in MEASURES}
    changed = requests = cost = 0
    stale = [k for k in stored if k not in want]
    fix: list[RollupMeasures] = []
    for key, values in want.items():
        have = stored.get(key)
        if have is not None and all(int(have[m]) == values[m] for m in MEASURES):
            continue
        changed += 1
        requests += values["requests"] - (int(have["requests"]) if have else 0)
        cost += values["cost_units"] - (int(have["cost_units"]) if have else 0)
        if have is not None:
            stale.append(key)
        fix.append(model(**dict(zip(keys, key, strict=True)), **values))
    for key in stale:
        if key not in want:
            changed += 1
            requests -= int(stored[key]["requests"])
            cost -= int(stored[key]["cost_units"])
    model.objects.filter(pk__in=[stored[k]["id"] for k in stale]).delete()
    model.objects.bulk_create(fix, batch_size=500)
    return changed, requests, cost


# --- adjusting after a rewrite of ledger rows (repricing) --------------------------------------


def _contribution(row: dict[str, Any]) -> dict[str, int]:
    """MEASURES of one ledger row, computed as the trigger's SQL computes them (a test holds the
    two equal: tests/usage/test_rollups.py)."""
    cost = money_to_units(Decimal(row["cost"]))
    error = row["status"] == TokenUsage.Status.ERROR
    short = row["output_tokens"] <= SHORT_OUTPUT_TOKENS and not error
    tokens = row["input_tokens"] + row["output_tokens"]
    latency = row["latency_ms"]
    return {
        "requests": 1,
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "cache_read_tokens": row["cache_read_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "cost_units": cost,
        "errors": int(error),
        "error_cost_units": cost if error else 0,
        "unpriced_requests": int(bool(row["unpriced"])),
        "unpriced_tokens": tokens if row["unpriced"] else 0,
        "estimated_requests": int(bool(row["estimated"])),
        "estimated_cost_units": cost if row["estimated"] else 0,
        "cache_hits": int(row["cache_hit"] is True),
        "latency_ms_sum": latency or 0,
        "latency_count": int(latency is not None),
        "short_requests": int(short),
        "short_input_tokens": row["input_tokens"] if short else 0,
        "short_output_tokens": row["output_tokens"] if short else 0,
        "short_cost_units": cost if short else 0,
    }


# The ledger columns `adjust` needs of each row.
ADJUST_COLUMNS = (
    "occurred_at",
    *FINE_DIMENSIONS,
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost",
    "status",
    "unpriced",
    "estimated",
    "cache_hit",
    "latency_ms",
)


_ADJUST_CHUNK = 500  # groups per statement (SQLite: 28 parameters a group, 32,766 at most)


def _add_deltas(
    model: type[RollupMeasures],
    dims: Sequence[str],
    changes: Sequence[tuple[tuple[Any, ...], dict[str, int]]],
) -> None:
    """One INSERT … ON CONFLICT DO UPDATE adding each group's deltas (the trigger's upsert)."""
    table = model._meta.db_table
    names = ["bucket", *dims, *MEASURES]
    one = "(" + ", ".join(["%s"] * len(names)) + ")"
    update = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in MEASURES)
    sql = (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES {', '.join([one] * len(changes))} "
        f"ON CONFLICT ({', '.join(['bucket', *dims])}) DO UPDATE SET {update}"
    )
    bucket = model._meta.get_field("bucket")
    params: list[Any] = []
    for key, values in changes:
        params.append(bucket.get_db_prep_value(key[0], connection))
        params.extend(key[1:])
        params.extend(values[m] for m in MEASURES)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def adjust(*, before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> int:
    """Move every rollup from `before` to `after`: the same ledger rows (ADJUST_COLUMNS) as
    they were and as they are now rewritten, in the caller's transaction (the rewrite's).
    Adds the difference per hour and group, so usage arriving meanwhile stays counted.
    Returns how many rollup rows changed."""
    changed = 0
    before, after = list(before), list(after)
    for model, dims, grain in ROLLUPS:
        floor = _floor_hour if grain == "hour" else _floor_day
        delta: dict[tuple[Any, ...], dict[str, int]] = {}
        for sign, rows in ((-1, before), (1, after)):
            for row in rows:
                key = (floor(row["occurred_at"].astimezone(UTC)), *(row[d] for d in dims))
                into = delta.setdefault(key, dict.fromkeys(MEASURES, 0))
                for name, value in _contribution(row).items():
                    into[name] += sign * value
        changes = [(k, v) for k, v in sorted(delta.items()) if any(v.values())]
        for start in range(0, len(changes), _ADJUST_CHUNK):
            _add_deltas(model, dims, changes[start : start + _ADJUST_CHUNK])
        changed += len(changes)
    return changed
