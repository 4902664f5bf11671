"""A ledger row's layout, and its PostgreSQL COPY text form.

Rows are encoded once, by the API process that accepted them, into COPY text lines; the buffer
carries those lines and the flush hands them to COPY as they are, so no value is decoded and
re-adapted on the way to the database. `decode_line` exists for databases without COPY (SQLite).
"""

from __future__ import annotations

import json
import operator
from datetime import datetime
from decimal import Decimal
from typing import Any

# Column order of a ledger row everywhere rows travel (buffer lines, COPY, INSERT).
ROW_COLUMNS = (
    "request_id", "occurred_at", "received_at", "provider", "model", "input_tokens",
    "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost", "input_cost",
    "output_cost", "currency", "price_source", "price_ref", "unpriced", "estimated", "team_id",
    "project_id", "user_id", "feature", "agent", "task_type", "conversation_id", "workflow_id",
    "status", "error_type", "latency_ms", "metadata", "reservation_id", "parent_request_id",
    "root_request_id", "relationship", "intent", "input_hash", "output_hash", "cache_hit",
    "depth", "agent_type", "workflow_step", "system_context", "input_text", "output_text",
    "tenant",
)  # fmt: skip
# A row is identified by (tenant, request_id): request_id is unique per tenant. tenant is the
# last column, and the lineage columns come just before it, so that a line buffered before they
# existed (LEGACY_COLUMNS, PRE_LINEAGE_COLUMNS) can be completed.
TENANT_COL = len(ROW_COLUMNS) - 1
_FIRST_LINEAGE = ROW_COLUMNS.index("depth")
# Field counts of older line layouts: without tenant and lineage; with tenant, without lineage.
LEGACY_COLUMNS = _FIRST_LINEAGE
PRE_LINEAGE_COLUMNS = _FIRST_LINEAGE + 1
Row = tuple[Any, ...]
# Column name -> position in a row.
ROW_INDEX = {name: i for i, name in enumerate(ROW_COLUMNS)}

DATETIME_COLS = frozenset(ROW_COLUMNS.index(c) for c in ("occurred_at", "received_at"))
DECIMAL_COLS = frozenset(ROW_COLUMNS.index(c) for c in ("cost", "input_cost", "output_cost"))
INT_COLS = frozenset(
    ROW_COLUMNS.index(c)
    for c in (
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "latency_ms",
        "depth",
    )
)
BOOL_COLS = frozenset(ROW_COLUMNS.index(c) for c in ("unpriced", "estimated", "cache_hit"))
METADATA_COL = ROW_COLUMNS.index("metadata")
JSON_COLS = frozenset(ROW_COLUMNS.index(c) for c in ("metadata", "system_context"))
_PARENT = ROW_COLUMNS.index("parent_request_id")

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def copy_text(value: str) -> str:
    """A text value in COPY text format (for other tables written by COPY too)."""
    return value.translate(_ESCAPES)


def _field(value: Any) -> str:
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":")).translate(_ESCAPES)
    if isinstance(value, str):
        return value.translate(_ESCAPES)
    return str(value)  # int, Decimal (PostgreSQL numeric accepts "1E-7")


def _slow_line(row: Row) -> str:
    return "\t".join(map(_field, row))


def _opt(encode: Any) -> Any:
    return lambda value: "\\N" if value is None else encode(value)


_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))
# The non-text columns' encoders (what _field does, without asking each value its type).
_TYPED = [
    (i, _opt(datetime.isoformat) if i in DATETIME_COLS
     else _opt(str) if i in DECIMAL_COLS or i in INT_COLS
     else _opt(lambda v: "t" if v else "f") if i in BOOL_COLS
     else _opt(lambda v: _JSON_ENCODER.encode(v).translate(_ESCAPES)))
    for i in sorted(DATETIME_COLS | DECIMAL_COLS | INT_COLS | BOOL_COLS | JSON_COLS)
]  # fmt: skip
_texts = operator.itemgetter(
    *(i for i in range(len(ROW_COLUMNS)) if i not in {j for j, _enc in _TYPED})
)


