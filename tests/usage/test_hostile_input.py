"""Hostile reads and bodies get a 4xx with the JSON error shape, never a 500: query values the
database cannot compare, time offsets PostgreSQL refuses, crafted cursors, deeply nested JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.conftest import Persona, event, settle
from tokenmgr_project.core.parsers import MAX_JSON_DEPTH

pytestmark = pytest.mark.django_db


def _assert_error(response: Any, status: int, field: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"}
    assert field in error["fields"], error


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/usage?team_id=%00", "team_id"),
        ("/api/v1/usage/summary?team_id=%00", "team_id"),
        ("/api/v1/usage?feature=a%1Fb", "feature"),
        ("/api/v1/usage?model=" + "m" * 129, "model"),
        ("/api/v1/usage?since=2026-01-01T00:00:00%2B20:00", "since"),
        ("/api/v1/usage/summary?until=2026-01-01T00:00:00-16:00", "until"),
        ("/api/v1/usage?until=9999-12-31T23:59:59-15:00", "until"),
        ("/api/v1/usage?since=0001-01-01T00:00:00%2B15:00", "since"),
        ("/api/v1/usage?since=", "since"),
        ("/api/v1/usage?since=%00", "since"),
        ("/api/v1/usage?limit=0", "limit"),
        ("/api/v1/usage/summary?interval=", "interval"),
        ("/api/v1/usage/summary?tz=%00", "tz"),
        ("/api/v1/usage/summary?group_by=model%00", "group_by"),
        ("/api/v1/budgets?active=%00", "active"),
        ("/api/v1/pricing?model=%00", "model"),
        ("/api/v1/pricing?provider=" + "p" * 1025, "provider"),
        ("/api/v1/budgets/1/overrides?status=%00", "status"),
    ],
)
def test_it_refuses_a_query_value_the_database_cannot_compare(
    platform: Persona, url: str, field: str
) -> None:
    _assert_error(platform.client.get(url), 400, field)


@pytest.mark.parametrize(
    "decoded",
    [
        "9999-12-31T23:59:59-23:59|1",
        "2026-01-01T00:00:00+00:00|99999999999999999999999",
        "2026-01-01T00:00:00+00:00|9223372036854775808",
        "2026-01-01T00:00:00+00:00|-1",
        "2026-01-01T00:00:00+05:00|1",
        "2026-01-01T00:00:00|1",
        "10000-01-01T00:00:00+00:00|1",
        "2026-01-01T00:00:00+00:00|1|2",
        "2026-01-01T00:00:00+00:00|\u0661",
    ],
)
def test_it_refuses_a_crafted_cursor(platform: Persona, decoded: str) -> None:
    response = platform.client.get("/api/v1/usage", {"cursor": _cursor(decoded)})
    _assert_error(response, 400, "cursor")


@pytest.mark.parametrize(
    "cursor", ["!!!", "a" * 129, base64.urlsafe_b64encode(b"\xff\xfe").decode()]
)
def test_it_refuses_a_cursor_that_is_not_base64_of_text(platform: Persona, cursor: str) -> None:
    _assert_error(platform.client.get("/api/v1/usage", {"cursor": cursor}), 400, "cursor")


def test_it_still_follows_the_cursors_it_returns(platform: Persona) -> None:
    for i in range(3):
        platform.client.post("/api/v1/usage", event(f"page-{i}"), format="json")
    settle()
    first = platform.client.get("/api/v1/usage", {"limit": 2}).json()
    second = platform.client.get("/api/v1/usage", {"limit": 2, "cursor": first["next_cursor"]})
    assert second.status_code == 200
    assert len(first["results"]) + len(second.json()["results"]) == 3


def test_it_refuses_an_unpaired_surrogate_in_a_signal_query(platform: Persona) -> None:
    body = json.dumps({"type": "get_usage", "data": {"team_id": "\ud800"}})
    response = platform.client.post("/api/v1/signals", body, content_type="application/json")
    _assert_error(response, 400, "team_id")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", ["/api/v1/usage", "/api/v1/usage/batch", "/api/v1/signals"])
@pytest.mark.parametrize("who", ["platform", "admin"])  # the fast path and DRF's parser
def test_it_refuses_json_nested_ten_thousand_deep(
    request: pytest.FixtureRequest, who: str, path: str
) -> None:
    client = request.getfixturevalue(who).client
    response = client.post(path, _nested(10_000), content_type="application/json")
    _assert_error(response, 400, "body")
    assert response.json()["error"]["code"] == "parse_error"


@pytest.mark.parametrize("who", ["platform", "admin"])
def test_it_refuses_metadata_nested_past_the_limit(
    request: pytest.FixtureRequest, who: str
) -> None:
    client = request.getfixturevalue(who).client
    metadata = json.loads('{"a":' * MAX_JSON_DEPTH + "1" + "}" * MAX_JSON_DEPTH)
    body = json.dumps({"events": [event("deep-1", metadata=metadata)]})
    response = client.post("/api/v1/usage/batch", body, content_type="application/json")
    _assert_error(response, 400, "body")


def test_it_accepts_metadata_nested_a_few_levels(platform: Persona) -> None:
    metadata = json.loads('{"a":' * 10 + "1" + "}" * 10)
    response = platform.client.post(
        "/api/v1/usage", event("nested-ok", metadata=metadata), format="json"
    )
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/budgets", {"name": "a\x00b", "scope": "global", "cost_limit": "1"}, "name"),
        (
            "/api/v1/budgets",
            {"name": "b", "scope": "team", "scope_id": "t\x00", "cost_limit": "1"},
            "scope_id",
        ),
        (
            "/api/v1/pricing",
            {"model": "m", "input_per_mtok": "1", "output_per_mtok": "1", "note": "\x00"},
            "note",
        ),
        (
            "/api/v1/pricing",
            {
                "model": "m",
                "input_per_mtok": "1",
                "output_per_mtok": "1",
                "effective_from": "2026-01-01T00:00:00+20:00",
            },
            "effective_from",
        ),
        ("/api/v1/reservations/cancel", {"reservation_id": "r\x00"}, "reservation_id"),
        ("/api/v1/guard", {"agent": "a\x00", "prompt": "hi", "model": "gpt-4o"}, "agent"),
        (
            "/api/v1/budgets/check",
            {"model": "gpt-4o", "input_tokens": 1, "max_output_tokens": 1, "team_id": "t\x00"},
            "team_id",
        ),
        (
            "/api/v1/status",
            {"conversation_id": "c\x00", "category": "info", "message": "m"},
            "conversation_id",
        ),
        ("/api/v1/pricing/quote", {"model": "gpt-4o", "at": 1767225600}, "at"),
        (
            "/api/v1/pricing/quote",
            {"model": "gpt-4o", "at": "9999-12-31T23:59:59-15:00"},
            "at",
        ),
    ],
)
def test_it_refuses_a_body_string_or_time_the_database_cannot_store(
    platform: Persona, path: str, body: dict[str, Any], field: str
) -> None:
    response = platform.client.post(path, json.dumps(body), content_type="application/json")
    _assert_error(response, 400, field)
