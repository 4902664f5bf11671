"""Budget actions: one registry entry per operation, shared by the REST views and /signals."""

from __future__ import annotations

from typing import Any

from budgets import enforcement, selectors, services
from budgets.models import Budget
from budgets.schemas import BudgetCheckIn, ReservationCancelIn
from usage.actions import Outcome, action, validate
from usage.auth import Principal
from usage.errors import ApiError
from usage.pricing import money


def budget_out(budget: Budget) -> dict[str, Any]:
    return {
        "id": budget.pk,
        "name": budget.name,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "team_id": budget.team_id,
        "project_id": budget.project_id,
        "period": budget.period,
        "timezone": budget.timezone,
        "cost_limit": money(budget.cost_limit) if budget.cost_limit is not None else None,
        "token_limit": budget.token_limit,
        "currency": "USD",
        "enforcement": budget.enforcement,
        "thresholds": [f"{t.percent:.2f}" for t in budget.thresholds.all()],
        "is_active": budget.is_active,
        "created_at": budget.created_at.isoformat(),
        "updated_at": budget.updated_at.isoformat(),
    }


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError("Invalid input.", fields={"non_field_errors": ["Expected a JSON object."]})
    return data


def _budget_id(data: dict[str, Any]) -> Any:
    if "budget_id" not in data:
        raise ApiError("Invalid input.", fields={"budget_id": ["This field is required."]})
    return data["budget_id"]


@action(
    "list_budgets",
    "Budgets visible to the caller (optionally only active ones).",
    staff_perm="budgets.view_budget",
)
def list_budgets(principal: Principal, data: Any) -> Outcome:
    params = _object(data)
    qs = selectors.budgets_for_principal(principal).order_by("id")
    active = params.get("active")
    if active is not None:
        if str(active).lower() not in {"true", "false", "1", "0"}:
            raise ApiError("Invalid filter.", fields={"active": ["Use true or false."]})
        qs = qs.filter(is_active=str(active).lower() in {"true", "1"})
    return Outcome({"results": [budget_out(b) for b in qs]})


@action("create_budget", "Create a budget (SPEC §5).", staff_perm="budgets.add_budget")
def create_budget(principal: Principal, data: Any) -> Outcome:
    budget = services.budget_create(principal=principal, **_object(data))
    return Outcome(budget_out(budget), status=201)


@action("get_budget", "One budget.", staff_perm="budgets.view_budget")
def get_budget(principal: Principal, data: Any) -> Outcome:
    return Outcome(budget_out(selectors.budget_for_principal(principal, _budget_id(_object(data)))))


@action(
    "update_budget",
    "Change a budget (name, limits, thresholds, enforcement, active).",
    staff_perm="budgets.change_budget",
)
def update_budget(principal: Principal, data: Any) -> Outcome:
    changes = dict(_object(data))
    budget = selectors.budget_for_principal(principal, changes.pop("budget_id", None))
    budget = services.budget_update(budget=budget, principal=principal, **changes)
    return Outcome(budget_out(selectors.budget_for_principal(principal, budget.pk)))


@action(
    "delete_budget",
    "Deactivate a budget; its history stays.",
    staff_perm="budgets.delete_budget",
)
def delete_budget(principal: Principal, data: Any) -> Outcome:
    budget = selectors.budget_for_principal(principal, _budget_id(_object(data)))
    return Outcome(budget_out(services.budget_deactivate(budget=budget)))


@action(
    "get_budget_status",
    "Limit, effective limit, spent, reserved, remaining, projection.",
    staff_perm="budgets.view_budget",
)
def get_budget_status(principal: Principal, data: Any) -> Outcome:
    budget = selectors.budget_for_principal(principal, _budget_id(_object(data)))
    return Outcome(selectors.budget_status(budget).as_dict())


@action(
    "check_budget",
    "Would this request fit every applicable budget? With reserve=true, hold its worst case.",
    staff_perm="budgets.view_budget",
)
def check_budget(principal: Principal, data: Any) -> Outcome:
    params = validate(BudgetCheckIn, data)
    result = enforcement.budget_check(principal=principal, params=params)
    return Outcome(result.as_dict())


@action(
    "cancel_reservation",
    "Free an open reservation's hold now.",
    staff_perm="budgets.change_reservation",
)
def cancel_reservation(principal: Principal, data: Any) -> Outcome:
    params = validate(ReservationCancelIn, data)
    before = enforcement.reservation_cancel(
        principal=principal, reservation_id=params.reservation_id
    )
    return Outcome({"reservation_id": params.reservation_id, "status_before": before})
