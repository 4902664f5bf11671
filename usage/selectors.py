"""Reads of the usage app. Aggregates are computed in SQL."""

from __future__ import annotations

import base64
import binascii
import time
import zoneinfo
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from tokenmgr_project import redis as tm_redis
from usage import buffer
from usage.auth import Principal
from usage.errors import ApiError
from usage.models import ATTRIBUTION_DIMENSIONS, TokenUsage
from usage.pricing import money

FILTER_FIELDS = (*ATTRIBUTION_DIMENSIONS, "provider", "model", "status")
GROUP_FIELDS = FILTER_FIELDS
INTERVALS = ("hour", "day", "week", "month")
MAX_PAGE = 1000
MAX_SUMMARY_ROWS = 10_000


def usage_for_principal(principal: Principal) -> QuerySet[TokenUsage]:
    """The one gate onto the ledger: a scoped key sees only its own team or project."""
    qs = TokenUsage.objects.all()
    if principal.team_id:
        qs = qs.filter(team_id=principal.team_id)
    if principal.project_id:
        qs = qs.filter(project_id=principal.project_id)
    return qs


def _parse_time(name: str, raw: Any) -> datetime:
    if isinstance(raw, datetime):
        value = raw
    else:
        try:
            value = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(
                "Invalid time range.", fields={name: ["Use an ISO 8601 date-time."]}
            ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zoneinfo.ZoneInfo("UTC"))
    return value


def _filters(params: dict[str, Any]) -> Q:
    q = Q()
    unknown = sorted(
        k
        for k in params
        if k
        not in (*FILTER_FIELDS, "since", "until", "cursor", "limit", "group_by", "interval", "tz")
    )
    if unknown:
        raise ApiError("Unknown filter.", fields={k: ["Unknown filter."] for k in unknown})
    for name in FILTER_FIELDS:
        value = params.get(name)
        if value not in (None, ""):
            if not isinstance(value, str) or len(value) > 128:
                raise ApiError(
                    "Invalid filter.",
                    fields={name: ["Must be a string of at most 128 characters."]},
                )
            q &= Q(**{name: value})
    since = _parse_time("since", params["since"]) if params.get("since") else None
    until = _parse_time("until", params["until"]) if params.get("until") else None
    if since and until and since >= until:
        raise ApiError("Invalid time range.", fields={"until": ["Must be after since."]})
    if since:
        q &= Q(occurred_at__gte=since)
    if until:
        q &= Q(occurred_at__lt=until)
    return q


def _encode_cursor(row: TokenUsage) -> str:
    raw = f"{row.occurred_at.isoformat()}|{row.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> Q:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, pk = raw.rsplit("|", 1)
        at, pk_value = datetime.fromisoformat(stamp), int(pk)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(
            "Invalid cursor.", fields={"cursor": ["Not a cursor this API returned."]}
        ) from None
    return Q(occurred_at__lt=at) | Q(occurred_at=at, pk__lt=pk_value)


def _limit(params: dict[str, Any]) -> int:
    raw = params.get("limit", 100)
    try:
        limit = int(raw)
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
        qs = qs.filter(_decode_cursor(str(params["cursor"])))
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


def usage_summary(*, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    """Totals grouped by any dimensions and optionally by hour/day/week/month, in SQL."""
    dims = _group_by(params)
    interval = params.get("interval") or None
    if interval is not None and interval not in INTERVALS:
        raise ApiError(
            "Invalid interval.", fields={"interval": [f"Use one of {', '.join(INTERVALS)}."]}
        )
    tz_name = params.get("tz") or "UTC"
    try:
        tz = zoneinfo.ZoneInfo(str(tz_name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ApiError(
            "Invalid time zone.", fields={"tz": ["Use an IANA time zone such as Europe/Paris."]}
        ) from None
    qs = usage_for_principal(principal).filter(
        _filters({k: v for k, v in params.items() if k not in ("cursor", "limit")})
    )
    keys = list(dims)
    if interval:
        qs = qs.annotate(period=Trunc("occurred_at", interval, tzinfo=tz))
        keys.append("period")
    aggregates = {
        "requests": Count("id"),
        "input_tokens": Sum("input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "cache_read_tokens": Sum("cache_read_tokens"),
        "cache_write_tokens": Sum("cache_write_tokens"),
        "total_tokens": Sum("total_tokens"),
        "cost": Sum("cost"),
        "unpriced_requests": Count("id", filter=Q(unpriced=True)),
        "errors": Count("id", filter=Q(status=TokenUsage.Status.ERROR)),
    }
    grouped = (
        qs.values(*keys).annotate(**aggregates).order_by(*keys)
        if keys
        else [qs.aggregate(**aggregates)]
    )
    rows = list(grouped[: MAX_SUMMARY_ROWS + 1])
    out = []
    for row in rows[:MAX_SUMMARY_ROWS]:
        item = {k: row[k] for k in dims}
        if interval:
            item["period"] = row["period"].isoformat() if row["period"] else None
        for name in aggregates:
            value = row[name]
            if name == "cost":
                item[name] = money(value)
            else:
                item[name] = value or 0
        out.append(item)
    return {
        "group_by": dims,
        "interval": interval,
        "tz": str(tz),
        "currency": "USD",
        "rows": out,
        "truncated": len(rows) > MAX_SUMMARY_ROWS,
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
        "database": {"reachable": db_ok, "vendor": connection.vendor, "latency_ms": db_ms},
        "redis": {"configured": tm_redis.configured(), "reachable": None},
        "mode": "direct",
        "buffer": {
            "depth": 0,
            "pending_entries": 0,
            "last_flush_at": None,
            "last_flush_count": None,
            "total_flushed": 0,
        },
        "unpriced_requests": None,
    }
    if tm_redis.configured():
        reachable = tm_redis.ping()
        body["redis"]["reachable"] = reachable
        if reachable:
            tm_redis.reset()
            body["mode"] = "buffered"
            raw_stats: dict[bytes, bytes] = tm_redis.client().hgetall(buffer.stats_key())  # type: ignore[assignment]
            stats = {k.decode(): v.decode() for k, v in raw_stats.items()}
            body["buffer"] = {
                "depth": buffer.depth(),
                "pending_entries": buffer.pending_entries(),
                "last_flush_at": stats.get("last_flush_at"),
                "last_flush_count": int(stats["last_flush_count"])
                if "last_flush_count" in stats
                else None,
                "last_run_at": stats.get("last_run_at"),
                "total_flushed": int(stats.get("total_flushed", 0)),
            }
    if db_ok:
        body["unpriced_requests"] = TokenUsage.objects.filter(unpriced=True).count()
        from reporting.services import status_queue_stats  # reporting builds on usage

        body["status_messages"] = status_queue_stats()
    ok = db_ok and (body["redis"]["reachable"] is not False)
    body["status"] = "ok" if ok else ("degraded" if db_ok else "down")
    body["checked_at"] = timezone.now().isoformat()
    return body
