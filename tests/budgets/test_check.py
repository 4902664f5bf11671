"""Pre-flight checks, reservations and their settlement, on whichever path the pass configures
(Redis counters with PostgreSQL, or the database alone on SQLite)."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest

from budgets.models import Budget, Reservation
from budgets.services import budget_create, reservations_expire
from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db(transaction=True)

# gpt-4o-mini: 0.15 USD per million input tokens, 0.60 per million output tokens.
MILLION = 1_000_000


def _budget(**fields: Any) -> Budget:
    values: dict[str, Any] = {
        "name": "ranker",
        "scope": "project",
        "scope_id": "ranker",
        "team_id": "search",
        "cost_limit": Decimal("1.00"),
    }
    values.update(fields)
    return budget_create(principal=None, **values)


def _check(persona: Persona, **fields: Any) -> Any:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": MILLION,
        "max_output_tokens": 0,
    }
    body.update(fields)
    return persona.client.post("/api/v1/budgets/check", body, format="json")


def test_it_allows_a_request_that_fits_and_lists_every_applicable_budget(member: Persona) -> None:
    project = _budget()
    team = _budget(name="search", scope="team", scope_id="search", project_id="", token_limit=10**9)
    _budget(name="elsewhere", scope="project", scope_id="bidder", team_id="ads")
    everyone = _budget(name="all", scope="global", scope_id="", team_id="", cost_limit=Decimal(500))

    body = _check(member).json()

    assert body["allowed"] is True
    assert body["estimated_cost"] == "0.15"
    assert [b["budget_id"] for b in body["budgets"]] == [project.pk, team.pk, everyone.pk]
    assert body["budgets"][0]["cost_remaining"] == "1"


def test_a_hard_budget_blocks_and_names_itself(member: Persona) -> None:
    blocking = _budget(cost_limit=Decimal("0.10"))

    body = _check(member).json()

    assert body["allowed"] is False
    assert body["blocking_budget"]["budget_id"] == blocking.pk


def test_a_soft_budget_allows_with_a_warning(member: Persona) -> None:
    _budget(cost_limit=Decimal("0.10"), enforcement="soft")

    body = _check(member).json()

    assert body["allowed"] is True
    assert [w["kind"] for w in body["warnings"]] == ["soft_limit_exceeded"]


def test_crossing_a_threshold_warns(member: Persona) -> None:
    _budget(cost_limit=Decimal("0.18"))  # 0.15 of 0.18 is 83 %: past 50 and 80

    body = _check(member).json()

    assert body["allowed"] is True
    assert body["warnings"][0]["threshold"] == "80.00"


def test_messages_are_counted_with_the_tokenizer(member: Persona) -> None:
    messages = [{"role": "user", "content": "hello " * 1000}]

    body = _check(member, input_tokens=None, messages=messages).json()

    assert 1000 < body["input_tokens"] < 1020
    assert body["input_tokens_estimated"] is False


def test_a_token_limit_counts_input_and_max_output(member: Persona) -> None:
    _budget(cost_limit=None, token_limit=1_000)

    assert _check(member, input_tokens=600, max_output_tokens=400).json()["allowed"] is True
    assert _check(member, input_tokens=600, max_output_tokens=401).json()["allowed"] is False


def test_a_reservation_holds_until_settled_with_the_actual_cost(member: Persona) -> None:
    budget = _budget(cost_limit=Decimal("0.20"))
    first = _check(member, reserve=True).json()

    assert first["allowed"] is True
    assert first["reservation_id"].startswith("rsv_")
    assert _check(member, reserve=True).json()["allowed"] is False  # 0.15 held of 0.20

    tracked = member.client.post(
        "/api/v1/usage",
        event(
            "settles-1",
            input_tokens=200_000,
            output_tokens=0,
            reservation_id=first["reservation_id"],
        ),
        format="json",
    )
    assert tracked.status_code == 201, tracked.json()
    settle()
    status = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert (status["cost_spent"], status["cost_reserved"]) == ("0.03", "0")
    assert _check(member, reserve=True).json()["allowed"] is True


def test_settling_an_unknown_reservation_is_refused_and_stores_nothing(member: Persona) -> None:
    _budget()

    response = member.client.post(
        "/api/v1/usage", event("ghost-1", reservation_id="rsv_made_up"), format="json"
    )

    assert response.status_code == 400
    assert "reservation_id" in response.json()["error"]["fields"]
    settle()
    retry = member.client.post("/api/v1/usage", event("ghost-1"), format="json")
    assert retry.status_code == 201  # the refused event did not claim its request_id


def test_an_expired_reservation_frees_its_hold(member: Persona) -> None:
    _budget(cost_limit=Decimal("0.20"))
    held = _check(member, reserve=True, reservation_ttl_seconds=1).json()
    assert held["allowed"] is True

    time.sleep(1.1)
    reservations_expire()

    assert _check(member, reserve=True).json()["allowed"] is True
    late = member.client.post(
        "/api/v1/usage", event("late-1", reservation_id=held["reservation_id"]), format="json"
    )
    assert late.status_code == 201  # the usage happened: it is recorded all the same


def test_a_cancelled_reservation_frees_its_hold(member: Persona) -> None:
    _budget(cost_limit=Decimal("0.20"))
    held = _check(member, reserve=True).json()

    cancelled = member.client.post(
        "/api/v1/reservations/cancel", {"reservation_id": held["reservation_id"]}, format="json"
    )

    assert cancelled.json()["status_before"] == "open"
    assert _check(member, reserve=True).json()["allowed"] is True


def test_reserving_on_a_named_inactive_budget_is_refused(
    member: Persona, platform: Persona
) -> None:
    budget = _budget()
    platform.client.delete(f"/api/v1/budgets/{budget.pk}")

    response = _check(member, reserve=True, budget_id=budget.pk)

    assert response.status_code == 409
    assert "budget_id" in response.json()["error"]["fields"]
    assert Reservation.objects.count() == 0


def test_naming_a_budget_that_does_not_cover_the_request_is_refused(member: Persona) -> None:
    bobs = _budget(name="bob", scope="user", scope_id="bob", project_id="ranker")

    response = _check(member, reserve=True, budget_id=bobs.pk, user_id="ana")

    assert response.status_code == 400
    assert "budget_id" in response.json()["error"]["fields"]


def test_reserving_on_an_inactive_budget_does_not_hold_against_it(
    member: Persona, platform: Persona
) -> None:
    budget = _budget(cost_limit=Decimal("0.10"))
    platform.client.delete(f"/api/v1/budgets/{budget.pk}")

    body = _check(member, reserve=True).json()

    assert body["allowed"] is True
    assert body["budgets"] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_output_tokens": -1}, "max_output_tokens"),
        ({"input_tokens": None}, "input_tokens"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"reserve": "yes"}, "reserve"),
        ({"reservation_ttl_seconds": 0}, "reservation_ttl_seconds"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_checks_are_refused(member: Persona, fields: dict[str, Any], field: str) -> None:
    _budget()

    response = _check(member, **fields)

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_a_scoped_key_cannot_check_for_another_project(member: Persona) -> None:
    response = _check(member, project_id="bidder")

    assert response.status_code == 403
    assert "project_id" in response.json()["error"]["fields"]


def test_spend_recorded_before_a_budget_existed_counts_against_it(member: Persona) -> None:
    member.client.post(
        "/api/v1/usage", event("before-1", input_tokens=MILLION, output_tokens=0), format="json"
    )  # 0.15 USD, maybe still in the buffer
    _budget(cost_limit=Decimal("0.20"))

    assert _check(member).json()["allowed"] is False
    settle()
    assert _check(member, input_tokens=100_000).json()["allowed"] is True


@pytest.mark.services
def test_counters_lost_with_redis_are_rebuilt_from_the_ledger(member: Persona) -> None:
    budget = _budget(cost_limit=Decimal("0.20"))
    member.client.post(
        "/api/v1/usage", event("kept-1", input_tokens=MILLION, output_tokens=0), format="json"
    )
    settle()
    assert _check(member).json()["allowed"] is False  # 0.15 spent + 0.15 asked > 0.20

    from tokenmgr_project.core import redis as tm_redis

    tm_redis.client().flushdb()  # a Redis restart without persistence

    assert _check(member).json()["allowed"] is False
    assert member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()["cost_spent"] == "0.15"


@pytest.mark.services
def test_reconcile_adds_usage_written_while_redis_was_unreachable(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgets.services import counters_reconcile
    from tokenmgr_project.core import redis as tm_redis

    _budget(cost_limit=Decimal("0.20"))
    assert _check(member).json()["allowed"] is True  # seeds the counter at 0
    with monkeypatch.context() as patched:
        patched.setattr(tm_redis, "available", lambda: False)
        member.client.post(
            "/api/v1/usage", event("direct-1", input_tokens=MILLION, output_tokens=0), format="json"
        )

    assert counters_reconcile() == 1
    assert _check(member).json()["allowed"] is False
    assert counters_reconcile() == 0
