"""The ledger's measures per group, in one SQL statement each (window functions over the
caller's rows): repeated inputs, reported system prompts and output limits, settled budget
reservations; and the bounded ledger window of the recommendations (`sample_window`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import BigIntegerField, Case, F, Q, QuerySet, Value, When
from django.db.models.functions import Cast, Round

from budgets.models import Reservation
from reporting.opportunities.common import (
    DUPLICATE_WINDOW,
    GROUP,
    LARGE_SYSTEM_PROMPT,
    MAX_COUNT,
    MAX_TOKENS_KEYS,
    PROMPT_CACHE_MIN_TOKENS,
    PROMPT_CACHE_TTL,
    SAMPLE_DAYS,
    SAMPLE_ROWS,
    SYSTEM_PROMPT_KEYS,
    Group,
    Measures,
    Window,
    _group,
    _halves,
)
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.models import TokenUsage
from usage.selectors import usage_for_principal


def _gap(later: str, earlier: str) -> str:
    """SQL: seconds from `earlier` to `later` (two columns of the same row)."""
    if connection.vendor == "postgresql":
        return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


def _json_int(column: str, key: str) -> str:
    """SQL: a JSON object's integer member (a number, clamped to [0, MAX_COUNT]), else NULL."""
    if connection.vendor == "postgresql":
        return (
            f"CASE WHEN jsonb_typeof({column}->'{key}') = 'number' THEN CAST(LEAST(GREATEST("
            f"FLOOR(CAST({column}->>'{key}' AS NUMERIC)), 0), {MAX_COUNT}) AS BIGINT) END"
        )
    return (
        f"CASE WHEN json_type({column}, '$.{key}') IN ('integer', 'real') THEN MIN(MAX(CAST("
        f"json_extract({column}, '$.{key}') AS INTEGER), 0), {MAX_COUNT}) END"
    )


def _json_text(column: str, key: str) -> str:
    if connection.vendor == "postgresql":
        return f"CASE WHEN jsonb_typeof({column}->'{key}') = 'string' THEN {column}->>'{key}' END"
    return f"CASE WHEN json_type({column}, '$.{key}') = 'text' THEN json_extract({column}, '$.{key}') END"  # noqa: E501 - one SQL expression


def _cost_units() -> Any:
    return Cast(Round(F("cost") * rollups.UNITS_PER_USD), output_field=BigIntegerField())


def _rows(
    principal: Principal,
    window: Window,
    filters: dict[str, str],
    extra: Q,
    columns: Sequence[str],
    **annotations: Any,
) -> tuple[str, list[Any]]:
    """SQL and parameters of the caller's ledger rows in the window: `columns`, the cost in
    units (`cu`) and `first` (1 in the window's first half), for the window functions around
    them."""
    mid = window.mid or window.until
    rows: QuerySet[TokenUsage] = (
        usage_for_principal(principal)
        .filter(extra, occurred_at__gte=window.since, occurred_at__lt=window.until, **filters)
        .order_by()
        .annotate(
            cu=_cost_units(),
            first=Case(When(occurred_at__lt=mid, then=Value(1)), default=0),
            **annotations,
        )
        .values("id", *GROUP, "occurred_at", *columns, "cu", "first", *annotations)
    )
    sql, params = rows.query.sql_with_params()
    return sql, list(params)


_G = ", ".join(f"s.{c}" for c in GROUP)


def _fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return list(cursor.fetchall())


