from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot

from tests.conftest import Persona, event, settle
from usage import pricing
from usage.models import ModelPrice, TokenUsage

pytestmark = pytest.mark.django_db

SHAPES = [
    {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_read_tokens": 200,
        "cache_write_tokens": 100,
    },
    {
        "input_tokens": 300_000,
        "output_tokens": 2_000,
        "cache_read_tokens": 50_000,
        "cache_write_tokens": 0,
    },
    {"input_tokens": 7, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0},
]


def test_the_fast_cost_equals_genai_prices_for_every_token_priced_model() -> None:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    compared = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            rates = pricing._catalogue_rates(model, at)
            if rates is None:
                continue
            for shape in SHAPES:
                expected = model.calc_price(Usage(**shape), provider, genai_request_timestamp=at)
                got_in, got_out, fee = pricing.cost_for(
                    rates,
                    input_tokens=shape["input_tokens"],
                    output_tokens=shape["output_tokens"],
                    cache_read=shape["cache_read_tokens"],
                    cache_write=shape["cache_write_tokens"],
                )
                assert got_in + got_out + fee == expected.total_price, (
                    provider.id,
                    model.id,
                    shape,
                )
                compared += 1
    assert compared > 3000


def test_an_override_wins_from_its_effective_date_and_history_is_kept(platform: Persona) -> None:
    start = timezone.now() - timedelta(days=1)
    ModelPrice.objects.create(
        provider="openai", model="gpt-4o", input_per_mtok=1, output_per_mtok=2, effective_from=start
    )
    before = (start - timedelta(days=2)).isoformat()
    batch = [event("old", model="gpt-4o", occurred_at=before), event("new", model="gpt-4o")]
    platform.client.post("/api/v1/usage/batch", {"events": batch}, format="json")
    settle()
    old, new = TokenUsage.objects.get(request_id="old"), TokenUsage.objects.get(request_id="new")
    assert old.price_source == "catalogue"
    assert new.price_source == "override"
    assert new.cost == Decimal("100") / 10**6 * 1 + Decimal("20") / 10**6 * 2
    assert new.price_ref.startswith("override #")


def test_a_provider_specific_override_beats_an_any_provider_one(db: None) -> None:
    start = timezone.now() - timedelta(days=1)
    ModelPrice.objects.create(
        model="my-llm", input_per_mtok=5, output_per_mtok=5, effective_from=start
    )
    ModelPrice.objects.create(
        provider="ollama", model="my-llm", input_per_mtok=0, output_per_mtok=0, effective_from=start
    )
    now = timezone.now()
    local = pricing.price_usage(
        provider="ollama", model="my-llm", at=now, input_tokens=10**6, output_tokens=0
    )
    hosted = pricing.price_usage(
        provider="vllm", model="my-llm", at=now, input_tokens=10**6, output_tokens=0
    )
    assert (local.cost, local.unpriced) == (0, False)
    assert hosted.cost == 5


def test_update_pricing_through_the_api_reprices_new_usage(platform: Persona) -> None:
    body = {"provider": "ollama", "model": "llama3", "input_per_mtok": "0.5", "output_per_mtok": 1}
    response = platform.client.post("/api/v1/pricing", body, format="json")
    assert response.status_code == 201
    platform.client.post(
        "/api/v1/usage", event("llama", provider="ollama", model="llama3"), format="json"
    )
    settle()
    row = TokenUsage.objects.get(request_id="llama")
    assert (row.unpriced, row.cost) == (False, Decimal("0.00007"))


def test_a_scoped_key_cannot_change_prices(member: Persona) -> None:
    body = {"model": "gpt-4o", "input_per_mtok": 0, "output_per_mtok": 0}
    assert member.client.post("/api/v1/pricing", body, format="json").status_code == 403
    assert not ModelPrice.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m", "input_per_mtok": -1, "output_per_mtok": 1}, "input_per_mtok"),
        ({"model": "m", "input_per_mtok": "abc", "output_per_mtok": 1}, "input_per_mtok"),
        ({"model": "", "input_per_mtok": 1, "output_per_mtok": 1}, "model"),
        ({"model": "m", "input_per_mtok": 1}, "output_per_mtok"),
    ],
)
def test_bad_price_overrides_are_rejected(platform: Persona, body: dict, field: str) -> None:
    response = platform.client.post("/api/v1/pricing", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not ModelPrice.objects.exists()


def test_quote_prices_one_request(platform: Persona) -> None:
    body = {"model": "gpt-4o-mini", "input_tokens": 1_000_000, "output_tokens": 1_000_000}
    quote = platform.client.post("/api/v1/pricing/quote", body, format="json").json()
    assert (quote["cost"], quote["input_cost"], quote["output_cost"]) == ("0.75", "0.15", "0.6")
    assert quote["context_window"] == 128000


def test_compare_lists_cheapest_first_and_unknown_models_last(platform: Persona) -> None:
    models = [
        "gpt-4o",
        "no-such-model",
        {"provider": "anthropic", "model": "claude-sonnet-4-5"},
        "gpt-4o-mini",
    ]
    body = {"models": models, "input_tokens": 10_000, "output_tokens": 1_000}
    results = platform.client.post("/api/v1/pricing/compare", body, format="json").json()["results"]
    assert [r["model"] for r in results] == [
        "gpt-4o-mini",
        "gpt-4o",
        "claude-sonnet-4-5",
        "no-such-model",
    ]
    costs = [Decimal(r["cost"]) for r in results[:3]]
    assert costs == sorted(costs)
    assert results[-1]["unpriced"] is True


def test_compare_rejects_an_empty_model_list(platform: Persona) -> None:
    response = platform.client.post("/api/v1/pricing/compare", {"models": []}, format="json")
    assert response.status_code == 400
    assert "models" in response.json()["error"]["fields"]


def test_the_catalogue_lists_models_and_filters_by_provider(platform: Persona) -> None:
    body = platform.client.get("/api/v1/pricing?provider=anthropic&model=sonnet").json()
    assert body["catalogue"]
    assert {r["provider"] for r in body["catalogue"]} == {"anthropic"}
    assert all("sonnet" in r["model"] for r in body["catalogue"])


def test_catalogue_prices_follow_the_date_the_request_happened(platform: Persona) -> None:
    # The catalogue dropped claude-sonnet-4-6's >200k-token tier on 2026-03-13.
    long_prompt = {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 300_000}
    batch = [
        event("before", output_tokens=0, occurred_at="2026-03-01T12:00:00Z", **long_prompt),
        event("after", output_tokens=0, occurred_at="2026-04-01T12:00:00Z", **long_prompt),
    ]
    platform.client.post("/api/v1/usage/batch", {"events": batch}, format="json")
    settle()
    before = TokenUsage.objects.get(request_id="before").cost
    after = TokenUsage.objects.get(request_id="after").cost
    assert (before, after) == (Decimal("1.8"), Decimal("0.9"))
