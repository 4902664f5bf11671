"""Reads of the usage app. Aggregates are computed in SQL."""

from __future__ import annotations

import base64
import binascii
import re
import time
import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Model, Q, QuerySet
from django.utils import timezone

from tokenmgr_project.core import health, unavailable
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.api import query_text
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal, in_scope
from usage import buffer, rollups
from usage.models import ATTRIBUTION_DIMENSIONS, ModelPrice, TokenUsage

FILTER_FIELDS = (*ATTRIBUTION_DIMENSIONS, "provider", "model", "status")
GROUP_FIELDS = FILTER_FIELDS
INTERVALS = ("hour", "day", "week", "month")
MAX_PAGE = 1000
MAX_SUMMARY_ROWS = 10_000
# Query values are checked like body fields: what the database cannot compare (NUL, other control
# characters, unpaired surrogates from /signals' JSON) is a 400 naming the parameter, never a 500.
MAX_FILTER_LENGTH = 128
MAX_TIME_LENGTH = 64
# PostgreSQL's timestamptz takes UTC offsets below 16 hours; ingestion refuses larger ones too.
MAX_UTC_OFFSET = timedelta(hours=16)
MAX_ID = 2**63 - 1
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CURSOR_PK = re.compile(r"[0-9]{1,19}")


M = TypeVar("M", bound=Model)


def usage_for_principal(principal: Principal) -> QuerySet[TokenUsage]:
    """The one gate onto the ledger: a scoped key sees only its own team or project."""
    return in_scope(TokenUsage.objects.all(), principal)


def _time_error(name: str, message: str) -> ApiError:
    return ApiError("Invalid time range.", fields={name: [message]})


def _parse_time(name: str, raw: Any) -> datetime:
    """An aware UTC datetime: naive means UTC; an offset PostgreSQL refuses, or an instant that
    leaves the calendar's range once in UTC, is a 400."""
    if isinstance(raw, datetime):
        value = raw
    else:
        text = query_text(name, raw, max_length=MAX_TIME_LENGTH)
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise _time_error(name, "Use an ISO 8601 date-time.") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    offset = value.utcoffset()
    if offset is None or abs(offset) >= MAX_UTC_OFFSET:
        raise _time_error(name, "The UTC offset must be within ±15:59.")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise _time_error(name, "Out of range: use a year from 1 to 9999 in UTC.") from None


def _check_names(params: dict[str, Any]) -> None:
    unknown = sorted(
        k
        for k in params
        if k
        not in (*FILTER_FIELDS, "since", "until", "cursor", "limit", "group_by", "interval", "tz")
    )
    if unknown:
        raise ApiError("Unknown filter.", fields={k: ["Unknown filter."] for k in unknown})


def _filters(params: dict[str, Any]) -> Q:
    _check_names(params)
    q = Q(**exact_filters(params))
    since, until = parse_range(params)
    if since:
        q &= Q(occurred_at__gte=since)
    if until:
        q &= Q(occurred_at__lt=until)
    return q


def _encode_cursor(row: TokenUsage) -> str:
    raw = f"{row.occurred_at.isoformat()}|{row.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: Any) -> Q:
    """The keyset filter of a cursor `_encode_cursor` made. A cursor is client input like any
    other: what it decodes to is checked again (an aware UTC time, an id a row can have)."""
    invalid = ApiError("Invalid cursor.", fields={"cursor": ["Not a cursor this API returned."]})
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        stamp, pk = raw.split("|")
        at = datetime.fromisoformat(stamp)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid from None
    if not _CURSOR_PK.fullmatch(pk) or int(pk) > MAX_ID or at.utcoffset() != timedelta(0):
        raise invalid
    return Q(occurred_at__lt=at) | Q(occurred_at=at, pk__lt=int(pk))


def _limit(params: dict[str, Any]) -> int:
    raw = params.get("limit", 100)
    try:
        limit = -1 if isinstance(raw, bool) else int(raw)
    except (TypeError, ValueError):
        limit = -1
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(
            "Invalid limit.", fields={"limit": [f"Must be an integer from 1 to {MAX_PAGE}."]}
        )
    return limit


