"""Re-pricing past usage: each ledger row of a range priced again with the price in effect when it
occurred (an override from its effective_from on, else the catalogue), as a dry run or applied.

Applying is one transaction, however many batches the range takes: the rows are read (and
locked) in keyset batches, the changed ones rewritten in one statement per batch, the rollups
moved by the difference (usage.rollups.adjust), an audit row written (`Repricing`), and
`usage.hooks.costs_rewritten` sent, so budgets correct their counters once it commits. Money is
exact Decimal at the ledger's scale throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from tokenmgr_project.core.errors import ApiError
from usage import hooks, pricing, rollups
from usage.models import ATTRIBUTION_DIMENSIONS, Repricing, TokenUsage

BATCH_ROWS = 5_000
SLICE = timedelta(hours=1)
MAX_RANGE = timedelta(days=366)
# The price a row is stored with: what repricing rewrites.
PRICE_COLUMNS = ("cost", "input_cost", "output_cost", "price_source", "price_ref", "unpriced")
_READ_COLUMNS = tuple(dict.fromkeys(("id", *rollups.ADJUST_COLUMNS, *PRICE_COLUMNS)))
# The attribution of a changed row that costs_rewritten names (what budgets are keyed on is
# theirs to know): the attribution dimensions the rollups keep.
SPAN_DIMENSIONS = tuple(d for d in rollups.FINE_DIMENSIONS if d in ATTRIBUTION_DIMENSIONS)
_ZERO = Decimal(0)
LedgerRow = dict[str, Any]  # a ledger row's _READ_COLUMNS


@dataclass(slots=True)
class ModelDifference:
    """One provider and model's rows in the range: their cost before and after repricing."""

    provider: str
    model: str
    rows: int = 0
    rows_changed: int = 0  # rows whose stored price (cost, source or reference) changes
    cost_before: Decimal = _ZERO
    cost_after: Decimal = _ZERO

    @property
    def difference(self) -> Decimal:
        return self.cost_after - self.cost_before

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "rows": self.rows,
            "rows_changed": self.rows_changed,
            "cost_before": pricing.money(self.cost_before),
            "cost_after": pricing.money(self.cost_after),
            "difference": pricing.money(self.difference),
        }


@dataclass(slots=True)
class RepriceResult:
    since: datetime
    until: datetime
    provider: str
    model: str
    applied: bool
    by_model: dict[tuple[str, str], ModelDifference] = field(default_factory=dict)
    repricing: Repricing | None = None  # the audit row, when applied

    @property
    def models(self) -> list[ModelDifference]:
        return [self.by_model[key] for key in sorted(self.by_model)]

    @property
    def rows_seen(self) -> int:
        return sum(m.rows for m in self.by_model.values())

    @property
    def rows_changed(self) -> int:
        return sum(m.rows_changed for m in self.by_model.values())

    @property
    def cost_before(self) -> Decimal:
        return sum((m.cost_before for m in self.by_model.values()), _ZERO)

    @property
    def cost_after(self) -> Decimal:
        return sum((m.cost_after for m in self.by_model.values()), _ZERO)

    @property
    def difference(self) -> Decimal:
        return self.cost_after - self.cost_before


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if timezone.is_naive(value) else value


def _checked_range(since: datetime, until: datetime) -> tuple[datetime, datetime]:
    since, until = _aware(since), _aware(until)
    if since >= until:
        raise ApiError("Invalid time range.", fields={"until": ["Must be after since."]})
    if until - since > MAX_RANGE:
        raise ApiError(
            "Range too long.",
            fields={"until": [f"At most {MAX_RANGE.days} days after since: re-price in parts."]},
        )
    cutoff = rollups.purged_before()
    if cutoff is not None and since < cutoff:
        raise ApiError(
            "Raw usage in this range was deleted by retention.",
            fields={
                "since": [
                    f"Raw usage before {cutoff.isoformat()} was deleted by retention (only "
                    "rollups remain, which cannot be priced row by row): start at or after it."
                ]
            },
        )
    return since, until


def _ledger(provider: str, model: str) -> QuerySet[TokenUsage]:
    rows = TokenUsage.objects.all()
    # Matched as prices are (usage.pricing: case-insensitive), so an override's own model and
    # provider select the rows it prices.
    if provider:
        rows = rows.filter(provider__iexact=provider)
    if model:
        rows = rows.filter(model__iexact=model)
    return rows


def _batches(
    rows: QuerySet[TokenUsage], *, since: datetime, until: datetime, lock: bool
) -> Iterator[list[LedgerRow]]:
    """The rows of [since, until) in (occurred_at, id) order, at most BATCH_ROWS at a time,
    one UTC hour (SLICE) at a time: keyset pages inside the hour. Each query reads at most an
    hour of the ledger whichever index the planner picks for the filters (one over the whole
    rest of the range per page would make a long walk quadratic); an empty hour is followed
    by a look for the next row, so empty stretches cost one query. `lock`: FOR UPDATE, so a
    concurrent repricing (or retention) of the same rows waits for this transaction."""
    start = since.astimezone(UTC)
    until = until.astimezone(UTC)
    while start < until:
        end = min(start.replace(minute=0, second=0, microsecond=0) + SLICE, until)
        hour = rows.filter(occurred_at__gte=start, occurred_at__lt=end)
        after: tuple[datetime, int] | None = None
        seen = 0
        while True:
            page = hour
            if after is not None:
                at, pk = after
                page = page.filter(occurred_at__gte=at).filter(
                    Q(occurred_at__gt=at) | Q(occurred_at=at, pk__gt=pk)
                )
            if lock:
                page = page.select_for_update()
            batch = list(page.order_by("occurred_at", "pk").values(*_READ_COLUMNS)[:BATCH_ROWS])
            seen += len(batch)
            if batch:
                yield batch
            if len(batch) < BATCH_ROWS:
                break
            after = (batch[-1]["occurred_at"], batch[-1]["id"])
        start = end
        if not seen:
            found = (
                rows.filter(occurred_at__gte=start, occurred_at__lt=until)
                .order_by("occurred_at")
                .values_list("occurred_at", flat=True)
                .first()
            )
            if found is None:
                return
            start = found.astimezone(UTC)


