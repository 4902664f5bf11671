"""Prices: the genai-prices snapshot, overridden by admin-edited `ModelPrice` rows.

Costs are Decimal USD. The per-event path is hot (20k events/s), so catalogue look-ups are cached
per (provider, model) and the cost is computed with genai-prices' own unit-price rule (tiers
included) instead of its slower general `calc_price`; tests hold both to the same answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import genai_prices
from genai_prices import types as gp_types
from genai_prices.data_snapshot import get_snapshot

from tokenmgr_project.core import unavailable
from usage.models import ModelPrice, TokenUsage

CURRENCY = "USD"
CATALOGUE_VERSION = f"genai-prices {genai_prices.__version__}"
_PER_MTOK = 1_000_000
_ZERO = Decimal(0)
# Every cost is stored at the ledger's own scale (TokenUsage.cost: 10 decimal places), rounded
# once, here, half away from zero as PostgreSQL's numeric would on insert. So the Decimal in the
# row, the one in the buffer line and the one the budget counters add (budgets.counters units of
# 1e-10 USD) are the same number, and no later step rounds again. Catalogue prices can carry up
# to 18 decimals per million tokens (float artefacts such as 0.041666666666666664), overrides 6.
LEDGER_COST_PLACES: int = TokenUsage._meta.get_field("cost").decimal_places
LEDGER_QUANTUM = Decimal(1).scaleb(-LEDGER_COST_PLACES)


def ledger_cost(value: Decimal) -> Decimal:
    """A cost at the ledger's scale (what the database stores of it, exactly)."""
    return value.quantize(LEDGER_QUANTUM, ROUND_HALF_UP)


# Overrides are re-read at least this often, so an edit in another process applies quickly.
_OVERRIDE_TTL_SECONDS = 5.0


def money(value: Decimal | None) -> str:
    """A Decimal as plain text without exponent or trailing zeros ("0.00725", "0")."""
    if value is None:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True, slots=True)
class PriceResult:
    cost: Decimal
    input_cost: Decimal
    output_cost: Decimal
    source: str
    ref: str
    provider: str
    unpriced: bool
    currency: str = CURRENCY


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-million-token prices; a price may be a genai-prices TieredPrices."""

    input: Any
    output: Any
    cache_read: Any
    cache_write: Any
    per_krequests: Any = None  # a flat fee per 1,000 requests (some search models)


def _unit_cost(price: Any, count: int, total_input: int) -> Decimal:
    if price is None or not count:
        return _ZERO
    return gp_types.calc_unit_price(price, count, total_input, _PER_MTOK)


def cost_for(
    rates: Rates, *, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int
) -> tuple[Decimal, Decimal, Decimal]:
    """(input_cost, output_cost, request_fee). `input_tokens` is the whole prompt, cache
    reads/writes included; cache tokens without a price of their own are billed at the input
    price, as genai-prices does. One usage event is one request.
    """
    uncached = input_tokens
    cache_cost = _ZERO
    if rates.cache_read is not None:
        uncached -= cache_read
        cache_cost += _unit_cost(rates.cache_read, cache_read, input_tokens)
    if rates.cache_write is not None:
        uncached -= cache_write
        cache_cost += _unit_cost(rates.cache_write, cache_write, input_tokens)
    input_cost = _unit_cost(rates.input, uncached, input_tokens) + cache_cost
    output_cost = _unit_cost(rates.output, output_tokens, input_tokens)
    fee = rates.per_krequests / 1000 if rates.per_krequests else _ZERO
    return input_cost, output_cost, fee


# --- catalogue ---------------------------------------------------------------------------------

_catalogue_cache: dict[tuple[str, str], tuple[gp_types.Provider, gp_types.ModelInfo] | None] = {}


def catalogue_model(
    provider: str, model: str
) -> tuple[gp_types.Provider, gp_types.ModelInfo] | None:
    """The catalogue's provider and model for a reference, or None. Misses are cached too."""
    key = (provider.lower(), model.lower())
    try:
        return _catalogue_cache[key]
    except KeyError:
        pass
    try:
        found: tuple[gp_types.Provider, gp_types.ModelInfo] | None = (
            get_snapshot().find_provider_model(model, None, provider or None, None)
        )
    except LookupError:
        found = None
    _catalogue_cache[key] = found
    return found


def _catalogue_rates(model_info: gp_types.ModelInfo, at: datetime) -> Rates | None:
    mp = model_info.get_prices(at)
    rates = Rates(
        input=mp.input_mtok,
        output=mp.output_mtok,
        cache_read=mp.cache_read_mtok,
        cache_write=mp.cache_write_mtok,
        per_krequests=mp.requests_kcount,
    )
    if rates.input is None and rates.output is None:
        return None  # priced by something other than tokens (audio seconds, images, …)
    return rates


# --- overrides ---------------------------------------------------------------------------------