def usage_list(
    *, principal: Principal, params: dict[str, Any]
) -> tuple[list[TokenUsage], str | None]:
    """Newest first, keyset-paginated on (occurred_at, id): (rows, next cursor or None)."""
    limit = _limit(params)
    qs = usage_for_principal(principal).filter(_filters(params))
    if params.get("cursor"):
        qs = qs.filter(_decode_cursor(params["cursor"]))
    rows = list(qs.order_by("-occurred_at", "-id")[: limit + 1])
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def _group_by(params: dict[str, Any]) -> list[str]:
    raw = params.get("group_by") or []
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    bad = [n for n in names if n not in GROUP_FIELDS]
    if bad or not all(isinstance(n, str) for n in names):
        raise ApiError(
            "Invalid group_by.",
            fields={
                "group_by": [
                    f"Unknown dimension(s) {', '.join(bad)}; use {', '.join(GROUP_FIELDS)}."
                ]
            },
        )
    return names


def scope_columns(principal: Principal) -> dict[str, str]:
    """The scope rule (`in_scope`) as column values, for tables without a queryset gate."""
    scope = {}
    if principal.team_id:
        scope["team_id"] = principal.team_id
    if principal.project_id:
        scope["project_id"] = principal.project_id
    return scope


def aggregate_for(principal: Principal, **query: Any) -> rollups.Result:
    """rollups.aggregate in the caller's scope: its ledger rows for the raw half and its scope
    as columns for the rollup half, always together."""
    return rollups.aggregate(
        ledger=usage_for_principal(principal), scope=scope_columns(principal), **query
    )


def summary_row(values: dict[str, int]) -> dict[str, Any]:
    """One group's rollup measures as the API shows them (money as Decimal text)."""
    return {
        "requests": values["requests"],
        "input_tokens": values["input_tokens"],
        "output_tokens": values["output_tokens"],
        "cache_read_tokens": values["cache_read_tokens"],
        "cache_write_tokens": values["cache_write_tokens"],
        "total_tokens": values["input_tokens"] + values["output_tokens"],
        "cost": rollups.units_text(values["cost_units"]),
        "unpriced_requests": values["unpriced_requests"],
        "unpriced_tokens": values["unpriced_tokens"],
        "estimated_requests": values["estimated_requests"],
        "estimated_cost": rollups.units_text(values["estimated_cost_units"]),
        "errors": values["errors"],
    }


