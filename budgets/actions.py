"""Budget actions: one registry entry per operation, shared by the REST views and /signals."""

from __future__ import annotations

from typing import Any

from budgets import enforcement, selectors, services
from budgets.models import AgentProfile, Budget, BudgetAlert
from budgets.schemas import (
    AgentProfileIn,
    AgentProfileListIn,
    AgentProfilePatchIn,
    AlertListIn,
    BudgetCheckIn,
    ReservationCancelIn,
)
from tokenmgr_project.core.actions import Outcome, action, validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
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


def _required(data: Any, name: str) -> Any:
    """The id an action on one row needs (checked by the row's gate, `get_<thing>_for_...`)."""
    params = _object(data)
    if name not in params:
        raise ApiError("Invalid input.", fields={name: ["This field is required."]})
    return params[name]


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
    return Outcome(
        budget_out(selectors.budget_for_principal(principal, _required(data, "budget_id")))
    )


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
    budget = selectors.budget_for_principal(principal, _required(data, "budget_id"))
    return Outcome(budget_out(services.budget_deactivate(budget=budget)))


@action(
    "get_budget_status",
    "Limit, effective limit, spent, reserved, remaining, projection, burn rate and the date "
    "the limit is reached at it.",
    staff_perm="budgets.view_budget",
)
def get_budget_status(principal: Principal, data: Any) -> Outcome:
    budget = selectors.budget_for_principal(principal, _required(data, "budget_id"))
    return Outcome(selectors.budget_status(budget, burn=True).as_dict())


def check_budget_cached(principal: Principal, data: Any) -> Outcome | None:
    params = validate(BudgetCheckIn, data)
    result = enforcement.budget_check_cached(principal=principal, params=params)
    return None if result is None else Outcome(result.as_dict())


@action(
    "check_budget",
    "Would this request fit every applicable budget? With reserve=true, hold its worst case.",
    staff_perm="budgets.view_budget",
    inline=check_budget_cached,
)
def check_budget(principal: Principal, data: Any) -> Outcome:
    params = validate(BudgetCheckIn, data)
    result = enforcement.budget_check(principal=principal, params=params)
    assert result is not None  # only the cached form answers None
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


# --- alerts --------------------------------------------------------------------------------------


def alert_out(alert: BudgetAlert) -> dict[str, Any]:
    def amount(value: Any) -> str | None:
        if value is None:
            return None
        return money(value) if alert.metric == BudgetAlert.Metric.COST else str(int(value))

    return {
        "id": alert.pk,
        "budget_id": alert.budget_id,
        "budget_name": alert.budget.name,
        "team_id": alert.budget.team_id,
        "project_id": alert.budget.project_id,
        "kind": alert.kind,
        "metric": alert.metric,
        "period_start": alert.period_start.isoformat(),
        "threshold": f"{alert.threshold:.2f}",
        "spent": amount(alert.spent),
        "limit": amount(alert.limit),
        "percent": None if alert.percent is None else f"{alert.percent:.2f}",
        "message": alert.message,
        "created_at": alert.created_at.isoformat(),
    }


@action(
    "list_alerts",
    "Budget alerts, newest first (filter by budget_id, kind, since; keyset-paginated).",
    staff_perm="budgets.view_budgetalert",
)
def list_alerts(principal: Principal, data: Any) -> Outcome:
    params = validate(AlertListIn, data)
    rows, next_cursor = selectors.alert_list(principal=principal, **params.model_dump())
    return Outcome({"results": [alert_out(a) for a in rows], "next_cursor": next_cursor})


# --- agent profiles ------------------------------------------------------------------------------


def agent_profile_out(profile: AgentProfile) -> dict[str, Any]:
    return {
        "id": profile.pk,
        "name": profile.name,
        "model": profile.model,
        "token_budget": profile.token_budget,
        "warning_threshold": profile.warning_threshold,
        "created_at": profile.created_at.isoformat(),
        "updated_at": profile.updated_at.isoformat(),
    }


@action(
    "list_agent_profiles",
    "Agent profiles (per-run token budgets of POST /guard) by name; `name` finds one agent's.",
    staff_perm="budgets.view_agentprofile",
)
def list_agent_profiles(principal: Principal, data: Any) -> Outcome:
    params = validate(AgentProfileListIn, data)
    rows = selectors.agent_profiles_for_principal(principal).order_by("name")
    if params.name is not None:
        rows = rows.filter(name=params.name)
    return Outcome({"results": [agent_profile_out(p) for p in rows]})


# Profiles are organisation-wide (the guard applies one to every caller naming its agent):
# scoped keys read them, only global keys and staff change them.
@action(
    "create_agent_profile",
    "Create an agent profile (global key or staff).",
    staff_perm="budgets.add_agentprofile",
    staff_or_global=True,
)
def create_agent_profile(principal: Principal, data: Any) -> Outcome:
    params = validate(AgentProfileIn, data)
    return Outcome(agent_profile_out(services.agent_profile_create(**params.model_dump())), 201)


@action("get_agent_profile", "One agent profile.", staff_perm="budgets.view_agentprofile")
def get_agent_profile(principal: Principal, data: Any) -> Outcome:
    profile = selectors.get_agent_profile_for_principal(principal, _required(data, "profile_id"))
    return Outcome(agent_profile_out(profile))


@action(
    "update_agent_profile",
    "Change an agent profile's name, model, token budget or warning threshold (global key or "
    "staff).",
    staff_perm="budgets.change_agentprofile",
    staff_or_global=True,
)
def update_agent_profile(principal: Principal, data: Any) -> Outcome:
    changes = dict(_object(data))
    profile = selectors.get_agent_profile_for_principal(principal, changes.pop("profile_id", None))
    params = validate(AgentProfilePatchIn, changes)
    profile = services.agent_profile_update(
        profile=profile, **params.model_dump(exclude_unset=True)
    )
    return Outcome(agent_profile_out(profile))


@action(
    "delete_agent_profile",
    "Delete an agent profile (global key or staff); answers the profile as it was.",
    staff_perm="budgets.delete_agentprofile",
    staff_or_global=True,
)
def delete_agent_profile(principal: Principal, data: Any) -> Outcome:
    profile = selectors.get_agent_profile_for_principal(principal, _required(data, "profile_id"))
    body = agent_profile_out(profile)
    services.agent_profile_delete(profile=profile)
    return Outcome(body)
