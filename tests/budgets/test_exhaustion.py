"""The budget status's burn rate and exhaustion date (issue 13): exact for a steady burn, none
when the limit is not reached in the period, the earlier of the cost and token limits, an
approved override moving the date, and GET /budgets/{id}/status showing it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from budgets.apis import BudgetStatusOut
from budgets.models import Budget
from budgets.overrides import override_approve
from budgets.selectors import budget_status
from budgets.services import budget_create
from tests.budgets.conftest import StaffPersona, pending_override
from tests.conftest import Persona, event, settle
from usage.pricing import money

pytestmark = pytest.mark.django_db

# "Now" for the status: the 15th of a past month, midnight UTC; usage on the days before.
NOW = datetime(2025, 3, 15, tzinfo=UTC)
# One request a day of 40,000 input and 10,000 output tokens on gpt-4o (0.1 + 0.1 USD).
TOKENS_A_DAY = 50_000


def _daily_usage(persona: Persona, days: list[datetime], **fields: Any) -> Decimal:
    """One gpt-4o request at noon of each day; returns one request's cost."""
    events = [
        event(
            f"d{day:%Y%m%d}",
            model="gpt-4o",
            input_tokens=40_000,
            output_tokens=10_000,
            occurred_at=day.replace(hour=12).isoformat(),
            team_id="search",
            **fields,
        )
        for day in days
    ]
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert [r["status"] for r in response.json()["results"]] == ["created"] * len(events)
    settle()
    costs = {Decimal(r["cost"]) for r in response.json()["results"]}
    assert len(costs) == 1
    return costs.pop()


def _march(first: int, last: int) -> list[datetime]:
    return [datetime(2025, 3, d, tzinfo=UTC) for d in range(first, last + 1)]


def _budget(**fields: Any) -> Budget:
    values: dict[str, Any] = {
        "name": "search monthly",
        "scope": "team",
        "scope_id": "search",
        "team_id": "search",
    }
    values.update(fields)
    return budget_create(principal=None, **values)


def test_a_steady_burn_runs_out_exactly_when_the_remainder_is_spent(platform: Persona) -> None:
    cost = _daily_usage(platform, _march(1, 14))
    # 14 days spent; 6 more days' worth remain at the last 7 days' rate: the 21st, midnight.
    budget = _budget(cost_limit=cost * 20)
    burn = budget_status(budget, now=NOW, burn=True).burn
    assert burn is not None
    assert (burn.start, burn.end, burn.whole_period) == (NOW - timedelta(days=7), NOW, False)
    assert burn.cost_per_day == cost
    assert burn.tokens_per_day == TOKENS_A_DAY
    assert burn.exhausts_at == datetime(2025, 3, 21, tzinfo=UTC)
    assert (burn.exhausts_by, burn.exhausts_in_period) == ("cost", True)
    assert burn.rate_label == "the last 7 days' rate"
    assert "the cost limit is reached at 2025-03-21T00:00:00+00:00" in burn.basis


def test_early_in_a_period_the_rate_is_the_period_so_far(platform: Persona) -> None:
    cost = _daily_usage(platform, _march(1, 3))
    budget = _budget(cost_limit=cost * 5)
    burn = budget_status(budget, now=datetime(2025, 3, 4, tzinfo=UTC), burn=True).burn
    assert burn is not None
    assert (burn.start, burn.whole_period) == (datetime(2025, 3, 1, tzinfo=UTC), True)
    assert burn.rate_label == "the rate of the period so far (3 days)"
    assert burn.exhausts_at == datetime(2025, 3, 6, tzinfo=UTC)  # 2 days' worth left


def test_a_limit_the_rate_does_not_reach_this_period_has_no_date(platform: Persona) -> None:
    cost = _daily_usage(platform, _march(1, 14))
    budget = _budget(cost_limit=cost * 100)
    status = budget_status(budget, now=NOW, burn=True)
    assert status.burn is not None
    assert status.burn.exhausts_at is None
    assert status.burn.exhausts_in_period is False
    assert "not reached before the period ends (2025-04-01T00:00:00+00:00)" in status.burn.basis
    body = status.as_dict()
    assert (body["exhausts_at"], body["exhausts_in_period"]) == (None, False)