class _OverrideTable:
    """All ModelPrice rows in memory, keyed by lower-case model, newest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._loaded_once = False
        self._by_model: dict[str, list[ModelPrice]] = {}

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    def fresh(self) -> bool:
        """Are the cached overrides current (pricing would not read the database)?"""
        return time.monotonic() - self._loaded_at < _OVERRIDE_TTL_SECONDS

    def _rows(self, cached_only: bool = False) -> dict[str, list[ModelPrice]]:
        if cached_only or time.monotonic() - self._loaded_at < _OVERRIDE_TTL_SECONDS:
            return self._by_model
        with self._lock:
            if time.monotonic() - self._loaded_at >= _OVERRIDE_TTL_SECONDS:
                by_model: dict[str, list[ModelPrice]] = {}
                try:
                    for row in ModelPrice.objects.order_by("-effective_from"):
                        by_model.setdefault(row.model.lower(), []).append(row)
                except unavailable.DATABASE_ERRORS as exc:
                    # Database down: price with the overrides last read (tried again after the
                    # TTL). Never read: an override could be missed, so nothing is priced (503).
                    if not self._loaded_once:
                        raise
                    unavailable.note(exc, "price overrides")
                    self._loaded_at = time.monotonic()
                    return self._by_model
                self._by_model = by_model
                self._loaded_at = time.monotonic()
                self._loaded_once = True
        return self._by_model

    def find(
        self, provider: str, model: str, at: datetime, *, cached_only: bool = False
    ) -> ModelPrice | None:
        """The override in effect; `cached_only`: from what is loaded, never reloading (the
        caller checked fresh() a moment ago and may not touch the database)."""
        rows = self._rows(cached_only).get(model.lower())
        if not rows:
            return None
        provider = provider.lower()
        fallback = None
        for row in rows:
            if row.effective_from > at:
                continue
            if row.provider.lower() == provider:
                return row
            if not row.provider and fallback is None:
                fallback = row
        return fallback


overrides = _OverrideTable()


def _override_rates(row: ModelPrice) -> Rates:
    return Rates(
        input=row.input_per_mtok,
        output=row.output_per_mtok,
        cache_read=row.cache_read_per_mtok,
        cache_write=row.cache_write_per_mtok,
    )


# --- the one pricing entry point ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceChoice:
    """Which price applies to a (provider, model) at a moment; None rates means unpriced."""

    rates: Rates | None
    source: str
    ref: str
    provider: str


def price_choice(
    provider: str, model: str, at: datetime, *, cached_only: bool = False
) -> PriceChoice:
    override = overrides.find(provider, model, at, cached_only=cached_only)
    if override is not None:
        return PriceChoice(
            _override_rates(override),
            TokenUsage.PriceSource.OVERRIDE,
            f"override #{override.pk} from {override.effective_from:%Y-%m-%d}",
            provider or override.provider,
        )
    found = catalogue_model(provider, model)
    rates = _catalogue_rates(found[1], at) if found else None
    if found is None or rates is None:
        return PriceChoice(None, TokenUsage.PriceSource.UNPRICED, "", provider)
    gp_provider, gp_model = found
    return PriceChoice(
        rates,
        TokenUsage.PriceSource.CATALOGUE,
        f"{CATALOGUE_VERSION}: {gp_provider.id}/{gp_model.id}",
        provider or gp_provider.id,
    )


def price_usage(
    *,
    provider: str,
    model: str,
    at: datetime,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    choice: PriceChoice | None = None,
) -> PriceResult:
    """Price one request. An unknown model is unpriced (cost 0, flagged), never an error.

    `choice` skips the look-up when the caller already resolved this (provider, model, at).
    """
    choice = choice or price_choice(provider, model, at)
    if choice.rates is None:
        return PriceResult(
            cost=_ZERO,
            input_cost=_ZERO,
            output_cost=_ZERO,
            source=choice.source,
            ref="",
            provider=choice.provider,
            unpriced=True,
        )
    input_cost, output_cost, fee = cost_for(
        choice.rates,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read=cache_read_tokens,
        cache_write=cache_write_tokens,
    )
    return PriceResult(
        # Rounded once, as a whole: the ledger's cost is the truth budgets count.
        cost=ledger_cost(input_cost + output_cost + fee),
        input_cost=ledger_cost(input_cost),
        output_cost=ledger_cost(output_cost),
        source=choice.source,
        ref=choice.ref,
        provider=choice.provider,
        unpriced=False,
    )


def context_window(provider: str, model: str) -> int | None:
    found = catalogue_model(provider, model)
    return found[1].context_window if found else None


def _price_value(price: Any) -> tuple[str | None, bool]:
    if price is None:
        return None, False
    if isinstance(price, gp_types.TieredPrices):
        return str(price.base), True
    return str(price), False


def catalogue_choices(at: datetime | None = None) -> Iterator[PriceChoice]:
    """The price choice of every token-priced catalogue model at `at` (default now)."""
    at = at or datetime.now(UTC)
    for gp_provider in get_snapshot().providers:
        for gp_model in gp_provider.models:
            rates = _catalogue_rates(gp_model, at)
            if rates is not None:
                yield PriceChoice(
                    rates,
                    TokenUsage.PriceSource.CATALOGUE,
                    f"{CATALOGUE_VERSION}: {gp_provider.id}/{gp_model.id}",
                    gp_provider.id,
                )


def catalogue_entries(at: datetime | None = None) -> list[dict[str, Any]]:
    """Every token-priced catalogue model at `at` (default now), as plain rows for GET /pricing."""
    at = at or datetime.now(UTC)
    rows = []
    for gp_provider in get_snapshot().providers:
        for gp_model in gp_provider.models:
            rates = _catalogue_rates(gp_model, at)
            if rates is None:
                continue
            values = {
                name: _price_value(getattr(rates, name))
                for name in ("input", "output", "cache_read", "cache_write")
            }
            rows.append(
                {
                    "provider": gp_provider.id,
                    "model": gp_model.id,
                    "name": gp_model.name or gp_model.id,
                    "context_window": gp_model.context_window,
                    "input_per_mtok": values["input"][0],
                    "output_per_mtok": values["output"][0],
                    "cache_read_per_mtok": values["cache_read"][0],
                    "cache_write_per_mtok": values["cache_write"][0],
                    "tiered": any(tiered for _, tiered in values.values()),
                    "currency": CURRENCY,
                    "source": TokenUsage.PriceSource.CATALOGUE.value,
                    "ref": CATALOGUE_VERSION,
                }
            )
    return rows