def _repriced(row: LedgerRow) -> LedgerRow:
    price = pricing.price_usage(
        provider=row["provider"],
        model=row["model"],
        at=row["occurred_at"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cache_read_tokens=row["cache_read_tokens"],
        cache_write_tokens=row["cache_write_tokens"],
    )
    return {
        **row,
        "cost": price.cost,
        "input_cost": price.input_cost,
        "output_cost": price.output_cost,
        "price_source": price.source,
        "price_ref": price.ref,
        "unpriced": price.unpriced,
    }


def _tally(result: RepriceResult, batch: list[LedgerRow]) -> list[tuple[LedgerRow, LedgerRow]]:
    """Price a batch into the result's table; returns the changed rows as (before, after)."""
    changed = []
    for row in batch:
        after = _repriced(row)
        key = (row["provider"], row["model"])
        into = result.by_model.get(key)
        if into is None:
            into = result.by_model[key] = ModelDifference(*key)
        into.rows += 1
        into.cost_before += row["cost"]
        into.cost_after += after["cost"]
        if any(row[c] != after[c] for c in PRICE_COLUMNS):
            into.rows_changed += 1
            changed.append((row, after))
    return changed


def _rewrite(rows: list[LedgerRow]) -> None:
    """Store the rows' new prices: one UPDATE … FROM unnest(…) on PostgreSQL, else (SQLite)
    Django's bulk_update (an UPDATE with CASE per batch)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {TokenUsage._meta.db_table} AS u SET cost = v.cost, "
                "input_cost = v.input_cost, output_cost = v.output_cost, "
                "price_source = v.price_source, price_ref = v.price_ref, unpriced = v.unpriced "
                "FROM unnest(%s::bigint[], %s::numeric[], %s::numeric[], %s::numeric[], "
                "%s::text[], %s::text[], %s::boolean[]) "
                "AS v(id, cost, input_cost, output_cost, price_source, price_ref, unpriced) "
                "WHERE u.id = v.id",
                [[r["id"] for r in rows], *([r[c] for r in rows] for c in PRICE_COLUMNS)],
            )
        return
    TokenUsage.objects.bulk_update(
        [TokenUsage(pk=r["id"], **{c: r[c] for c in PRICE_COLUMNS}) for r in rows],
        PRICE_COLUMNS,
        batch_size=500,
    )


def _note_spans(spans: dict[tuple[str, ...], list[datetime]], rows: list[LedgerRow]) -> None:
    """Per attribution, the first and last occurred_at of its changed rows
    (hooks.costs_rewritten)."""
    for row in rows:
        at = row["occurred_at"]
        key = tuple(row[d] for d in SPAN_DIMENSIONS)
        span = spans.get(key)
        if span is None:
            spans[key] = [at, at]
        else:
            span[0], span[1] = min(span[0], at), max(span[1], at)


def usage_reprice(
    *,
    since: datetime,
    until: datetime,
    provider: str = "",
    model: str = "",
    apply: bool = False,
    actor: str = "",
) -> RepriceResult:
    """Price every ledger row in [since, until) (of one provider and/or model, matched without
    regard to case) with the price in effect when it occurred, and report per provider and model
    the rows, those whose stored price changes, and the cost before and after.

    A dry run (default) writes nothing. `apply` rewrites the changed rows' cost, input_cost,
    output_cost, price_source, price_ref and unpriced, adjusts the rollups, records a
    `Repricing` by `actor`, all in one transaction; budget counters follow after the commit.
    A 400 naming `until` for an inverted range or one over MAX_RANGE, naming `since` for one
    reaching before what retention deleted. Usage still in the Redis buffer is not yet in the
    ledger and is not re-priced (it was priced when accepted)."""
    since, until = _checked_range(since, until)
    # The overrides as they are now: one saved a moment ago in another process counts.
    pricing.overrides.invalidate()
    result = RepriceResult(since, until, provider, model, applied=apply)
    rows = _ledger(provider, model)
    if not apply:
        for batch in _batches(rows, since=since, until=until, lock=False):
            _tally(result, batch)
        return result
    spans: dict[tuple[str, ...], list[datetime]] = {}
    with transaction.atomic():
        for batch in _batches(rows, since=since, until=until, lock=True):
            changed = _tally(result, batch)
            if not changed:
                continue
            _rewrite([after for _before, after in changed])
            rollups.adjust(before=[b for b, _a in changed], after=[a for _b, a in changed])
            _note_spans(spans, [after for _before, after in changed])
        result.repricing = Repricing.objects.create(
            actor=actor,
            applied_at=timezone.now(),
            since=since,
            until=until,
            provider=provider,
            model=model,
            rows_seen=result.rows_seen,
            rows_changed=result.rows_changed,
            cost_before=result.cost_before,
            cost_after=result.cost_after,
            per_model=[m.as_dict() for m in result.models],
        )
        if spans:
            hooks.costs_rewritten.send(
                sender=Repricing,
                spans=[
                    (dict(zip(SPAN_DIMENSIONS, key, strict=True)), first, last)
                    for key, (first, last) in spans.items()
                ],
            )
    return result