def test_the_earlier_of_the_cost_and_token_limits_decides(platform: Persona) -> None:
    cost = _daily_usage(platform, _march(1, 14))
    # Tokens: 14 days used, 2 days' worth left (the 17th); cost: 6 days' worth (the 21st).
    budget = _budget(cost_limit=cost * 20, token_limit=TOKENS_A_DAY * 16)
    burn = budget_status(budget, now=NOW, burn=True).burn
    assert burn is not None
    assert (burn.exhausts_at, burn.exhausts_by) == (datetime(2025, 3, 17, tzinfo=UTC), "tokens")


def test_an_approved_override_moves_the_date_by_what_it_adds(
    platform: Persona, approver: StaffPersona, requester: StaffPersona
) -> None:
    cost = _daily_usage(platform, _march(1, 14))
    budget = _budget(cost_limit=cost * 20)
    override = pending_override(
        budget, requester, extra_cost=cost * 3, expires_at=timezone.now() + timedelta(days=7)
    )
    override_approve(override_id=override.pk, user=approver.user, reason="launch")
    burn = budget_status(budget, now=NOW, burn=True).burn
    assert burn is not None
    assert burn.exhausts_at == datetime(2025, 3, 24, tzinfo=UTC)  # 3 more days' worth


def test_no_spend_in_the_window_means_no_date(platform: Persona) -> None:
    _daily_usage(platform, _march(1, 3))
    budget = _budget(cost_limit=Decimal(1))
    burn = budget_status(budget, now=NOW, burn=True).burn  # nothing since the 8th
    assert burn is not None
    assert (burn.cost_units, burn.exhausts_at, burn.exhausts_in_period) == (0, None, False)
    assert "nothing is spent" in burn.basis


def test_a_spent_limit_is_reached_now(platform: Persona) -> None:
    cost = _daily_usage(platform, _march(1, 14))
    budget = _budget(cost_limit=cost * 10)
    burn = budget_status(budget, now=NOW, burn=True).burn
    assert burn is not None
    assert burn.exhausts_at == NOW
    assert "was already reached" in burn.basis


def test_the_status_endpoint_shows_the_date_and_its_window(platform: Persona) -> None:
    # A lifetime budget: its window is always the last 7 days, whatever today's date.
    start = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    days = [start - timedelta(days=i) for i in range(1, 7)]
    cost = _daily_usage(platform, days)
    budget = _budget(period="lifetime", cost_limit=cost * 9)
    before = timezone.now()
    body = platform.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    after = timezone.now()
    BudgetStatusOut.model_validate(body)  # the body the OpenAPI document declares
    # 6 requests in the last 7 days; 3 requests' worth left: 3.5 days at that rate.
    assert body["burn_window"]["days"] == "7"
    assert body["burn_window"]["label"] == "the last 7 days' rate"
    assert Decimal(body["burn_rate"]["cost_per_day"]) == (cost * 6 / 7).quantize(Decimal("1e-6"))
    assert body["burn_rate"]["tokens_per_day"] == round(TOKENS_A_DAY * 6 / 7)
    exhausts_at = datetime.fromisoformat(body["exhausts_at"])
    lasts = timedelta(days=3.5)
    slack = timedelta(seconds=1)  # the division's float seconds
    assert before + lasts - slack <= exhausts_at <= after + lasts + slack
    assert (body["exhausts_by"], body["exhausts_in_period"]) == ("cost", True)
    assert body["cost_spent"] == money(cost * 6)  # the fields before it are unchanged
    assert "the last 7 days' rate" in body["exhaustion_basis"]


def test_the_admin_page_says_when_the_budget_runs_out(platform: Persona, admin: Persona) -> None:
    start = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    cost = _daily_usage(platform, [start - timedelta(days=i) for i in range(1, 7)])
    budget = _budget(period="lifetime", cost_limit=cost * 9)
    page = admin.client.get(f"/admin/budgets/budget/{budget.pk}/change/").content.decode()
    assert "<th>runs out</th><td>~" in page
    assert "(cost limit), at the last 7 days&#x27; rate</td>" in page
    per_day = money((cost * 6 / 7).quantize(Decimal("1e-6")))
    assert f"{per_day} USD and {round(TOKENS_A_DAY * 6 / 7):,} tokens a day" in page
