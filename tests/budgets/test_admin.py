"""The budgets admin through the real admin site: the list, the budget page and the approval
queue with its confirmation page."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from budgets.models import Budget, BudgetAlert, BudgetOverride, BudgetThreshold, Reservation
from tests.budgets.conftest import StaffPersona, in_days, pending_override
from tests.conftest import Persona, event, settle
from usage import services

pytestmark = pytest.mark.django_db
QUEUE = "/admin/budgets/budgetoverride/"


def spend(who: Persona, request_id: str, dollars: int) -> None:
    """Spend whole dollars on project "ranker" (model "flat-1" costs 1 USD per token)."""
    services.model_price_set(
        provider="openai",
        model="flat-1",
        input_per_mtok=Decimal(1_000_000),
        output_per_mtok=Decimal(1_000_000),
        effective_from=datetime(2015, 1, 1, tzinfo=UTC),
    )
    body = event(request_id, model="flat-1", input_tokens=dollars, output_tokens=0)
    assert who.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()


def text(response: Any) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def confirm(who: StaffPersona, verdict: str, override: BudgetOverride, reason: str) -> Any:
    """The queue's action, posted the way the confirmation page posts it back."""
    form = {
        "action": f"{verdict}_selected",
        "_selected_action": [override.pk],
        "post": "yes",
        "reason": reason,
    }
    return who.client.post(QUEUE, form, follow=True)


def test_the_budget_list_shows_a_utilisation_bar_spend_remaining_and_period_end(
    admin: Persona, member: Persona, budget: Budget
) -> None:
    spend(member, "adm-1", 85)
    page = text(admin.client.get("/admin/budgets/budget/"))
    assert 'class="tm-bar"' in page
    assert "width:85.0%;background:#e48b00" in page
    assert "85 USD" in page  # amounts as the API writes them
    assert "15 USD" in page
    period_end = budget.window_at(timezone.now()).end
    assert timezone.localtime(period_end).strftime("%Y-%m-%d %H:%M") in page