def encode_line(row: Row) -> str:
    """One COPY text line (no trailing newline). Text needing no escapes (nearly all) is
    written as it is: one search over all of a row's text instead of one per field."""
    try:
        text = "".join(_texts(row))
    except TypeError:  # a text column holding something else: the general path
        return _slow_line(row)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return _slow_line(row)
    fields = list(row)
    for i, encode in _TYPED:
        fields[i] = encode(fields[i])
    return "\t".join(fields)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out = []
    chars = iter(text)
    for ch in chars:
        out.append(_UNESCAPES[next(chars)] if ch == "\\" else ch)
    return "".join(out)


def line_request_id(line: str) -> str:
    return _unescape(line.split("\t", 1)[0])


def line_key(line: str) -> tuple[str, str]:
    """(tenant, request_id) of a line."""
    return _unescape(line.rsplit("\t", 1)[1]), _unescape(line.split("\t", 1)[0])


def row_key(row: Row) -> tuple[str, str]:
    return row[TENANT_COL], row[0]


def tenant_by_attribution(team_id: str, project_id: str) -> str:
    """The tenant given to rows recorded before tenants existed (and by the data migration):
    the key that could record them is assumed from their attribution."""
    if project_id:
        return f"p:{team_id}/{project_id}"
    if team_id:
        return f"t:{team_id}"
    return "org"


_TEAM, _PROJECT = ROW_COLUMNS.index("team_id"), ROW_COLUMNS.index("project_id")
_ROOT, _REL, _DEPTH = (
    ROW_COLUMNS.index("root_request_id"),
    ROW_COLUMNS.index("relationship"),
    ROW_COLUMNS.index("depth"),
)
# Fields up to and including depth: what line_lineage needs to split off.
_LINEAGE_SPLITS = _DEPTH + 1


def line_lineage(line: str) -> tuple[str, str, str, str, int | None]:
    """(request_id, parent_request_id, root_request_id, relationship, depth) of a line."""
    f = line.split("\t", _LINEAGE_SPLITS)
    depth = None if f[_DEPTH] == "\\N" else int(f[_DEPTH])
    return _unescape(f[0]), _unescape(f[_PARENT]), _unescape(f[_ROOT]), f[_REL], depth


def row_lineage(row: Row) -> tuple[str, str, str, str, int | None]:
    return row[0], row[_PARENT], row[_ROOT], row[_REL], row[_DEPTH]


def line_with_lineage(line: str, depth: int, root: str) -> str:
    f = line.split("\t")
    f[_DEPTH], f[_ROOT] = str(depth), root.translate(_ESCAPES)
    return "\t".join(f)


def row_with_lineage(row: Row, depth: int | None, root: str) -> Row:
    values = list(row)
    values[_DEPTH], values[_ROOT] = depth, root
    return tuple(values)


def _lineage_defaults(parent_field: str) -> list[str]:
    # A row without a parent is a root (depth 0); one with a parent waits for its parent's depth.
    return ["0" if parent_field == "" else "\\N", "", "", "{}", "", ""]


def upgrade_legacy_line(line: str) -> str:
    """A line buffered in an older layout (without tenant: it gets its attribution's tenant, see
    tenant_by_attribution; without the lineage columns: defaults), completed to the current
    layout; a current line is returned as it is."""
    fields = line.split("\t")
    if len(fields) == LEGACY_COLUMNS:
        tenant = tenant_by_attribution(_unescape(fields[_TEAM]), _unescape(fields[_PROJECT]))
        fields.append(tenant.translate(_ESCAPES))
    elif len(fields) != PRE_LINEAGE_COLUMNS:
        return line
    fields[-1:-1] = _lineage_defaults(fields[_PARENT])
    return "\t".join(fields)


def decode_line(line: str) -> Row:
    values: list[Any] = []
    line = upgrade_legacy_line(line)
    for index, raw in enumerate(line.split("\t")):
        if raw == "\\N":
            values.append(None)
        elif index in DATETIME_COLS:
            values.append(datetime.fromisoformat(raw))
        elif index in DECIMAL_COLS:
            values.append(Decimal(raw))
        elif index in INT_COLS:
            values.append(int(raw))
        elif index in BOOL_COLS:
            values.append(raw == "t")
        elif index in JSON_COLS:
            values.append(json.loads(_unescape(raw)))
        else:
            values.append(_unescape(raw))
    return tuple(values)