def parse_range(params: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    # Present means given: an empty since/until is not a date-time (the schema says so too).
    since = _parse_time("since", params["since"]) if params.get("since") is not None else None
    until = _parse_time("until", params["until"]) if params.get("until") is not None else None
    if since and until and since >= until:
        raise ApiError("Invalid time range.", fields={"until": ["Must be after since."]})
    return since, until


def parse_interval(params: dict[str, Any]) -> str | None:
    # Present means given: `interval=` is not one of the intervals (the schema's enum).
    interval = params.get("interval")
    if interval is not None and interval not in INTERVALS:
        raise ApiError(
            "Invalid interval.", fields={"interval": [f"Use one of {', '.join(INTERVALS)}."]}
        )
    return interval


def parse_tz(params: dict[str, Any]) -> zoneinfo.ZoneInfo:
    tz_raw = params.get("tz")
    tz_name = "UTC" if tz_raw is None else query_text("tz", tz_raw, max_length=64)
    return rollups.parse_tz(tz_name)


def exact_filters(params: dict[str, Any]) -> dict[str, str]:
    return {
        name: query_text(name, params[name], max_length=MAX_FILTER_LENGTH)
        for name in FILTER_FIELDS
        if params.get(name) not in (None, "")
    }


def usage_summary(*, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    """Totals grouped by any dimensions and optionally by hour/day/week/month: from rollups
    where the grain allows, the ledger for the rest (`source` says which)."""
    dims = _group_by(params)
    interval = parse_interval(params)
    tz = parse_tz(params)
    _check_names(params)
    filters = exact_filters(params)
    since, until = parse_range(params)
    result = aggregate_for(
        principal,
        filters=filters,
        group_by=dims,
        since=since,
        until=until,
        interval=interval,
        tz=tz,
        limit=MAX_SUMMARY_ROWS,
    )
    if not dims and not interval and not result.rows:
        result.rows[()] = dict.fromkeys(rollups.MEASURES, 0)  # a total is a row, even of nothing
    out = []
    for key in sorted(result.rows)[:MAX_SUMMARY_ROWS]:
        item: dict[str, Any] = dict(zip(dims, key, strict=False))
        if interval:
            item["period"] = key[-1].isoformat()
        item.update(summary_row(result.rows[key]))
        out.append(item)
    return {
        "group_by": dims,
        "interval": interval,
        "tz": str(tz),
        "currency": "USD",
        "source": result.plan.source,
        "rows": out,
        "truncated": result.truncated or len(result.rows) > MAX_SUMMARY_ROWS,
    }


def _oldest_buffered_age() -> float | None:
    """Seconds since the oldest event still in the buffer was accepted (entries leave the
    stream when flushed; an entry id starts with its Redis time in milliseconds)."""
    first: Any = tm_redis.client().xrange(buffer.stream_key(), count=1)
    if not first:
        return None
    accepted_ms = int(first[0][0].split(b"-", 1)[0])
    return max(0.0, round(time.time() - accepted_ms / 1000, 3))


def usage_dead_letters(*, limit: int = 1000) -> list[buffer.DeadLetter]:
    """Ledger lines the flush parked because the database refused them, oldest first."""
    if not tm_redis.configured():
        return []
    return buffer.dead_letters(count=limit)


def usage_dead_letters_summary() -> dict[str, Any]:
    count, oldest = buffer.dead_summary()
    return {
        "count": count,
        "oldest_id": oldest.dead_id if oldest else None,
        "oldest_at": oldest.parked_at if oldest else None,
    }


def buffer_state() -> dict[str, Any]:
    """The Redis buffer: depth, the last flush and the backlog's age (Redis reachable)."""
    raw_stats: dict[bytes, bytes] = tm_redis.client().hgetall(buffer.stats_key())  # type: ignore[assignment]
    stats = {k.decode(): v.decode() for k, v in raw_stats.items()}
    return {
        "depth": buffer.depth(),
        "pending_entries": buffer.pending_entries(),
        "last_flush_at": stats.get("last_flush_at"),
        "last_flush_count": int(stats["last_flush_count"]) if "last_flush_count" in stats else None,
        "last_run_at": stats.get("last_run_at"),
        "total_flushed": int(stats.get("total_flushed", 0)),
        # The backlog's age: while the database is down it grows, and it drains after.
        "oldest_age_seconds": _oldest_buffered_age(),
    }


def health_snapshot() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        db_ok = True
    except Exception:  # noqa: BLE001 - any database failure means "not reachable"
        db_ok = False
    db_ms = round((time.perf_counter() - started) * 1000, 2)
    body: dict[str, Any] = {
        "database": {
            "reachable": db_ok,
            "status": "up" if db_ok else "down",
            "vendor": connection.vendor,
            "latency_ms": db_ms,
        },
        "redis": {"configured": tm_redis.configured(), "reachable": None, "persistence": None},
        "mode": "direct",
        "buffer": {
            "depth": 0,
            "pending_entries": 0,
            "last_flush_at": None,
            "last_flush_count": None,
            "total_flushed": 0,
            "oldest_age_seconds": None,
        },
        "unpriced_requests": None,
        "dead_letters": {"count": 0, "oldest_id": None, "oldest_at": None},
    }
    if tm_redis.configured():
        reachable = tm_redis.ping()
        body["redis"]["reachable"] = reachable
        if reachable:
            tm_redis.reset()
            # Is acknowledged usage safe in Redis (AOF on)? If not, ingestion writes direct.
            body["redis"]["persistence"] = persistence = tm_redis.persistence_report()
            body["mode"] = "buffered" if persistence["buffered"] else "direct"
            body["buffer"] = buffer_state()
            body["dead_letters"] = usage_dead_letters_summary()
    if db_ok:
        try:
            body["unpriced_requests"] = TokenUsage.objects.filter(unpriced=True).count()
            body.update(health.probe_results(database_up=True))
        except unavailable.DATABASE_ERRORS:  # went down since SELECT 1: health still answers
            body["database"].update(reachable=False, status="down")
            db_ok = False
    if not db_ok:
        body.update(health.probe_results(database_up=False))
    ok = db_ok and (body["redis"]["reachable"] is not False)
    body["status"] = "ok" if ok else ("degraded" if db_ok else "down")
    if body["status"] == "ok" and body["dead_letters"]["count"]:
        body["status"] = "degraded"  # parked usage waits for someone to replay or discard it
    body["checked_at"] = timezone.now().isoformat()
    return body


def price_overrides(provider: str = "", model_search: str = "") -> QuerySet[ModelPrice]:
    """Price overrides for one provider (plus those for any provider) whose model contains
    `model_search` (case-insensitive), filtered in SQL, newest first."""
    rows = ModelPrice.objects.order_by("provider", "model", "-effective_from")
    if provider:
        rows = rows.filter(provider__in=("", provider))
    if model_search:
        rows = rows.filter(model__icontains=model_search)
    return rows
