"""GET /api/v1/trends: period-over-period change per dimension equals the ledger's, growers and
decliners in order, new and gone series, scopes, and a named 400 for bad input."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Sum
from django.utils import timezone

from tests.conftest import Persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(minute=0, second=0, microsecond=0)
WEEK = timedelta(days=7)
RANGE = {"since": (NOW - WEEK).isoformat(), "until": NOW.isoformat()}


def _events(prefix: str, n: int, *, days_ago: float, **fields: Any) -> list[dict[str, Any]]:
    return [
        event(
            f"{prefix}{i}",
            occurred_at=(NOW - timedelta(days=days_ago, minutes=i)).isoformat(),
            **fields,
        )
        for i in range(n)
    ]


def _world(persona: Persona) -> None:
    events = (
        # search grows from 2 to 6 requests of gpt-4o, ads shrinks from 5 to 1, bidder is new.
        _events("s-old-", 2, days_ago=10, team_id="search", model="gpt-4o", input_tokens=1000)
        + _events("s-new-", 6, days_ago=2, team_id="search", model="gpt-4o", input_tokens=1000)
        + _events("a-old-", 5, days_ago=9, team_id="ads", model="gpt-4o-mini", input_tokens=500)
        + _events("a-new-", 1, days_ago=3, team_id="ads", model="gpt-4o-mini", input_tokens=500)
        + _events("b-new-", 3, days_ago=1, team_id="bidder", model="gpt-4o-mini", input_tokens=9)
    )
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code in (200, 201, 207), response.content
    settle()


def _cost(since: Any, until: Any, **filters: Any) -> Decimal:
    total = TokenUsage.objects.filter(
        occurred_at__gte=since, occurred_at__lt=until, **filters
    ).aggregate(c=Sum("cost"))["c"]
    return Decimal(str(total or 0))


def test_changes_equal_the_ledger_and_are_ranked(platform: Persona) -> None:
    _world(platform)
    response = platform.client.get("/api/v1/trends", {**RANGE, "dimensions": "team,model"})
    assert response.status_code == 200, response.content
    body = response.json()
    since, until = NOW - WEEK, NOW
    before = NOW - 2 * WEEK
    assert Decimal(body["totals"]["current"]) == _cost(since, until)
    assert Decimal(body["totals"]["previous"]) == _cost(before, since)
    teams = body["dimensions"]["team_id"]
    assert teams["series"] == 3
    assert (teams["new"], teams["gone"]) == (1, 0)
    growers = [r["team_id"] for r in teams["growers"]]
    assert growers[0] == "search"
    search = teams["growers"][0]
    now_cost = _cost(since, until, team_id="search")
    old_cost = _cost(before, since, team_id="search")
    assert Decimal(search["current"]) == now_cost
    assert Decimal(search["change"]) == now_cost - old_cost
    assert search["change_pct"] == f"{(now_cost - old_cost) * 100 / old_cost:.2f}"
    assert [r["team_id"] for r in teams["decliners"]] == ["ads"]
    assert [r["team_id"] for r in teams["fastest_growing_pct"]] == ["search"]  # bidder is new
    bidder = next(r for r in teams["growers"] if r["team_id"] == "bidder")
    assert (bidder["state"], bidder["change_pct"]) == ("new", None)
    assert {r["model"] for r in body["dimensions"]["model"]["growers"]} == {"gpt-4o"}


def test_tokens_and_requests_metrics(platform: Persona) -> None:
    _world(platform)
    body = platform.client.get(
        "/api/v1/trends", {**RANGE, "dimensions": "team_id", "metric": "requests"}
    ).json()
    assert body["totals"] == {"current": 10, "previous": 7, "change": 3, "change_pct": "42.86"}
    rows = {r["team_id"]: r for r in body["dimensions"]["team_id"]["growers"]}
    assert (rows["search"]["previous"], rows["search"]["current"]) == (2, 6)


def test_a_team_key_sees_its_team_only(platform: Persona, team_lead: Persona) -> None:
    _world(platform)
    body = team_lead.client.get("/api/v1/trends", {**RANGE, "dimensions": "team_id"}).json()
    section = body["dimensions"]["team_id"]
    assert section["series"] == 1
    assert [r["team_id"] for r in section["growers"]] == ["search"]
    # Filtering on another team says nothing about it.
    body = team_lead.client.get(
        "/api/v1/trends", {**RANGE, "dimensions": "team_id", "team_id": "ads"}
    ).json()
    assert body["dimensions"]["team_id"]["series"] == 0
    assert body["totals"]["current"] == "0"


def test_through_signals(platform: Persona) -> None:
    _world(platform)
    response = platform.client.post(
        "/api/v1/signals",
        {"type": "get_trends", "data": {**RANGE, "dimensions": ["team_id"]}},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["result"]["dimensions"]["team_id"]["series"] == 3


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dimensions": "colour"}, "dimensions"),
        ({"metric": "vibes"}, "metric"),
        ({"top": "0"}, "top"),
        ({"top": "1000"}, "top"),
        ({"since": "soon"}, "since"),
        ({"since": NOW.isoformat(), "until": (NOW - WEEK).isoformat()}, "until"),
        ({"since": (NOW - timedelta(days=400)).isoformat()}, "since"),
        ({"extra": "1"}, "extra"),
    ],
)
def test_bad_input_is_a_named_400(platform: Persona, params: dict[str, str], field: str) -> None:
    response = platform.client.get("/api/v1/trends", params)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"], response.json()


def test_the_fine_dimensions_read_together_equal_the_ledger(platform: Persona) -> None:
    """Users, features and agents come from one grouped read per period, folded per dimension."""
    events = [
        event(
            f"f{i}",
            occurred_at=(NOW - timedelta(days=1 if i % 3 else 9, minutes=i)).isoformat(),
            team_id="search",
            model="gpt-4o",
            input_tokens=100 * (i + 1),
            user_id=f"u{i % 2}",
            feature=f"feat{i % 3}",
            agent=f"agent{i % 4}",
        )
        for i in range(24)
    ]
    response = platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code in (200, 201, 207), response.content
    settle()
    body = platform.client.get("/api/v1/trends", {**RANGE, "top": "100"}).json()
    since, until, before = NOW - WEEK, NOW, NOW - 2 * WEEK
    for dim in ("user_id", "feature", "agent"):
        section = body["dimensions"][dim]
        rows = {r[dim]: r for r in section["growers"] + section["decliners"]}
        assert rows, dim
        values = set(TokenUsage.objects.values_list(dim, flat=True))
        assert section["series"] == len(values), dim
        for value, row in rows.items():
            assert Decimal(row["current"]) == _cost(since, until, **{dim: value}), (dim, value)
            assert Decimal(row["previous"]) == _cost(before, since, **{dim: value}), (dim, value)