def repeated_inputs(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[str, Group, Measures]]:
    """Per input hash and group: repeats within DUPLICATE_WINDOW of the request before with the
    same hash and model (dup_*), and large uncached repeats within PROMPT_CACHE_TTL (pc_*: the
    tokens read again, and those of the request that would write the cache). A row whose
    client reported its system prompt is left to `system_prompts` for prompt caching."""
    reported = Case(When(system_context__has_key=SYSTEM_PROMPT_KEYS[0], then=Value(1)), default=0)
    inner, params = _rows(
        principal,
        window,
        filters,
        ~Q(input_hash=""),
        ("input_hash", "input_tokens", "cache_read_tokens"),
        reported=reported,
    )
    order = "ORDER BY t.occurred_at, t.id"
    part = "PARTITION BY t.input_hash, t.model"
    dup_s, ttl_s = int(DUPLICATE_WINDOW.total_seconds()), int(PROMPT_CACHE_TTL.total_seconds())
    big = (
        f"s.input_tokens >= {PROMPT_CACHE_MIN_TOKENS} AND s.cache_read_tokens = 0 "
        "AND s.reported = 0"
    )
    dup = f"s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {dup_s}"
    read = f"s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s} AND {big}"
    write = (
        f"s.next_at IS NOT NULL AND {_gap('s.next_at', 's.occurred_at')} <= {ttl_s} AND {big} "
        f"AND NOT (s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s})"
    )

    def when(cond: str, value: str = "1") -> str:
        return f"SUM(CASE WHEN {cond} THEN {value} ELSE 0 END)"

    sql = f"""
        SELECT s.input_hash, {_G},
            {when(dup)}, {when(dup, "s.cu")}, {when(dup, "s.first")},
            {when(read)}, {when(read, "s.input_tokens")}, {when(read, "s.first")},
            {when(write)}, {when(write, "s.input_tokens")}
        FROM (
            SELECT t.*, LAG(t.occurred_at) OVER ({part} {order}) AS prev_at,
                LEAD(t.occurred_at) OVER ({part} {order}) AS next_at
            FROM ({inner}) t
        ) s
        WHERE s.prev_at IS NOT NULL OR s.next_at IS NOT NULL
        GROUP BY s.input_hash, {_G}
    """
    names = (
        "dup_requests", "dup_cost_units", "first_dup_requests",
        "pc_requests", "pc_tokens", "first_pc_requests", "pc_writes", "pc_write_tokens",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        values = {n: int(v or 0) for n, v in zip(names, row[7:], strict=True)}
        if values["dup_requests"] or values["pc_requests"]:
            out.append((str(row[0]), _group(row[1:7]), values))
    return out


def system_prompts(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[Group, Measures]]:
    """Per group: requests whose client reported a large system prompt (sp_*), the uncached
    repeats of the same prompt within PROMPT_CACHE_TTL (spc_*), and successful requests that
    sent an output limit in metadata (mt_*)."""
    sp_keys = Q(system_context__has_key=SYSTEM_PROMPT_KEYS[0])
    inner, params = _rows(
        principal,
        window,
        filters,
        sp_keys | Q(metadata__has_any_keys=list(MAX_TOKENS_KEYS)),
        (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "status",
            "metadata",
            "system_context",
        ),
    )
    sp_tokens = _json_int("t.system_context", "system_prompt_tokens")
    sp_hash = _json_text("t.system_context", "system_prompt_hash")
    limit = "COALESCE(" + ", ".join(_json_int("t.metadata", k) for k in MAX_TOKENS_KEYS) + ")"
    order = "ORDER BY t.occurred_at, t.id"
    part = f"PARTITION BY {sp_hash}, t.model"
    ttl_s = int(PROMPT_CACHE_TTL.total_seconds())
    large = f"s.sp >= {LARGE_SYSTEM_PROMPT}"
    cached = f"{large} AND s.sph IS NOT NULL AND s.cache_read_tokens = 0"
    read = f"{cached} AND s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s}"
    write = (
        f"{cached} AND s.next_at IS NOT NULL AND {_gap('s.next_at', 's.occurred_at')} <= {ttl_s}"
        f" AND NOT (s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s})"
    )
    limited = "s.mt IS NOT NULL AND s.mt > 0 AND s.status = 'success'"

    def when(cond: str, value: str = "1") -> str:
        return f"SUM(CASE WHEN {cond} THEN {value} ELSE 0 END)"

    sql = f"""
        SELECT {_G},
            {when(large)}, {when(large, "s.sp")}, {when(f"{large} AND s.cache_read_tokens > 0")},
            {when(large, "s.first")}, {when(f"{large} AND s.cache_read_tokens > 0", "s.sp")},
            {when(read)}, {when(read, "s.sp")}, {when(read, "s.first")},
            {when(write)}, {when(write, "s.sp")},
            {when(limited)}, {when(limited, "s.mt")}, {when(limited, "s.output_tokens")},
            MAX(CASE WHEN {limited} THEN s.output_tokens END), {when(limited, "s.first")}
        FROM (
            SELECT t.*,
                CASE WHEN {sp_tokens} < t.input_tokens THEN {sp_tokens} ELSE t.input_tokens END
                    AS sp,
                {sp_hash} AS sph, {limit} AS mt,
                LAG(t.occurred_at) OVER ({part} {order}) AS prev_at,
                LEAD(t.occurred_at) OVER ({part} {order}) AS next_at
            FROM ({inner}) t
        ) s
        GROUP BY {_G}
    """
    names = (
        "sp_requests", "sp_tokens", "sp_cached_requests", "first_sp_requests", "sp_cached_tokens",
        "spc_requests", "spc_tokens", "first_spc_requests", "spc_writes", "spc_write_tokens",
        "mt_requests", "mt_limit_tokens", "mt_output_tokens", "mt_max_output", "first_mt_requests",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        out.append((_group(row[:6]), {n: int(v or 0) for n, v in zip(names, row[6:], strict=True)}))
    return out


def reservations(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[Group, Measures]]:
    """Per group: budget reservations settled in the window (database mode) against the usage
    that settled them: output tokens reserved (the hold's tokens less the request's input) and
    generated, and the cost held beyond the cost charged."""
    usage = TokenUsage._meta.db_table
    held = Reservation._meta.db_table
    where = ["r.status = %s", "r.closed_at >= %s", "r.closed_at < %s"]
    mid = window.mid or window.until
    params: list[Any] = [
        connection.ops.adapt_datetimefield_value(mid),
        Reservation.Status.SETTLED.value,
        connection.ops.adapt_datetimefield_value(window.since),
        connection.ops.adapt_datetimefield_value(window.until),
    ]
    scope = {"team_id": principal.team_id, "project_id": principal.project_id}
    for column, value in [*((c, v) for c, v in scope.items() if v), *filters.items()]:
        if column not in rollups.FINE_DIMENSIONS:
            raise ValueError(f"not a filter column: {column}")
        where.append(f"u.{column} = %s")
        params.append(value)
    out_tokens = "CASE WHEN r.tokens > u.input_tokens THEN r.tokens - u.input_tokens ELSE 0 END"
    held_units = f"CAST(ROUND(r.cost * {rollups.UNITS_PER_USD}) AS BIGINT)"
    used_units = f"CAST(ROUND(u.cost * {rollups.UNITS_PER_USD}) AS BIGINT)"
    group = ", ".join(f"u.{c}" for c in GROUP)
    sql = f"""
        SELECT {group}, COUNT(*), SUM({out_tokens}), SUM(u.output_tokens), MAX(u.output_tokens),
            SUM(CASE WHEN r.closed_at < %s THEN 1 ELSE 0 END),
            SUM(CASE WHEN {held_units} > {used_units} THEN {held_units} - {used_units} ELSE 0 END)
        FROM {held} r
        JOIN {usage} u ON u.request_id = r.settled_request_id AND u.reservation_id = r.reservation_id
        WHERE u.status = 'success' AND {" AND ".join(where)}
        GROUP BY {group}
    """  # noqa: E501 - one SQL statement
    names = (
        "rs_requests", "rs_limit_tokens", "rs_output_tokens", "rs_max_output",
        "first_rs_requests", "rs_headroom_units",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        out.append((_group(row[:6]), {n: int(v or 0) for n, v in zip(names, row[6:], strict=True)}))
    return out


def sample_window(
    principal: Principal, since: datetime, until: datetime, filters: dict[str, str]
) -> Window | None:
    """The ledger window: the last SAMPLE_DAYS of [since, until) (never before retention's
    cutoff), shortened to its most recent SAMPLE_ROWS rows (one index probe on occurred_at)."""
    start = max(since, until - timedelta(days=SAMPLE_DAYS))
    cutoff = rollups.purged_before()
    if cutoff is not None:
        start = max(start, cutoff)
    if start >= until:
        return None
    edge = list(
        usage_for_principal(principal)
        .filter(occurred_at__gte=start, occurred_at__lt=until, **filters)
        .order_by("-occurred_at")
        .values_list("occurred_at", flat=True)[SAMPLE_ROWS : SAMPLE_ROWS + 1]
    )
    if edge:
        return _halves(edge[0], until, "ledger", capped=True)
    return _halves(start, until, "ledger")
