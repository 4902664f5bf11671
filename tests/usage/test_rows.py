from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from usage.rows import (
    PRE_LINEAGE_COLUMNS,
    ROW_COLUMNS,
    decode_line,
    encode_line,
    line_request_id,
    upgrade_legacy_line,
)


def _row(**overrides: object) -> tuple[object, ...]:
    values: dict[str, object] = dict.fromkeys(ROW_COLUMNS, "")
    values.update(
        occurred_at=datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC),
        received_at=datetime(2026, 11, 21, 10, 0, 1, tzinfo=UTC),
        input_tokens=1000, output_tokens=5, cache_read_tokens=0, cache_write_tokens=0,
        cost=Decimal("1E-7"), input_cost=Decimal("0.0000001"), output_cost=Decimal(0),
        unpriced=False, estimated=True, latency_ms=None, metadata={}, cache_hit=None, depth=0,
        system_context={},
    )  # fmt: skip
    values.update(overrides)
    return tuple(values[c] for c in ROW_COLUMNS)


def test_a_row_survives_the_copy_text_round_trip_with_awkward_text() -> None:
    row = _row(
        request_id="a\\b c",
        intent="tab\there\nnew line\rreturn \\N literal",
        metadata={"note": "multi\nline\ttab", "n": [1, 2.5, None]},
        latency_ms=42,
        cache_hit=True,
    )
    line = encode_line(row)
    assert "\n" not in line
    assert line.count("\t") == len(ROW_COLUMNS) - 1
    assert decode_line(line) == row
    assert line_request_id(line) == "a\\b c"


def test_nulls_and_booleans_use_copy_notation() -> None:
    fields = encode_line(_row(request_id="r")).split("\t")
    assert fields[ROW_COLUMNS.index("latency_ms")] == "\\N"
    assert fields[ROW_COLUMNS.index("estimated")] == "t"
    assert fields[ROW_COLUMNS.index("unpriced")] == "f"


def test_a_line_buffered_before_the_lineage_columns_gets_their_defaults() -> None:
    row = _row(request_id="child", parent_request_id="parent", depth=None, tenant="org")
    fields = encode_line(row).split("\t")
    old = "\t".join(fields[: PRE_LINEAGE_COLUMNS - 1] + fields[-1:])  # no lineage columns
    upgraded = decode_line(upgrade_legacy_line(old))
    assert upgraded == row  # depth None: waits for its parent; the others empty
    root = _row(request_id="root", tenant="org")
    fields = encode_line(root).split("\t")
    assert decode_line("\t".join(fields[: PRE_LINEAGE_COLUMNS - 1] + fields[-1:])) == root


def test_a_plain_row_takes_the_fast_path_and_survives_the_round_trip() -> None:
    row = _row(
        request_id="plain-1", model="gpt-4o", latency_ms=120, cache_hit=False, depth=3,
        metadata={"k": [1, 2]}, system_context={"env": "prod"}, parent_request_id="p",
    )  # fmt: skip
    line = encode_line(row)
    assert line.count("\t") == len(ROW_COLUMNS) - 1
    assert decode_line(line) == row
