from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from rest_framework.test import APIClient

from tests.conftest import Persona, event, rows, run_concurrently, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db


def test_it_records_usage_and_prices_it_from_the_catalogue(platform: Persona) -> None:
    body = event(
        "req-1", model="gpt-4o", input_tokens=1000, output_tokens=500, cache_read_tokens=200
    )
    response = platform.client.post("/api/v1/usage", body, format="json")
    assert response.status_code == 201
    assert response.json()["duplicate"] is False
    expected = calc_price(
        Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=200),
        "gpt-4o",
        provider_id="openai",
    ).total_price
    settle()
    row = TokenUsage.objects.get(request_id="req-1")
    assert row.cost == expected
    assert Decimal(response.json()["cost"]) == expected
    assert row.price_source == "catalogue"
    assert row.price_ref.endswith("openai/gpt-4o")
    assert row.total_tokens == 1500


def test_it_answers_duplicate_for_a_repeat_and_counts_it_once(platform: Persona) -> None:
    first = platform.client.post("/api/v1/usage", event("req-dup"), format="json")
    again = platform.client.post(
        "/api/v1/usage", event("req-dup", output_tokens=999), format="json"
    )
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert rows(request_id="req-dup") == 1
    assert TokenUsage.objects.get(request_id="req-dup").output_tokens == 20


@pytest.mark.django_db(transaction=True)
def test_it_counts_concurrent_repeats_once(platform: Persona) -> None:
    def post() -> int:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {platform.raw_key}")
        return client.post("/api/v1/usage", event("req-race"), format="json").status_code

    assert sorted(run_concurrently(post, 8)) == [200] * 7 + [201]
    assert rows(request_id="req-race") == 1


def test_it_maps_an_openai_chat_usage_object(platform: Persona) -> None:
    usage = {
        "prompt_tokens": 900,
        "completion_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 300},
    }
    body = {"request_id": "req-oai", "provider": "openai", "model": "gpt-4o", "usage": usage}
    assert platform.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-oai")
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens, row.cache_write_tokens) == (
        900,
        80,
        300,
        0,
    )


def test_it_maps_an_openai_responses_usage_object(platform: Persona) -> None:
    usage = {
        "input_tokens": 500,
        "output_tokens": 40,
        "input_tokens_details": {"cached_tokens": 100},
    }
    body = {"request_id": "req-resp", "provider": "openai", "model": "gpt-4.1", "usage": usage}
    assert platform.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-resp")
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens) == (500, 40, 100)


def test_it_maps_an_anthropic_usage_object_with_cache_tokens_inside_input(
    platform: Persona,
) -> None:
    usage = {
        "input_tokens": 50,
        "output_tokens": 70,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 4000,
    }
    body = {
        "request_id": "req-ant",
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "usage": usage,
    }
    assert platform.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-ant")
    assert (row.input_tokens, row.cache_write_tokens, row.cache_read_tokens) == (5050, 1000, 4000)
    expected = calc_price(
        Usage(input_tokens=5050, output_tokens=70, cache_write_tokens=1000, cache_read_tokens=4000),
        "claude-sonnet-4-5",
        provider_id="anthropic",
    ).total_price
    assert row.cost == expected


def test_it_accepts_prompt_and_completion_token_aliases(platform: Persona) -> None:
    body = {
        "request_id": "req-alias",
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 3,
    }
    assert platform.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-alias")
    assert (row.input_tokens, row.output_tokens, row.provider) == (10, 3, "openai")


def test_it_stores_an_unknown_model_unpriced_and_counts_it_in_health(platform: Persona) -> None:
    body = event("req-llama", provider="ollama", model="llama3.3:70b")
    response = platform.client.post("/api/v1/usage", body, format="json")
    assert response.status_code == 201
    assert response.json()["unpriced"] is True
    settle()
    row = TokenUsage.objects.get(request_id="req-llama")
    assert (row.cost, row.unpriced, row.price_source) == (0, True, "unpriced")
    assert platform.client.get("/api/v1/health").json()["unpriced_requests"] == 1


def test_it_keeps_attribution_provenance_and_hashes_input_text(platform: Persona) -> None:
    body = event(
        "req-prov",
        team_id="search",
        agent="planner",
        workflow_id="wf-1",
        occurred_at="2026-11-20T10:00:00Z",
        metadata={"run": 3},
        provenance={"parent_request_id": "req-0", "relationship": "retry_of", "input_text": "hi"},
    )
    assert platform.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-prov")
    assert (row.team_id, row.agent, row.workflow_id, row.metadata) == (
        "search",
        "planner",
        "wf-1",
        {"run": 3},
    )
    assert row.occurred_at == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert (row.parent_request_id, row.relationship) == ("req-0", "retry_of")
    assert row.input_hash == "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"


def test_a_project_key_stamps_its_team_and_project(member: Persona) -> None:
    assert member.client.post("/api/v1/usage", event("req-scope"), format="json").status_code == 201
    settle()
    row = TokenUsage.objects.get(request_id="req-scope")
    assert (row.team_id, row.project_id) == ("search", "ranker")