def test_the_queue_lists_pending_overrides_newest_first_by_default(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    decided = pending_override(budget, requester, reason="decided already")
    approver.client.post(f"/api/v1/overrides/{decided.pk}/reject", {"reason": "no"}, format="json")
    pending_override(budget, requester, reason="older ask")
    pending_override(budget, requester, reason="newer ask")
    page = text(approver.client.get(QUEUE))
    assert page.index("newer ask") < page.index("older ask")
    assert "decided already" not in page
    assert "decided already" in text(approver.client.get(QUEUE + "?status=all"))


def test_approving_from_the_queue_asks_for_a_reason_then_records_the_decision(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    form = {"action": "approve_selected", "_selected_action": [override.pk], "index": 0}
    page = text(approver.client.post(QUEUE, form))
    assert 'name="reason"' in page
    assert "launch week traffic" in page
    assert "+50 USD" in page
    assert BudgetOverride.objects.get(pk=override.pk).status == "pending"
    done = text(confirm(approver, "approve", override, "finance signed off"))
    assert "Approved override(s) #" in done
    history = text(approver.client.get(f"{QUEUE}{override.pk}/history/"))
    assert "Approved: finance signed off" in history
    budget_page = text(approver.client.get(f"/admin/budgets/budget/{budget.pk}/change/"))
    assert "approved" in budget_page
    assert "finance signed off" in budget_page
    assert "with overrides 150 USD" in budget_page


def test_a_blank_reason_shows_the_confirmation_page_again(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    page = text(confirm(approver, "reject", override, "   "))
    assert "Give a reason" in page
    assert BudgetOverride.objects.get(pk=override.pk).status == "pending"


def test_the_approve_button_on_an_override_leads_to_the_same_confirmation(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    change = text(approver.client.get(f"{QUEUE}{override.pk}/change/"))
    assert f'href="{QUEUE}{override.pk}/reject/"' in change
    assert 'name="reason"' in text(approver.client.get(f"{QUEUE}{override.pk}/reject/"))
    response = approver.client.post(f"{QUEUE}{override.pk}/reject/", {"reason": "use batch"})
    assert response.status_code == 302
    override.refresh_from_db()
    assert (override.status, override.decided_by, override.decision_reason) == (
        "rejected",
        approver.user,
        "use batch",
    )


def test_a_staff_user_without_the_permission_sees_no_decisions_and_is_refused(
    clerk: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    queue = text(clerk.client.get(QUEUE))
    assert "launch week traffic" in queue
    assert "approve_selected" not in queue
    assert "/approve/" not in text(clerk.client.get(f"{QUEUE}{override.pk}/change/"))
    assert confirm(clerk, "approve", override, "sneaky").status_code == 403
    assert clerk.client.get(f"{QUEUE}{override.pk}/approve/").status_code == 403
    assert clerk.client.post(f"{QUEUE}{override.pk}/approve/", {"reason": "x"}).status_code == 403
    assert BudgetOverride.objects.get(pk=override.pk).status == "pending"


def test_the_requester_cannot_approve_their_own_in_the_admin(
    requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    assert "/approve/" not in text(requester.client.get(f"{QUEUE}{override.pk}/change/"))
    page = text(confirm(requester, "approve", override, "trust me"))
    assert f"Override #{override.pk} was not approved" in page
    response = requester.client.post(f"{QUEUE}{override.pk}/approve/", {"reason": "x"}, follow=True)
    assert "another approver must decide it" in text(response)
    assert BudgetOverride.objects.get(pk=override.pk).status == "pending"


def test_an_already_decided_override_is_refused_in_the_admin(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    confirm(approver, "approve", override, "first")
    response = approver.client.post(
        f"{QUEUE}{override.pk}/reject/", {"reason": "second"}, follow=True
    )
    assert "already approved" in text(response)
    assert BudgetOverride.objects.get(pk=override.pk).decision_reason == "first"


def test_a_staff_user_can_request_an_override_in_the_admin(
    requester: StaffPersona, budget: Budget
) -> None:
    form = {
        "budget": budget.pk,
        "extra_tokens": "1000000",
        "reason": "batch backfill",
        "expires_at_0": in_days(3).strftime("%Y-%m-%d"),
        "expires_at_1": "12:00:00",
    }
    response = requester.client.post(QUEUE + "add/", form, follow=True)
    assert response.status_code == 200
    override = BudgetOverride.objects.get()
    assert (override.status, override.requested_by_user) == ("pending", requester.user)
    assert "batch backfill" in text(response)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expires_at_0": "2020-01-01"}, "Is in the past"),
        ({"extra_cost": ""}, "Give extra_cost and/or extra_tokens"),
        ({"extra_cost": "-5"}, "greater than"),
        ({"unlimited": "on"}, "not both"),
    ],
)
def test_a_bad_override_request_in_the_admin_shows_the_field_error(
    requester: StaffPersona, budget: Budget, fields: dict[str, str], message: str
) -> None:
    form = {
        "budget": budget.pk,
        "extra_cost": "20",
        "reason": "more",
        "expires_at_0": in_days(3).strftime("%Y-%m-%d"),
        "expires_at_1": "12:00:00",
        **fields,
    }
    response = requester.client.post(QUEUE + "add/", form)
    assert response.status_code == 200
    assert message in text(response)
    assert not BudgetOverride.objects.exists()


def test_a_budget_made_in_the_admin_goes_through_the_service(admin: Persona) -> None:
    form = {
        "name": "search team",
        "is_active": "on",
        "scope": "team",
        "scope_id": "search",
        "period": "monthly",
        "timezone": "Europe/Berlin",
        "cost_limit": "250",
        "enforcement": "hard",
        "thresholds-TOTAL_FORMS": "1",
        "thresholds-INITIAL_FORMS": "0",
        "thresholds-0-percent": "",
    }
    response = admin.client.post("/admin/budgets/budget/add/", form, follow=True)
    assert response.status_code == 200
    budget = Budget.objects.get(name="search team")
    assert budget.team_id == "search"  # filled from the scope, as the API does
    percents = BudgetThreshold.objects.filter(budget=budget).values_list("percent", flat=True)
    assert sorted(percents) == [Decimal(50), Decimal(80), Decimal(90)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cost_limit": ""}, "Give a cost_limit, a token_limit, or both."),
        ({"timezone": "Mars/Olympus"}, "Unknown time zone"),
        ({"scope_id": ""}, "A team budget needs a scope_id."),
    ],
)
def test_an_invalid_budget_in_the_admin_shows_the_services_error(
    admin: Persona, fields: dict[str, str], message: str
) -> None:
    form = {
        "name": "bad",
        "scope": "team",
        "scope_id": "search",
        "period": "monthly",
        "timezone": "UTC",
        "cost_limit": "10",
        "enforcement": "hard",
        "thresholds-TOTAL_FORMS": "0",
        "thresholds-INITIAL_FORMS": "0",
        **fields,
    }
    response = admin.client.post("/admin/budgets/budget/add/", form)
    assert response.status_code == 200
    assert message in text(response)
    assert not Budget.objects.exists()


def test_editing_thresholds_in_the_admin_replaces_them(admin: Persona, budget: Budget) -> None:
    url = f"/admin/budgets/budget/{budget.pk}/change/"
    page = admin.client.get(url)
    form = {k: v for k, v in page.context["adminform"].form.initial.items() if v is not None}
    thresholds = list(BudgetThreshold.objects.filter(budget=budget).order_by("percent"))
    form.update(
        {
            "is_active": "on",
            "cost_limit": "120",
            "thresholds-TOTAL_FORMS": "3",
            "thresholds-INITIAL_FORMS": "3",
            **{f"thresholds-{i}-id": t.pk for i, t in enumerate(thresholds)},
            **{f"thresholds-{i}-budget": budget.pk for i in range(3)},
            **{f"thresholds-{i}-percent": t.percent for i, t in enumerate(thresholds)},
            "thresholds-1-DELETE": "on",
            "thresholds-2-percent": "95",
        }
    )
    for name in ("overrides", "alerts", "periods"):
        form.update({f"{name}-TOTAL_FORMS": "0", f"{name}-INITIAL_FORMS": "0"})
    response = admin.client.post(url, form, follow=True)
    assert response.status_code == 200
    budget.refresh_from_db()
    assert budget.cost_limit == Decimal(120)
    percents = BudgetThreshold.objects.filter(budget=budget).values_list("percent", flat=True)
    assert sorted(percents) == [Decimal(50), Decimal(95)]


def test_the_budget_page_shows_alerts_and_override_history(
    admin: Persona, requester: StaffPersona, approver: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester, reason="quarter end")
    confirm(approver, "reject", override, "not this time")
    BudgetAlert.objects.create(
        budget=budget,
        period_start=budget.window_at(timezone.now()).start,
        kind="threshold",
        metric="cost",
        threshold=Decimal(80),
        spent=Decimal(80),
        message="ranker monthly passed 80 % of its cost limit",
    )
    pending_override(budget, requester, reason="still waiting")
    page = text(admin.client.get(f"/admin/budgets/budget/{budget.pk}/change/"))
    queue_link = re.search(r"href='([^']+)'>pending override", page).group(1).replace("&amp;", "&")
    assert "still waiting" in text(admin.client.get(queue_link))
    assert "quarter end" in page
    assert "not this time" in page
    assert "rejected" in page
    assert "approver" in page
    assert "passed 80 % of its cost limit" in page


def test_alerts_and_reservations_are_read_only(admin: Persona) -> None:
    assert admin.client.get("/admin/budgets/budgetalert/").status_code == 200
    assert admin.client.get("/admin/budgets/budgetalert/add/").status_code == 403
    assert admin.client.get("/admin/budgets/reservation/add/").status_code == 403
    assert admin.client.get("/admin/budgets/agentprofile/add/").status_code == 200
    assert admin.client.get("/admin/budgets/alertchannel/add/").status_code == 200


def test_it_shows_a_budgets_limit_in_its_form_as_the_api_writes_it(
    admin: Persona, budget: Budget
) -> None:
    page = text(admin.client.get(f"/admin/budgets/budget/{budget.pk}/change/"))
    assert re.search(r'name="cost_limit" value="100"', page)
    assert "100.000000" not in page
    assert re.search(r'name="thresholds-0-percent" value="50"', page)


def test_it_shows_reservation_amounts_as_the_api_writes_them(admin: Persona) -> None:
    held = Reservation.objects.create(
        reservation_id="rsv-admin-1", cost=Decimal("0.00195"), tokens=7000, expires_at=in_days(1)
    )
    listing = text(admin.client.get("/admin/budgets/reservation/"))
    page = text(admin.client.get(f"/admin/budgets/reservation/{held.pk}/change/"))
    assert '<td class="field-cost_usd">0.00195</td>' in listing
    assert "0.00195 USD" in page
    assert "0.0019500000" not in listing + page


def test_it_shows_an_alerts_amounts_with_their_unit(admin: Persona, budget: Budget) -> None:
    alert = BudgetAlert.objects.create(
        budget=budget,
        period_start=budget.window_at(timezone.now()).start,
        kind="threshold",
        metric="cost",
        threshold=Decimal(80),
        spent=Decimal("80.5"),
        limit=Decimal(100),
        percent=Decimal("80.50"),
        message="ranker monthly passed 80 % of its cost limit",
    )
    page = text(admin.client.get(f"/admin/budgets/budgetalert/{alert.pk}/change/"))
    assert "80.5 USD" in page
    assert "100 USD" in page
    assert "80.5 %" in page
    assert "80.5000000000" not in page


def test_it_explains_an_alert_channels_target_and_secret(admin: Persona) -> None:
    page = text(admin.client.get("/admin/budgets/alertchannel/add/"))
    assert "the conversation id the alert is published to" in page
    assert "X-Tokenmgr-Signature" in page
    assert "Leave empty for the status feed and email." in page


def test_the_queue_keeps_the_decision_in_the_status_column(
    approver: StaffPersona, requester: StaffPersona, budget: Budget
) -> None:
    override = pending_override(budget, requester)
    confirm(approver, "approve", override, "finance signed off")
    page = text(approver.client.get(QUEUE + "?status=all"))
    assert f"#{override.pk} ranker monthly" in page
    assert "approved by approver" in page
