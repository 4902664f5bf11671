"""Every kind of bad input gets a 4xx with a field-level message, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.conftest import Persona, event, rows
from usage import services

pytestmark = pytest.mark.django_db

BAD_EVENTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "missing request_id",
        {k: v for k, v in event("x").items() if k != "request_id"},
        "request_id",
    ),
    ("empty request_id", event(""), "request_id"),
    ("blank request_id", event("   "), "request_id"),
    ("oversized request_id", event("r" * 129), "request_id"),
    ("request_id with control chars", event("a\nb"), "request_id"),
    ("negative tokens", event("bad-1", input_tokens=-1), "input_tokens"),
    ("string tokens", event("bad-2", output_tokens="20"), "output_tokens"),
    ("float tokens", event("bad-3", input_tokens=1.5), "input_tokens"),
    ("boolean tokens", event("bad-4", input_tokens=True), "input_tokens"),
    ("absurd tokens", event("bad-5", input_tokens=10**9 + 1), "input_tokens"),
    ("unknown field", event("bad-6", colour="red"), "colour"),
    ("wrong type attribution", event("bad-7", team_id=5), "team_id"),
    ("wrong type metadata", event("bad-8", metadata=[1, 2]), "metadata"),
    ("far future timestamp", event("bad-9", occurred_at="2099-01-01T00:00:00Z"), "occurred_at"),
    ("garbage timestamp", event("bad-10", occurred_at="yesterday"), "occurred_at"),
    (
        "cache beyond input",
        event("bad-11", input_tokens=10, cache_read_tokens=11),
        "cache_read_tokens",
    ),
    ("both alias spellings", event("bad-12", prompt_tokens=100), "prompt_tokens"),
    ("usage and token fields", event("bad-13", usage={"prompt_tokens": 1}), "usage"),
    (
        "unrecognised usage object",
        {"request_id": "bad-14", "model": "m", "usage": {"foo": 1}},
        "usage",
    ),
    (
        "bad raw usage count",
        {"request_id": "bad-15", "model": "m", "usage": {"prompt_tokens": -3}},
        "usage.prompt_tokens",
    ),
    ("no token counts", {"request_id": "bad-16", "model": "gpt-4o"}, "input_tokens"),
    ("missing model", {"request_id": "bad-17", "input_tokens": 1}, "model"),
    ("bad status", event("bad-18", status="maybe"), "status"),
    (
        "bad relationship",
        event("bad-19", provenance={"relationship": "cousin_of"}),
        "provenance.relationship",
    ),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_it_rejects_a_bad_event_with_a_field_error_and_stores_nothing(
    platform: Persona, case: str, body: dict[str, Any], field: str
) -> None:
    response = platform.client.post("/api/v1/usage", body, format="json")
    assert response.status_code == 400, case
    assert field in response.json()["error"]["fields"], response.json()
    assert rows() == 0


def test_it_rejects_invalid_json(platform: Persona) -> None:
    response = platform.client.post("/api/v1/usage", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert "body" in response.json()["error"]["fields"]
    assert rows() == 0


def test_it_rejects_a_non_json_content_type(platform: Persona) -> None:
    response = platform.client.post("/api/v1/usage", "request_id=a", content_type="text/plain")
    assert response.status_code == 415
    assert "content_type" in response.json()["error"]["fields"]


def test_it_rejects_a_json_array_body_for_one_event(platform: Persona) -> None:
    response = platform.client.post("/api/v1/usage", [event("arr")], format="json")
    assert response.status_code == 400
    assert rows() == 0


def test_it_refuses_a_missing_key(db: None) -> None:
    response = APIClient().post("/api/v1/usage", event("nokey"), format="json")
    assert response.status_code == 401
    assert "authorization" in response.json()["error"]["fields"]
    assert rows() == 0


def test_it_refuses_an_unknown_key(db: None) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer tm_not-a-real-key")
    assert client.post("/api/v1/usage", event("badkey"), format="json").status_code == 401
    assert rows() == 0


def test_it_refuses_a_revoked_key(member: Persona) -> None:
    assert member.key is not None
    services.api_key_revoke(key=member.key)
    response = member.client.post("/api/v1/usage", event("revoked"), format="json")
    assert response.status_code == 401
    assert rows() == 0


def test_it_refuses_a_batch_over_1000_events_and_stores_nothing(platform: Persona) -> None:
    batch = {"events": [event(f"big-{i}") for i in range(1001)]}
    response = platform.client.post("/api/v1/usage/batch", batch, format="json")
    assert response.status_code == 413
    assert "events" in response.json()["error"]["fields"]
    assert rows() == 0


@pytest.mark.parametrize("body", [{"events": "nope"}, {"events": []}, {"evnts": []}, "[]"])
def test_it_rejects_a_malformed_batch_envelope(platform: Persona, body: Any) -> None:
    response = platform.client.post("/api/v1/usage/batch", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]


@pytest.mark.parametrize("url", ["/api/v1/usage", "/api/v1/usage/batch"])
def test_it_refuses_a_body_over_the_size_limit(platform: Persona, url: str, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"events": [event(f"huge-{i}", metadata={"pad": "x" * 500}) for i in range(3)]}
    response = platform.client.post(url, body, format="json")
    assert response.status_code == 413
    assert "body" in response.json()["error"]["fields"]
    assert rows() == 0


def test_a_large_legitimate_batch_is_accepted(platform: Persona) -> None:
    batch = {"events": [event(f"meta-{i}", metadata={"pad": "x" * 15_000}) for i in range(200)]}
    response = platform.client.post("/api/v1/usage/batch", batch, format="json")
    assert response.json()["created"] == 200
    assert rows() == 200


def test_it_words_a_validator_refusal_without_pydantics_prefix(platform: Persona) -> None:
    response = platform.client.post("/api/v1/usage", event("a\x01b"), format="json")

    assert response.status_code == 400
    assert response.json()["error"]["fields"]["request_id"] == [
        "must not contain control characters"
    ]
