from __future__ import annotations

from decimal import Decimal

import pytest

from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db

DIMENSIONS = [
    "team_id",
    "project_id",
    "user_id",
    "feature",
    "agent",
    "workflow_id",
    "conversation_id",
    "task_type",
]


@pytest.fixture
def ledger(platform: Persona) -> None:
    events = []
    for i in range(12):
        dims = {d: f"{d}-{i % 2}" for d in DIMENSIONS}
        events.append(
            event(
                f"e-{i:02d}",
                model="gpt-4o" if i % 3 == 0 else "gpt-4o-mini",
                occurred_at=f"2026-11-{10 + i // 4:02d}T23:30:00Z",
                **dims,
            )
        )
    platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    settle()


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_it_filters_by_each_attribution_dimension(
    ledger: None, platform: Persona, dim: str
) -> None:
    body = platform.client.get(f"/api/v1/usage?{dim}={dim}-1").json()
    assert {r["request_id"] for r in body["results"]} == {f"e-{i:02d}" for i in range(1, 12, 2)}


def test_it_filters_by_model_and_time_range(ledger: None, platform: Persona) -> None:
    url = "/api/v1/usage?model=gpt-4o&since=2026-11-11T00:00:00Z&until=2026-11-12T00:00:00Z"
    assert [r["request_id"] for r in platform.client.get(url).json()["results"]] == ["e-06"]


def test_cursor_pagination_returns_every_row_once_newest_first(
    ledger: None, platform: Persona
) -> None:
    seen: list[str] = []
    url: str | None = "/api/v1/usage?limit=5"
    while url:
        body = platform.client.get(url).json()
        seen += [r["request_id"] for r in body["results"]]
        url = body["next"]
    assert len(seen) == 12
    assert len(set(seen)) == 12
    assert seen[0] in {"e-08", "e-09", "e-10", "e-11"}


def test_summary_groups_by_dimension_and_day_in_a_time_zone(
    ledger: None, platform: Persona
) -> None:
    url = "/api/v1/usage/summary?group_by=model&interval=day&tz=Europe/Paris"
    body = platform.client.get(url).json()
    # 23:30 UTC is 00:30 the next day in Paris.
    periods = {r["period"][:10] for r in body["rows"]}
    assert periods == {"2026-11-11", "2026-11-12", "2026-11-13"}
    assert sum(r["requests"] for r in body["rows"]) == 12
    assert sum(r["total_tokens"] for r in body["rows"]) == 12 * 120


def test_summary_totals_match_the_rows(ledger: None, platform: Persona) -> None:
    rows = platform.client.get("/api/v1/usage?limit=100").json()["results"]
    body = platform.client.get("/api/v1/usage/summary?group_by=team_id,model").json()
    assert sum(Decimal(r["cost"]) for r in body["rows"]) == sum(Decimal(r["cost"]) for r in rows)
    assert {(r["team_id"], r["model"]) for r in body["rows"]} == {
        (t, m) for t in ("team_id-0", "team_id-1") for m in ("gpt-4o", "gpt-4o-mini")
    }


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("group_by=colour", "group_by"),
        ("interval=fortnight", "interval"),
        ("tz=Mars/Olympus", "tz"),
        ("since=yesterday", "since"),
        ("since=2026-11-12T00:00:00Z&until=2026-11-11T00:00:00Z", "until"),
        ("colour=red", "colour"),
    ],
)
def test_summary_rejects_bad_parameters(platform: Persona, query: str, field: str) -> None:
    response = platform.client.get(f"/api/v1/usage/summary?{query}")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


@pytest.mark.parametrize(
    ("query", "field"), [("cursor=%%%", "cursor"), ("limit=0", "limit"), ("limit=x", "limit")]
)
def test_list_rejects_bad_paging(platform: Persona, query: str, field: str) -> None:
    response = platform.client.get(f"/api/v1/usage?{query}")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
