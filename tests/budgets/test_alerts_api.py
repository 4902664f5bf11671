"""GET /api/v1/alerts: the budget alerts a caller's scope may see, filtered and paginated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from budgets.alerts import alerts_evaluate
from budgets.models import Budget, BudgetAlert
from tests.conftest import Persona, event, settle
from usage import services

pytestmark = pytest.mark.django_db
ALERTS = "/api/v1/alerts"


@pytest.fixture(autouse=True)
def _dollar_per_token(db: None) -> None:
    """Model "flat-1" costs exactly 1 USD per token, so spend is easy to read."""
    services.model_price_set(
        provider="openai",
        model="flat-1",
        input_per_mtok=Decimal(1_000_000),
        output_per_mtok=Decimal(1_000_000),
        effective_from=datetime(2015, 1, 1, tzinfo=UTC),
    )


def _budget_with_spend(who: Persona, project: str, usd: int) -> Budget:
    """A 100 USD budget on the caller's project, `usd` spent, alerts evaluated."""
    body = {"name": f"{project} monthly", "scope": "project", "scope_id": project}
    created = who.client.post("/api/v1/budgets", {**body, "cost_limit": "100"}, format="json")
    assert created.status_code == 201, created.json()
    usage = event(f"{project}-spend", model="flat-1", input_tokens=usd, output_tokens=0)
    assert who.client.post("/api/v1/usage", usage, format="json").status_code == 201
    settle()
    budget = Budget.objects.get(pk=created.json()["id"])
    # In the period's last minute: the spend rate projects no overrun (no burn-rate alert).
    alerts_evaluate(budget_id=budget.pk, now=budget.window_at(timezone.now()).end - timedelta(1))
    return budget


def _alerts(who: Persona, query: str = "") -> dict[str, Any]:
    response = who.client.get(ALERTS + query)
    assert response.status_code == 200, response.json()
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def ranker(member: Persona) -> Budget:
    return _budget_with_spend(member, "ranker", 95)  # 50, 80 and 90 % crossed


@pytest.fixture
def bidder(outsider: Persona) -> Budget:
    return _budget_with_spend(outsider, "bidder", 60)  # 50 % crossed


def test_it_lists_a_budgets_alerts_newest_first(member: Persona, ranker: Budget) -> None:
    body = _alerts(member)
    assert [(a["kind"], a["metric"], a["threshold"]) for a in body["results"]] == [
        ("threshold", "cost", "90.00"),
        ("threshold", "cost", "80.00"),
        ("threshold", "cost", "50.00"),
    ]
    first = body["results"][0]
    assert (first["budget_id"], first["budget_name"]) == (ranker.pk, "ranker monthly")
    assert (first["team_id"], first["project_id"]) == ("search", "ranker")
    assert (first["spent"], first["limit"], first["percent"]) == ("95", "100", "95.00")
    assert body["next_cursor"] is None


def test_a_scoped_key_sees_only_the_alerts_of_its_budgets(
    member: Persona, outsider: Persona, platform: Persona, ranker: Budget, bidder: Budget
) -> None:
    assert {a["budget_id"] for a in _alerts(member)["results"]} == {ranker.pk}
    assert {a["budget_id"] for a in _alerts(outsider)["results"]} == {bidder.pk}
    assert {a["budget_id"] for a in _alerts(platform)["results"]} == {ranker.pk, bidder.pk}


def test_another_scopes_budget_answers_404_like_an_unknown_one(
    outsider: Persona, ranker: Budget
) -> None:
    foreign = outsider.client.get(f"{ALERTS}?budget_id={ranker.pk}")
    unknown = outsider.client.get(f"{ALERTS}?budget_id=999999")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json()


def test_it_filters_by_budget_kind_and_since(
    platform: Persona, ranker: Budget, bidder: Budget
) -> None:
    assert {a["budget_id"] for a in _alerts(platform, f"?budget_id={bidder.pk}")["results"]} == {
        bidder.pk
    }
    assert _alerts(platform, "?kind=exhausted")["results"] == []
    assert len(_alerts(platform, "?kind=threshold")["results"]) == 4
    BudgetAlert.objects.filter(budget=bidder).update(created_at=timezone.now() - timedelta(days=3))
    since = (timezone.now() - timedelta(days=1)).isoformat()
    recent = _alerts(platform, "?" + f"since={since}".replace("+", "%2B"))["results"]
    assert {a["budget_id"] for a in recent} == {ranker.pk}


def test_it_pages_with_a_cursor(member: Persona, ranker: Budget) -> None:
    seen, query = [], "?limit=2"
    while True:
        page = _alerts(member, query)
        seen += [a["threshold"] for a in page["results"]]
        if page["next_cursor"] is None:
            break
        query = f"?limit=2&cursor={page['next_cursor']}"
    assert seen == ["90.00", "80.00", "50.00"]


def test_the_alerts_are_reachable_as_a_signal(member: Persona, ranker: Budget) -> None:
    signal = {"type": "list_alerts", "data": {"budget_id": ranker.pk, "limit": 1}}
    response = member.client.post("/api/v1/signals", signal, format="json")
    assert response.status_code == 200
    assert [a["threshold"] for a in response.json()["result"]["results"]] == ["90.00"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("kind=nope", "kind"),
        ("since=yesterday", "since"),
        ("since=0.5", "since"),  # not read as a Unix time
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=abc", "cursor"),
        ("budget_id=x", "budget_id"),
        ("colour=red", "colour"),
    ],
)
def test_bad_filters_are_refused_with_field_errors(
    platform: Persona, query: str, field: str
) -> None:
    response = platform.client.get(f"{ALERTS}?{query}")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
