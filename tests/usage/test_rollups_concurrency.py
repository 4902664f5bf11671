"""Rollups under concurrent writers (PostgreSQL): the trigger's upserts of shared hour-groups
from several transactions at once neither deadlock nor lose a row."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum

from tests.conftest import run_concurrently
from usage.models import ModelRollup, TokenUsage, UsageRollup
from usage.rows import ROW_COLUMNS, Row
from usage.services import usage_rows_insert

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]
START = datetime(2026, 11, 30, tzinfo=UTC)


def _row(tenant: str, i: int, rng: random.Random) -> Row:
    at = START + timedelta(minutes=rng.randrange(6 * 60))
    values: dict[str, object] = dict.fromkeys(ROW_COLUMNS, "")
    values.update(
        request_id=f"{tenant}-{i}", occurred_at=at, received_at=at, model=f"m{rng.randrange(4)}",
        team_id=f"t{rng.randrange(3)}", input_tokens=10, output_tokens=1, cache_read_tokens=0,
        cache_write_tokens=0, cost=Decimal("0.0000000123"), input_cost=Decimal(0),
        output_cost=Decimal(0), currency="USD", price_source="catalogue", unpriced=False,
        estimated=False, status="success", latency_ms=None, metadata={}, cache_hit=None,
        depth=0, system_context={}, tenant=tenant,
    )  # fmt: skip
    return tuple(values[c] for c in ROW_COLUMNS)


def test_concurrent_batches_of_shared_groups_all_land_in_the_rollups() -> None:
    # Four tenants (no shared advisory lock), each batch hitting the same hours and groups in
    # its own random order: COPY path (>= 64 rows), one statement and trigger per batch.
    batches = iter(
        [[_row(f"p:t/{n}", i, random.Random(n * 1000 + i)) for i in range(400)] for n in range(4)]
    )
    run_concurrently(lambda: usage_rows_insert(next(batches)), 4)
    assert TokenUsage.objects.count() == 1600
    for model in (UsageRollup, ModelRollup):
        totals = model.objects.aggregate(r=Sum("requests"), c=Sum("cost_units"))
        assert totals == {"r": 1600, "c": 1600 * 123}
