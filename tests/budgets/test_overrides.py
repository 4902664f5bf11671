from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from budgets import tasks
from budgets.models import Budget, BudgetOverride
from budgets.overrides import override_approve, overrides_expire
from tests.budgets.conftest import StaffPersona, in_days, pending_override
from tests.conftest import Persona, _key_persona, run_concurrently
from tokenmgr_project.core.errors import ApiError

pytestmark = pytest.mark.django_db


def ask(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "extra_cost": "50",
        "reason": "launch week traffic",
        "expires_at": in_days(7).isoformat(),
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def decide(who: Persona, override: BudgetOverride, verdict: str, reason: str = "ok") -> Any:
    return who.client.post(
        f"/api/v1/overrides/{override.pk}/{verdict}", {"reason": reason}, format="json"
    )


def effective_cost_limit(who: Persona, budget: Budget) -> str | None:
    return who.client.get(f"/api/v1/budgets/{budget.pk}/status").json()["effective_cost_limit"]


def test_it_records_a_blocked_keys_request_as_pending(member: Persona, budget: Budget) -> None:
    response = member.client.post(f"/api/v1/budgets/{budget.pk}/overrides", ask(), format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "pending"
    assert body["amount"] == "+50 USD"
    assert body["requested_by"] == {"user": None, "api_key_id": member.key.pk}  # type: ignore[union-attr]
    assert effective_cost_limit(member, budget) == "100"


def test_it_raises_the_limit_once_someone_else_approves(
    requester: StaffPersona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    created = requester.client.post(f"/api/v1/budgets/{budget.pk}/overrides", ask(), format="json")
    override = BudgetOverride.objects.get(pk=created.json()["id"])
    response = decide(approver, override, "approve", "launch approved by finance")
    assert response.status_code == 200
    assert response.json()["decided_by"] == "approver"
    assert response.json()["decision_reason"] == "launch approved by finance"
    assert response.json()["requested_by"]["user"] == "requester"
    assert effective_cost_limit(member, budget) == "150"


def test_a_rejected_override_leaves_the_limit_alone(
    requester: StaffPersona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    response = decide(approver, override, "reject", "use the batch API instead")
    assert response.status_code == 200
    assert response.json()["status"] == "rejected"
    assert effective_cost_limit(member, budget) == "100"


def test_an_unlimited_override_lifts_the_limit_until_it_expires(
    requester: StaffPersona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    until = in_days(2)
    override = pending_override(
        budget, requester, extra_cost=None, unlimited=True, expires_at=until
    )
    decide(approver, override, "approve")
    status = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert status["effective_cost_limit"] is None
    assert status["unlimited_until"] == until.isoformat()


def test_an_api_key_cannot_decide(
    platform: Persona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    for verdict in ("approve", "reject"):
        response = decide(platform, override, verdict)
        assert response.status_code == 403
        assert "API keys cannot decide" in response.json()["error"]["message"]
    override.refresh_from_db()
    assert override.status == "pending"


def test_a_staff_user_without_the_permission_cannot_decide(
    clerk: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    response = decide(clerk, override, "approve")
    assert response.status_code == 403
    assert "budgets.approve_budgetoverride" in response.json()["error"]["message"]
    override.refresh_from_db()
    assert override.status == "pending"


def test_the_requester_cannot_approve_their_own(requester: StaffPersona, budget: Budget) -> None:
    override = pending_override(budget, requester)
    response = decide(requester, override, "approve")
    assert response.status_code == 403
    assert "override_id" in response.json()["error"]["fields"]
    override.refresh_from_db()
    assert (override.status, override.decided_by) == ("pending", None)


def test_the_creator_of_the_requesting_key_cannot_approve_it(
    approver: StaffPersona, budget: Budget
) -> None:
    from usage import services

    key, raw = services.api_key_create(
        name="approver's bot", scope="global", created_by=approver.user
    )
    bot = _key_persona("unused", scope="global")
    bot.client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    created = bot.client.post(f"/api/v1/budgets/{budget.pk}/overrides", ask(), format="json")
    response = decide(approver, BudgetOverride.objects.get(pk=created.json()["id"]), "approve")
    assert response.status_code == 403
    assert BudgetOverride.objects.get(requested_by_key=key).status == "pending"


@pytest.mark.parametrize(("first", "second"), [("approve", "approve"), ("reject", "approve")])
def test_a_decided_override_cannot_be_decided_again(
    requester: StaffPersona, approver: StaffPersona, budget: Budget, first: str, second: str
) -> None:
    override = pending_override(budget, requester)
    decide(approver, override, first, "first decision")
    response = decide(approver, override, second, "second decision")
    assert response.status_code == 409
    override.refresh_from_db()
    assert override.decision_reason == "first decision"


def test_an_expired_request_cannot_be_approved(
    requester: StaffPersona, approver: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    BudgetOverride.objects.filter(pk=override.pk).update(expires_at=timezone.now())
    response = decide(approver, override, "approve")
    assert response.status_code == 409
    assert "expired" in response.json()["error"]["message"]
    override.refresh_from_db()
    assert override.status == "pending"


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"extra_cost": None}, "extra_cost"),
        ({"extra_cost": "-5"}, "extra_cost"),
        ({"extra_cost": "0"}, "extra_cost"),
        ({"extra_cost": None, "extra_tokens": -100}, "extra_tokens"),
        ({"unlimited": True}, "unlimited"),
        ({"expires_at": (timezone.now() - timedelta(minutes=1)).isoformat()}, "expires_at"),
        ({"expires_at": None}, "expires_at"),
        ({"reason": "   "}, "reason"),
        ({"reason": None}, "reason"),
        ({"budget_id": 999_999}, "budget_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_override_request_is_refused_with_a_field_error(
    member: Persona, budget: Budget, fields: dict[str, Any], bad_field: str
) -> None:
    response = member.client.post(
        f"/api/v1/budgets/{budget.pk}/overrides", ask(**fields), format="json"
    )
    assert response.status_code == 400
    assert bad_field in response.json()["error"]["fields"]
    assert not BudgetOverride.objects.exists()


def test_an_unknown_budget_is_not_found(member: Persona) -> None:
    response = member.client.post("/api/v1/budgets/999999/overrides", ask(), format="json")
    assert response.status_code == 404
    assert not BudgetOverride.objects.exists()


def test_a_key_that_cannot_see_the_budget_cannot_ask_or_read(
    outsider: Persona, budget: Budget
) -> None:
    url = f"/api/v1/budgets/{budget.pk}/overrides"
    assert outsider.client.post(url, ask(), format="json").status_code == 404
    assert outsider.client.get(url).status_code == 404
    assert not BudgetOverride.objects.exists()


@pytest.mark.parametrize(
    ("body", "bad_field"),
    [
        ({"reason": "  "}, "reason"),
        ({}, "reason"),
        ({"reason": "ok", "override_id": 999_999}, "override_id"),
    ],
)
def test_a_decision_needs_a_reason_and_takes_its_id_from_the_url(
    approver: StaffPersona, requester: StaffPersona, budget: Budget, body: dict, bad_field: str
) -> None:
    override = pending_override(budget, requester)
    response = approver.client.post(f"/api/v1/overrides/{override.pk}/approve", body, format="json")
    assert response.status_code == 400
    assert bad_field in response.json()["error"]["fields"]
    override.refresh_from_db()
    assert override.status == "pending"


def test_deciding_an_unknown_override_is_not_found(approver: StaffPersona) -> None:
    response = approver.client.post(
        "/api/v1/overrides/424242/approve", {"reason": "x"}, format="json"
    )
    assert response.status_code == 404


def test_the_budgets_history_shows_who_decided_when_and_why(
    requester: StaffPersona, approver: StaffPersona, team_lead: Persona, budget: Budget
) -> None:
    first = pending_override(budget, requester, reason="first ask")
    decide(approver, first, "reject", "too much")
    pending_override(budget, requester, reason="second ask")
    history = team_lead.client.get(f"/api/v1/budgets/{budget.pk}/overrides").json()["results"]
    assert [o["reason"] for o in history] == ["second ask", "first ask"]
    assert history[1]["status"] == "rejected"
    assert (history[1]["decided_by"], history[1]["decision_reason"]) == ("approver", "too much")
    assert history[1]["decided_at"] is not None
    only = team_lead.client.get(f"/api/v1/budgets/{budget.pk}/overrides?status=pending").json()
    assert [o["reason"] for o in only["results"]] == ["second ask"]


def test_overrides_work_through_signals(
    platform: Persona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    asked = platform.client.post(
        "/api/v1/signals",
        {"type": "request_override", "data": {**ask(), "budget_id": budget.pk}},
        format="json",
    )
    assert asked.status_code == 201
    override_id = asked.json()["result"]["id"]
    signal = {"type": "approve_override", "data": {"override_id": override_id, "reason": "fine"}}
    assert platform.client.post("/api/v1/signals", signal, format="json").status_code == 403
    approved = approver.client.post("/api/v1/signals", signal, format="json")
    assert approved.json()["result"]["status"] == "approved"
    assert effective_cost_limit(member, budget) == "150"


def test_the_expiry_job_ends_approved_and_pending_overrides(
    requester: StaffPersona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    approved = pending_override(budget, requester, expires_at=in_days(1))
    decide(approver, approved, "approve")
    pending_override(budget, requester, expires_at=in_days(1), reason="never decided")
    pending_override(budget, requester, expires_at=in_days(30), reason="still running")
    assert overrides_expire(now=in_days(2)) == 2
    assert overrides_expire(now=in_days(2)) == 0
    statuses = dict(BudgetOverride.objects.values_list("reason", "status"))
    assert statuses == {
        "launch week traffic": "expired",
        "never decided": "expired",
        "still running": "pending",
    }


def test_an_expired_approval_no_longer_raises_the_limit(
    requester: StaffPersona, approver: StaffPersona, member: Persona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    decide(approver, override, "approve")
    assert effective_cost_limit(member, budget) == "150"
    BudgetOverride.objects.filter(pk=override.pk).update(expires_at=timezone.now())
    assert tasks.overrides_expire() == 1
    assert effective_cost_limit(member, budget) == "100"
    override.refresh_from_db()
    assert (override.status, override.decision_reason) == ("expired", "ok")


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_two_approvers_at_once_decide_only_once(
    requester: StaffPersona, approver: StaffPersona, clerk: StaffPersona, budget: Budget
) -> None:
    from django.contrib.auth.models import Permission

    clerk.user.user_permissions.add(Permission.objects.get(codename="approve_budgetoverride"))
    override = pending_override(budget, requester)
    # A fresh copy of the clerk: a user object caches its permissions.
    users = [approver.user, type(clerk.user).objects.get(pk=clerk.user.pk)]

    def approve() -> int:
        try:
            override_approve(override_id=override.pk, user=users.pop(), reason="go")
        except ApiError as exc:
            return exc.status_code
        return 200

    assert sorted(run_concurrently(approve, 2)) == [200, 409]
    assert BudgetOverride.objects.get(pk=override.pk).status == "approved"
