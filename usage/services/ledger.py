"""The ledger writer: insert-if-absent on (tenant, request_id), by VALUES or COPY; retention."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from usage import hooks
from usage import rows as rows_codec
from usage.models import LedgerPurge, TokenUsage
from usage.rows import JSON_COLS, ROW_COLUMNS, TENANT_COL, Row
from usage.services.config import manager_config

_TABLE = TokenUsage._meta.db_table
_COLS = ", ".join(ROW_COLUMNS)
# Rows per INSERT … VALUES statement (SQLite allows 32,766 bound parameters).
_VALUES_CHUNK = 800
# At or above this many rows, PostgreSQL takes the COPY path.
_COPY_THRESHOLD = 64


def _db_params(row: Row) -> list[Any]:
    ops = connection.ops
    values = list(row)
    for i in rows_codec.DATETIME_COLS:
        values[i] = ops.adapt_datetimefield_value(values[i])
    for i in JSON_COLS:
        values[i] = json.dumps(values[i], separators=(",", ":"))
    return values


Key = tuple[str, str]  # (tenant, request_id): what identifies a ledger row


def usage_rows_insert(rows: list[Row]) -> set[Key]:
    """Insert ledger rows unless their (tenant, request_id) exists; returns the keys inserted.
    In the same transaction, just before, the lineage hook records what the rows link to."""
    if not rows:
        return set()
    if connection.vendor == "postgresql" and len(rows) >= _COPY_THRESHOLD:
        return usage_lines_insert([rows_codec.encode_line(row) for row in rows])
    inserted: set[Key] = set()
    with transaction.atomic():
        links = [hooks.Link(row[TENANT_COL], *rows_codec.row_lineage(row)) for row in rows]
        changed = hooks.lineage().storing(links)
        if changed:
            rows = [
                rows_codec.row_with_lineage(row, *changed[i]) if i in changed else row
                for i, row in enumerate(rows)
            ]
        for start in range(0, len(rows), _VALUES_CHUNK):
            inserted |= _insert_values(rows[start : start + _VALUES_CHUNK])
    return inserted


def usage_lines_insert(lines: list[str]) -> set[Key]:
    """The same for rows already encoded as COPY text lines (the buffer's form)."""
    if not lines:
        return set()
    if connection.vendor != "postgresql":
        return usage_rows_insert([rows_codec.decode_line(line) for line in lines])
    try:
        # Nearly always nothing conflicts (Redis claimed every id): COPY straight into the ledger.
        with transaction.atomic(), connection.cursor() as cursor:
            data = _with_links(lines, new_only=True)  # COPY fails on any duplicate
            with cursor.cursor.copy(f"COPY {_TABLE} ({_COLS}) FROM STDIN") as copy:
                copy.write(data)
        return {rows_codec.line_key(line) for line in lines}
    except psycopg.errors.UniqueViolation:
        # A re-claimed entry or an old repeat: stage, then insert only the absent rows.
        return _insert_staged(lines)


def _with_links(lines: list[str], *, new_only: bool = False) -> str:
    """The COPY data of `lines` once the lineage hook has recorded their links (inside the
    insert's transaction), with the depth and root it resolved."""
    links = [
        hooks.Link(rows_codec.line_key(line)[0], *rows_codec.line_lineage(line)) for line in lines
    ]
    changed = hooks.lineage().storing(links, new_only=new_only)
    if changed:
        lines = [
            rows_codec.line_with_lineage(line, *changed[i]) if i in changed else line
            for i, line in enumerate(lines)
        ]
    return "\n".join(lines) + "\n"


def _insert_values(rows: list[Row]) -> set[Key]:
    jsonb = connection.vendor == "postgresql"
    one = (
        "("
        + ", ".join(
            "%s::jsonb" if jsonb and c in ("metadata", "system_context") else "%s"
            for c in ROW_COLUMNS
        )
        + ")"
    )
    sql = (
        f"INSERT INTO {_TABLE} ({_COLS}) VALUES {', '.join([one] * len(rows))} "
        "ON CONFLICT (tenant, request_id) DO NOTHING RETURNING tenant, request_id"
    )
    params: list[Any] = []
    for row in rows:
        params.extend(_db_params(row))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {(r[0], r[1]) for r in cursor.fetchall()}


def _insert_staged(lines: list[str]) -> set[Key]:
    with transaction.atomic(), connection.cursor() as cursor:
        data = _with_links(lines)
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS usage_stage ON COMMIT DELETE ROWS AS "
            f"SELECT {_COLS} FROM {_TABLE} WITH NO DATA"
        )
        with cursor.cursor.copy(f"COPY usage_stage ({_COLS}) FROM STDIN") as copy:
            copy.write(data)
        cursor.execute(
            f"INSERT INTO {_TABLE} ({_COLS}) SELECT {_COLS} FROM usage_stage "
            "ON CONFLICT (tenant, request_id) DO NOTHING RETURNING tenant, request_id"
        )
        inserted = {(r[0], r[1]) for r in cursor.fetchall()}
        cursor.execute("TRUNCATE usage_stage")
        return inserted


# --- retention ---------------------------------------------------------------------------------
_PURGE_CHUNK = 10_000


def retention_cutoff(*, now: datetime | None = None) -> datetime | None:
    """Raw rows before this instant (a whole UTC hour) are past retention; None: kept forever."""
    days = manager_config().retention_days
    if days <= 0:
        return None
    return ((now or timezone.now()) - timedelta(days=days)).replace(
        minute=0, second=0, microsecond=0
    )


def usage_purge_expired(*, now: datetime | None = None, max_chunks: int = 100) -> int:
    """Delete ledger rows older than retention_days (0 keeps everything), in bounded chunks.
    Rollups keep their hours (reports over old ranges answer from them); the cutoff is
    recorded (LedgerPurge) so what needs raw rows before it says they are gone."""
    cutoff = retention_cutoff(now=now)
    if cutoff is None:
        return 0
    deleted = 0
    for _ in range(max_chunks):
        ids = list(
            TokenUsage.objects.filter(occurred_at__lt=cutoff).values_list("pk", flat=True)[
                :_PURGE_CHUNK
            ]
        )
        if not ids:
            break
        deleted += TokenUsage.objects.filter(pk__in=ids).delete()[0]
    if deleted:
        LedgerPurge.objects.create(cutoff=cutoff, deleted=deleted, purged_at=timezone.now())
    return deleted
