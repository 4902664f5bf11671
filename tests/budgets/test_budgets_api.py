"""Budget CRUD and status through the REST API: scopes, validation, the orphaned-spend rule."""

from __future__ import annotations

from typing import Any

import pytest

from budgets.models import Budget
from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db


def _create(persona: Persona, **fields: Any) -> Any:
    body = {"name": "b", "scope": "team", "scope_id": "search", "cost_limit": "10"}
    body.update(fields)
    return persona.client.post("/api/v1/budgets", body, format="json")


def test_it_creates_a_budget_with_default_thresholds(platform: Persona) -> None:
    response = _create(platform, name="search monthly", token_limit=1_000_000)

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["thresholds"] == ["50.00", "80.00", "90.00"]
    assert (body["scope"], body["team_id"], body["period"]) == ("team", "search", "monthly")
    assert (body["cost_limit"], body["token_limit"]) == ("10", 1_000_000)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"scope": "galaxy"}, "scope"),
        ({"cost_limit": "-5"}, "cost_limit"),
        ({"cost_limit": None}, "cost_limit"),
        ({"token_limit": 0, "cost_limit": None}, "token_limit"),
        ({"thresholds": [0, 50]}, "thresholds.0"),
        ({"thresholds": [50, 100.5]}, "thresholds.1"),
        ({"thresholds": [50, 50]}, "thresholds"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"period": "hourly"}, "period"),
        ({"scope": "global", "scope_id": "x"}, "scope_id"),
        ({"scope": "user", "scope_id": ""}, "scope_id"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_it_rejects_bad_budgets_and_stores_nothing(
    platform: Persona, fields: dict[str, Any], field: str
) -> None:
    response = _create(platform, **fields)

    assert response.status_code == 400, response.json()
    assert field in response.json()["error"]["fields"]
    assert Budget.objects.count() == 0


def test_it_allows_one_active_budget_per_scope_and_period(platform: Persona) -> None:
    assert _create(platform).status_code == 201
    again = _create(platform)

    assert again.status_code == 409
    assert "scope_id" in again.json()["error"]["fields"]
    assert _create(platform, period="daily").status_code == 201


def test_a_scoped_key_only_sees_and_manages_budgets_in_its_scope(
    platform: Persona, team_lead: Persona, outsider: Persona
) -> None:
    mine = _create(team_lead, scope="user", scope_id="ana").json()
    _create(platform, scope="team", scope_id="ads")

    assert mine["team_id"] == "search"
    listed = team_lead.client.get("/api/v1/budgets").json()["results"]
    assert [b["id"] for b in listed] == [mine["id"]]
    assert outsider.client.get(f"/api/v1/budgets/{mine['id']}").status_code == 404
    assert outsider.client.delete(f"/api/v1/budgets/{mine['id']}").status_code == 404
    assert _create(team_lead, scope="team", scope_id="ads").status_code == 400
    assert _create(team_lead, scope="global", scope_id="").status_code == 400


def test_status_shows_spend_remaining_and_the_period(platform: Persona, member: Persona) -> None:
    budget = _create(platform, scope="project", scope_id="ranker", cost_limit="1").json()
    member.client.post(
        "/api/v1/usage", event("s-1", input_tokens=1_000_000, output_tokens=0), format="json"
    )
    settle()

    status = platform.client.get(f"/api/v1/budgets/{budget['id']}/status").json()

    assert status["cost_spent"] == "0.15"  # gpt-4o-mini: 0.15 USD per million input tokens
    assert status["cost_remaining"] == "0.85"
    assert status["cost_percent"] == "15.00"
    assert status["period_start"] < status["period_end"]
    assert status["projected_cost"] is not None


def test_a_period_change_that_would_orphan_spend_is_refused(
    platform: Persona, member: Persona
) -> None:
    budget = _create(platform, scope="project", scope_id="ranker").json()
    member.client.post("/api/v1/usage", event("o-1"), format="json")

    response = platform.client.patch(
        f"/api/v1/budgets/{budget['id']}", {"period": "daily"}, format="json"
    )

    assert response.status_code == 409
    assert "period" in response.json()["error"]["fields"]
    assert Budget.objects.get(pk=budget["id"]).period == "monthly"


def test_limits_and_thresholds_can_change_while_spend_exists(
    platform: Persona, member: Persona
) -> None:
    budget = _create(platform, scope="project", scope_id="ranker").json()
    member.client.post("/api/v1/usage", event("p-1"), format="json")

    response = platform.client.patch(
        f"/api/v1/budgets/{budget['id']}",
        {"cost_limit": "20", "thresholds": [75]},
        format="json",
    )

    assert response.status_code == 200, response.json()
    assert (response.json()["cost_limit"], response.json()["thresholds"]) == ("20", ["75.00"])


def test_delete_deactivates_and_keeps_the_budget(platform: Persona) -> None:
    budget = _create(platform).json()

    assert platform.client.delete(f"/api/v1/budgets/{budget['id']}").status_code == 200

    assert Budget.objects.get(pk=budget["id"]).is_active is False
    assert _create(platform).status_code == 201  # the scope is free again
