"""Cancelling a reservation is gated by scope (issue 8 item 10): another scope's reservation
answers 404 exactly like an unknown id, with Redis holding the reservations and without."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from budgets.models import Budget
from tests.conftest import Persona
from tokenmgr_project.core import redis as tm_redis

pytestmark = pytest.mark.django_db

CANCEL = "/api/v1/reservations/cancel"


@pytest.fixture(params=["as configured", "database"])
def mode(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """Each test runs where the pass keeps reservations (Redis when configured) and again in
    the database (no Redis)."""
    if request.param == "database":
        settings.REDIS_URL = ""
        tm_redis.reset()
    yield request.param
    tm_redis.reset()


def _reserve(who: Persona) -> str:
    body = {"model": "gpt-4o", "input_tokens": 1000, "max_output_tokens": 500, "reserve": True}
    response = who.client.post("/api/v1/budgets/check", body, format="json")
    assert response.status_code == 200, response.json()
    return str(response.json()["reservation_id"])


def _cancel(who: Persona, reservation_id: str) -> Any:
    return who.client.post(CANCEL, {"reservation_id": reservation_id}, format="json")


def _reserved(platform: Persona, budget: Budget) -> str:
    return str(platform.client.get(f"/api/v1/budgets/{budget.pk}/status").json()["cost_reserved"])


def test_it_answers_another_scopes_reservation_exactly_like_an_unknown_one(
    mode: str, member: Persona, outsider: Persona, budget: Budget
) -> None:
    held = _reserve(member)

    theirs, unknown = _cancel(outsider, held), _cancel(outsider, "rsv_no-such-reservation")

    assert (theirs.status_code, unknown.status_code) == (404, 404)
    assert theirs.json() == unknown.json()
    assert theirs.json()["error"]["fields"] == {"reservation_id": ["No such reservation."]}


def test_it_keeps_the_hold_when_another_scope_tries_to_cancel_it(
    mode: str, member: Persona, outsider: Persona, platform: Persona, budget: Budget
) -> None:
    held = _reserve(member)
    before = _reserved(platform, budget)

    _cancel(outsider, held)

    assert before != "0"
    assert _reserved(platform, budget) == before
    assert _cancel(member, held).json()["status_before"] == "open"
    assert _reserved(platform, budget) == "0"


def test_it_lets_the_owners_team_and_global_keys_cancel(
    mode: str, member: Persona, team_lead: Persona, platform: Persona, budget: Budget
) -> None:
    by_team, by_platform = _reserve(member), _reserve(member)

    assert _cancel(team_lead, by_team).json()["status_before"] == "open"
    assert _cancel(platform, by_platform).json()["status_before"] == "open"
    assert _cancel(member, by_team).json()["status_before"] == "cancelled"


def test_it_gates_the_cancel_signal_the_same_way(
    mode: str, member: Persona, outsider: Persona, budget: Budget
) -> None:
    held = _reserve(member)
    signal = {"type": "cancel_reservation", "data": {"reservation_id": held}}

    response = outsider.client.post("/api/v1/signals", signal, format="json")

    assert response.status_code == 404
    assert _cancel(member, held).json()["status_before"] == "open"


def _track(who: Persona, request_id: str, reservation_id: str) -> Any:
    body = {
        "request_id": request_id,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 900,
        "output_tokens": 100,
        "reservation_id": reservation_id,
    }
    return who.client.post("/api/v1/usage", body, format="json")


def test_it_refuses_usage_that_would_settle_another_scopes_reservation(
    mode: str, member: Persona, outsider: Persona, platform: Persona, budget: Budget
) -> None:
    held = _reserve(member)
    before = _reserved(platform, budget)

    theirs = _track(outsider, "settle-theirs", held)
    unknown = _track(outsider, "settle-unknown", "rsv_no-such-reservation")

    assert (theirs.status_code, unknown.status_code) == (400, 400)
    assert theirs.json()["error"]["fields"] == unknown.json()["error"]["fields"]
    assert _reserved(platform, budget) == before != "0"
    assert _track(member, "settle-mine", held).status_code == 201
    assert _reserved(platform, budget) == "0"
