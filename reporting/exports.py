"""Raw ledger rows as JSON, CSV or Markdown, streamed (`manage.py token export`).

Reports (reporting.reports) answer from rollups; an export is the ledger itself, one line per
request, so it reads the raw rows in chunks and never holds the file, or the result set, in
memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import QuerySet

from reporting import formats
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.models import TokenUsage
from usage.pricing import money
from usage.selectors import usage_for_principal

COLUMNS = (
    "request_id",
    "occurred_at",
    "provider",
    "model",
    "team_id",
    "project_id",
    "user_id",
    "feature",
    "agent",
    "task_type",
    "workflow_id",
    "conversation_id",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "total_tokens",
    "cost",
    "unpriced",
    "estimated",
    "latency_ms",
)
_OCCURRED_AT, _COST = COLUMNS.index("occurred_at"), COLUMNS.index("cost")
# Rows fetched per round trip (a server-side cursor on PostgreSQL), and how often the caller's
# progress callback hears of them.
CHUNK_ROWS = 5000
_JSON_CHUNK = 500

Progress = Callable[[int], None]


def _rows(
    principal: Principal, filters: dict[str, str], since: datetime, until: datetime
) -> QuerySet[TokenUsage]:
    """The caller's ledger rows in [since, until) matching `filters` (exact column values); a
    400 naming `since` when retention has deleted raw usage inside the range, since an export
    would silently miss it."""
    cutoff = rollups.purged_before()
    if cutoff is not None and since < cutoff:
        raise ApiError(
            "Raw usage in this range was deleted by retention.",
            fields={"since": [f"Start at or after {cutoff.isoformat()}."]},
        )
    return usage_for_principal(principal).filter(
        occurred_at__gte=since, occurred_at__lt=until, **filters
    )


def usage_export_count(
    principal: Principal, *, filters: dict[str, str], since: datetime, until: datetime
) -> int:
    """How many rows `usage_export` yields for the same arguments (the progress bar's total)."""
    return _rows(principal, filters, since, until).count()


def _records(rows: QuerySet[TokenUsage], progress: Progress | None) -> Iterator[dict[str, Any]]:
    """One dict per ledger row, oldest first, as every format shows it (cost as exact Decimal
    text). Runs inside a transaction: on PostgreSQL Django's server-side cursor is then a plain
    one that streams, where in autocommit it would be WITH HOLD and the server would materialise
    the whole result before the first row."""
    values = rows.order_by("occurred_at", "id").values_list(*COLUMNS)
    seen = 0
    with transaction.atomic():
        for row in values.iterator(chunk_size=CHUNK_ROWS):
            record = dict(zip(COLUMNS, row, strict=True))
            record["occurred_at"] = row[_OCCURRED_AT].isoformat()
            record["cost"] = money(row[_COST])
            yield record
            seen += 1
            if progress is not None and seen % CHUNK_ROWS == 0:
                progress(CHUNK_ROWS)
    if progress is not None and seen % CHUNK_ROWS:
        progress(seen % CHUNK_ROWS)


def _json_array(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    parts: list[str] = []
    first = True
    for record in records:
        parts.append(("[\n" if first else ",\n") + json.dumps(record, separators=(",", ":")))
        first = False
        if len(parts) == _JSON_CHUNK:
            yield "".join(parts)
            parts.clear()
    parts.append("[]\n" if first else "\n]\n")
    yield "".join(parts)


def usage_export(
    principal: Principal,
    *,
    filters: dict[str, str],
    since: datetime,
    until: datetime,
    fmt: str,
    progress: Progress | None = None,
) -> Iterator[str]:
    """The caller's ledger rows in [since, until) as text chunks of `fmt` (json: an array of
    objects; csv: a header and one line per row; md: a Markdown table), oldest first. Nothing
    is read until the first chunk is asked for; `progress(n)` hears of every n rows read."""
    if fmt not in formats.FORMATS:
        raise ApiError(
            "Unknown format.", fields={"format": [f"Use one of {', '.join(formats.FORMATS)}."]}
        )
    records = _records(_rows(principal, filters, since, until), progress)
    if fmt == "json":
        return _json_array(records)
    if fmt == "csv":
        return formats.csv_lines(COLUMNS, records)
    return formats.md_table(COLUMNS, records)
