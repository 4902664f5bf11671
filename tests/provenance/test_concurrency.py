"""Lineage under concurrent inserts (issue 11, PostgreSQL): a parent and its children committed
side by side must still find each other."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.conftest import run_concurrently
from usage.models import TokenUsage
from usage.rows import ROW_COLUMNS, Row
from usage.services import usage_rows_insert

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _row(request_id: str, parent: str = "") -> Row:
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    values: dict[str, object] = dict.fromkeys(ROW_COLUMNS, "")
    values.update(
        request_id=request_id, occurred_at=at, received_at=at, model="m", input_tokens=1,
        output_tokens=1, cache_read_tokens=0, cache_write_tokens=0, cost=Decimal(0),
        input_cost=Decimal(0), output_cost=Decimal(0), currency="USD", price_source="unpriced",
        unpriced=True, estimated=False, status="success", latency_ms=None, metadata={},
        cache_hit=None, parent_request_id=parent, depth=None if parent else 0,
        system_context={}, tenant="org",
    )  # fmt: skip
    return tuple(values[c] for c in ROW_COLUMNS)


def test_it_resolves_children_committed_alongside_their_parents() -> None:
    for round_ in range(5):
        parents = [_row(f"p{round_}-{i}") for i in range(300)]
        children = [_row(f"c{round_}-{i}", f"p{round_}-{i}") for i in range(300)]
        batches = iter([parents, children])
        run_concurrently(lambda batches=batches: usage_rows_insert(next(batches)), 2)
    waiting = TokenUsage.objects.filter(depth__isnull=True).count()
    assert waiting == 0
    assert set(
        TokenUsage.objects.filter(request_id__startswith="c").values_list("depth", flat=True)
    ) == {1}
