"""Price overrides: written here, the price cache invalidated after commit."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from usage import pricing
from usage.models import ModelPrice


def model_price_set(
    *,
    provider: str,
    model: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cache_read_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    effective_from: datetime | None = None,
    note: str = "",
) -> tuple[ModelPrice, bool]:
    """Create or replace the override for (provider, model, effective_from): (row, created)."""
    effective_from = effective_from or timezone.now()
    row, created = ModelPrice.objects.update_or_create(
        provider=provider.lower(),
        model=model,
        effective_from=effective_from,
        defaults={
            "input_per_mtok": input_per_mtok,
            "output_per_mtok": output_per_mtok,
            "cache_read_per_mtok": cache_read_per_mtok,
            "cache_write_per_mtok": cache_write_per_mtok,
            "note": note,
        },
    )
    transaction.on_commit(pricing.overrides.invalidate)
    return row, created


def model_price_delete(*, price: ModelPrice) -> None:
    """Remove an override: from then on its model is priced by an older override or the
    catalogue (rows already in the ledger keep their cost)."""
    price.delete()
    transaction.on_commit(pricing.overrides.invalidate)
