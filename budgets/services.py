"""Writes of the budgets app: budget CRUD, counter seeding and reconciling, expiring holds.

Checking, reserving and settling against budgets is in budgets.enforcement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone
from pydantic import ValidationError

from budgets import alerts, counters, selectors
from budgets.models import (
    DEFAULT_THRESHOLDS,
    AgentProfile,
    Budget,
    BudgetPeriod,
    BudgetThreshold,
    CounterRebuild,
    Window,
)
from budgets.schemas import BudgetIn, BudgetPatchIn
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from tokenmgr_project.core.errors import (
    ApiError,
    FieldErrors,
    pydantic_field_errors,
    validation_error,
)
from tokenmgr_project.core.principal import Principal, within_scope

logger = logging.getLogger(__name__)

# Changing these on a budget with recorded spend would re-attribute or split that spend.
_SHAPE_FIELDS = ("scope", "scope_id", "team_id", "project_id", "period", "timezone")


# --- budget CRUD ---------------------------------------------------------------------------------


def _invalid(fields: FieldErrors, status_code: int = 400) -> ApiError:
    return ApiError("Invalid budget.", fields=fields, status_code=status_code)


def _normalise_scope(values: dict[str, Any], principal: Principal | None) -> None:
    """Fill the owner fields from the scope and from a scoped key; refuse what lies outside it."""
    scope, scope_id = values["scope"], values["scope_id"]
    errors: FieldErrors = {}
    if scope == Budget.Scope.GLOBAL:
        if scope_id:
            errors["scope_id"] = ["A global budget has no scope_id."]
    elif not scope_id:
        errors["scope_id"] = [f"A {scope} budget needs a scope_id."]
    if scope == Budget.Scope.TEAM:
        if values["team_id"] and values["team_id"] != scope_id:
            errors["team_id"] = ["Must equal scope_id for a team budget."]
        values["team_id"] = scope_id
    if scope == Budget.Scope.PROJECT:
        if values["project_id"] and values["project_id"] != scope_id:
            errors["project_id"] = ["Must equal scope_id for a project budget."]
        values["project_id"] = scope_id
    if principal is not None:
        values["team_id"], values["project_id"], outside = within_scope(
            principal, values["team_id"], values["project_id"], doing="manage budgets of"
        )
        for name, messages in outside.items():
            errors.setdefault(name, []).extend(messages)
    if principal is not None and not principal.is_global and scope == Budget.Scope.GLOBAL:
        errors["scope"] = ["A scoped API key cannot manage global budgets."]
    if principal is not None and principal.project_id and scope == Budget.Scope.TEAM:
        errors["scope"] = ["A project API key cannot manage team budgets."]
    if errors:
        raise _invalid(errors)


def _limits_present(values: dict[str, Any]) -> None:
    if values.get("cost_limit") is None and values.get("token_limit") is None:
        raise _invalid({"cost_limit": ["Give a cost_limit, a token_limit, or both."]})


def _save_thresholds(budget: Budget, thresholds: Sequence[Decimal]) -> None:
    BudgetThreshold.objects.filter(budget=budget).delete()
    BudgetThreshold.objects.bulk_create(
        [BudgetThreshold(budget=budget, percent=p) for p in sorted(thresholds)]
    )


def _save(budget: Budget, update_fields: list[str] | None = None) -> None:
    try:
        with transaction.atomic():
            budget.save(update_fields=update_fields)
    except IntegrityError as exc:
        if "budget_one_active_per_scope_period" in str(exc) or "UNIQUE" in str(exc).upper():
            raise _invalid(
                {"scope_id": ["An active budget for this scope and period already exists."]},
                status_code=409,
            ) from None
        raise


def budget_create(*, principal: Principal | None, user: Any = None, **fields: Any) -> Budget:
    """Create a budget (thresholds default to 50/80/90 %). A scoped key's budgets stay inside
    its team/project."""
    try:
        params = BudgetIn.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(pydantic_field_errors(exc)) from None
    values = params.model_dump()
    thresholds = values.pop("thresholds")
    _normalise_scope(values, principal)
    _limits_present(values)
    with transaction.atomic():
        budget = Budget(
            **values,
            created_by_key_id=principal.key_id if principal else None,
            created_by_user=user
            if user is not None
            else (_user(principal.user_id) if principal and principal.user_id else None),
        )
        _save(budget)
        _save_thresholds(budget, DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        transaction.on_commit(lambda: budget_limits_changed(budget.pk))
    return budget


def _user(user_id: int) -> Any:
    return get_user_model().objects.filter(pk=user_id).first()


def budget_has_spend(budget: Budget, *, now: datetime | None = None) -> bool:
    """Archived periods, or spend or holds in the current period."""
    now = now or timezone.now()
    if BudgetPeriod.objects.filter(budget=budget, tokens_spent__gt=0).exists():
        return True
    totals = selectors.current_totals(budget, budget.window_at(now), now=now)
    return bool(totals.cost_units or totals.tokens or totals.held_cost_units or totals.held_tokens)


def budget_update(
    *, budget: Budget, principal: Principal | None, user: Any = None, **changes: Any
) -> Budget:
    """Change a budget. Scope, period and time zone are fixed once spend is recorded (that spend
    would be split or re-attributed): deactivate it and create another instead."""
    try:
        params = BudgetPatchIn.model_validate(changes)
    except ValidationError as exc:
        raise _invalid(pydantic_field_errors(exc)) from None
    given = params.model_dump(exclude_unset=True)
    thresholds = given.pop("thresholds", None)
    values = {
        name: getattr(budget, name)
        for name in ("scope", "scope_id", "team_id", "project_id", "cost_limit", "token_limit")
    }
    values.update(given)
    if any(k in given for k in ("scope", "scope_id")) and "team_id" not in given:
        values["team_id"] = "" if budget.scope == Budget.Scope.TEAM else budget.team_id
    if any(k in given for k in ("scope", "scope_id")) and "project_id" not in given:
        values["project_id"] = "" if budget.scope == Budget.Scope.PROJECT else budget.project_id
    _normalise_scope(values, principal)
    _limits_present(values)
    reshaped = [
        name
        for name in _SHAPE_FIELDS
        if name in values | given and (values | given)[name] != getattr(budget, name)
    ]
    if reshaped and budget_has_spend(budget):
        raise _invalid(
            {
                name: [
                    "Cannot change while this budget has recorded spend (it would orphan it): "
                    "deactivate this budget and create a new one."
                ]
                for name in reshaped
            },
            status_code=409,
        )
    with transaction.atomic():
        for name, value in (values | given).items():
            setattr(budget, name, value)
        _save(budget)
        if thresholds is not None:
            _save_thresholds(budget, thresholds)
        transaction.on_commit(lambda: budget_limits_changed(budget.pk))
    return budget


def budget_deactivate(*, budget: Budget) -> Budget:
    """DELETE: the budget stops counting but keeps its periods, alerts and overrides (audit)."""
    if budget.is_active:
        budget.is_active = False
        budget.save(update_fields=["is_active", "updated_at"])
        transaction.on_commit(lambda: budget_limits_changed(budget.pk))
    return budget


def budget_limits_changed(budget_id: int) -> None:
    """A budget or its overrides changed: reload limits here now (others within a second) and
    re-evaluate its alerts (a raised limit may resolve them)."""
    selectors.invalidate_rules()
    alerts.alerts_evaluate_soon([budget_id])


# --- counters ------------------------------------------------------------------------------------


def counter_seed(budget: Budget, window: Window) -> None:
    """Load the ledger's (and the buffer's) exact total into a missing Redis counter (or wait
    for the process seeding it)."""
    counters.rebase([(budget, window)], existing=False)


# Budgets rebased per locked transaction: the ledger's writers (the flush) wait for one batch.
_REBASE_BATCH = 100
# CounterRebuild rows handled per rebuild (more: the next check or beat run goes on).
_REBUILD_ROWS = 1000


def counters_reconcile(*, now: datetime | None = None) -> int:
    """Set every active budget's current-period counter to the ledger plus buffer, exactly, in
    both directions and without losing usage counted meanwhile (counters.rebase). Returns how
    many counters were corrected. Nothing should ever need correcting now; a correction is
    logged as a warning, so a drift shows up."""
    if not tm_redis.available():
        return 0
    now = now or timezone.now()
    budgets = list(Budget.objects.filter(is_active=True).order_by("pk"))
    fixed = 0
    for start in range(0, len(budgets), _REBASE_BATCH):
        pairs = [(b, b.window_at(now)) for b in budgets[start : start + _REBASE_BATCH]]
        for change in counters.rebase(pairs, existing=True):
            if change.seeded:
                continue
            if change.cost_delta or change.tokens_delta:
                fixed += 1
                logger.warning(
                    "budget %s counter was off by %s units of 1e-10 USD / %s tokens; corrected",
                    change.budget_id,
                    -change.cost_delta,
                    -change.tokens_delta,
                )
    return fixed


def counters_rebuild() -> int:
    """Rebase the counters that CounterRebuild rows name (usage written straight to the
    database while Redis was unreachable), then delete those rows; returns how many counters
    changed. Rows are read with the ledger frozen, so any usage they describe is in it, and a
    direct write committed later leaves a row for the next rebuild."""
    if not tm_redis.available():
        return 0
    counters.rebuild_due = False  # before reading: a direct write from now on sets it again
    try:
        with transaction.atomic():
            counters.freeze_ledger()
            rows = list(CounterRebuild.objects.order_by("pk")[:_REBUILD_ROWS])
            if not rows:
                return 0
            named: dict[tuple[int, str], tuple[int, datetime]] = {}
            for row in rows:
                for budget_id, at in row.counters:
                    occurred_at = datetime.fromisoformat(at)
                    named.setdefault((int(budget_id), at), (int(budget_id), occurred_at))
            found = Budget.objects.in_bulk({budget_id for budget_id, _at in named.values()})
            pairs: dict[str, tuple[Budget, Window]] = {}
            for budget_id, occurred_at in named.values():
                budget = found.get(budget_id)
                if budget is not None and budget.is_active:
                    window = budget.window_at(occurred_at)
                    pairs.setdefault(counters.counter_key(budget.pk, window), (budget, window))
            changed = [
                change
                for start in range(0, len(pairs), _REBASE_BATCH)
                for change in counters.rebase(
                    list(pairs.values())[start : start + _REBASE_BATCH], existing=True
                )
                if change.cost_delta or change.tokens_delta
            ]
            CounterRebuild.objects.filter(pk__in=[row.pk for row in rows]).delete()
            if len(rows) == _REBUILD_ROWS:
                counters.rebuild_due = True
    except BaseException:
        counters.rebuild_due = True
        raise
    if changed:
        logger.info("rebuilt %s budget counter(s) after usage written direct", len(changed))
    return len(changed)


def counters_costs_rewritten(
    *, spans: Sequence[tuple[Mapping[str, str], datetime, datetime]]
) -> int:
    """Ledger costs were rewritten in the current transaction (usage.hooks.costs_rewritten:
    repricing), so the Redis counters of the budgets those rows count against no longer equal
    the ledger: per attribution, every period of each matching budget from the first changed
    row's to the last's. Names them in that same transaction, as usage written direct does (a
    CounterRebuild row: whoever next relies on them, in any process, rebuilds them first), and
    rebuilds them once it commits. Returns how many counters were named. Database mode keeps no
    counters (spend is summed from the ledger each time): nothing to do."""
    if not tm_redis.configured():
        return 0
    selectors.invalidate_rules()  # the budgets as they are now, not as cached a moment ago
    windows: dict[str, tuple[int, datetime]] = {}
    for attribution, first, last in spans:
        for rule in selectors.applicable_rules(attribution):
            window = rule.budget.window_at(first)
            while True:
                key = counters.counter_key(rule.budget.pk, window)
                windows.setdefault(key, (rule.budget.pk, window.start))
                if window.end > last:
                    break
                window = rule.budget.window_at(window.end)
    if not windows:
        return 0
    CounterRebuild.objects.create(
        counters=[[budget_id, at.isoformat()] for budget_id, at in windows.values()]
    )
    counters.rebuild_due = True
    transaction.on_commit(_rebuild_after_rewrite)
    return len(windows)


def _rebuild_after_rewrite() -> None:
    try:
        counters_rebuild()
    except (*tm_redis.REDIS_ERRORS, *unavailable.DATABASE_ERRORS):
        # Still named (the CounterRebuild row, rebuild_due): the worker's frequent rebuild or
        # the next check does it; the rewrite itself is committed and must not fail now.
        logger.warning("budget counters not rebuilt after repricing; left to the next rebuild")


def counters_rebuild_if_marked() -> int:
    """The worker's frequent check: rebuild if any process wrote usage direct (one tiny
    query when there is nothing to do)."""
    if not tm_redis.available() or not CounterRebuild.objects.exists():
        return 0
    return counters_rebuild()


def reservations_expire() -> int:
    """Free the holds of reservations past their TTL (checks also do this as they go)."""
    freed = counters.db_sweep()
    if tm_redis.available():
        # Each sweep is one short Lua call (Redis serves others between them); stop after a few
        # seconds so a huge backlog cannot hold the worker, the next run goes on.
        deadline = time.monotonic() + _SWEEP_SECONDS
        try:
            while True:
                swept = counters.redis_sweep(limit=_SWEEP_BATCH)
                freed += swept
                if swept < _SWEEP_BATCH or time.monotonic() > deadline:
                    break
        except tm_redis.REDIS_ERRORS:
            tm_redis.trip()
    return freed


_SWEEP_BATCH = 1000
_SWEEP_SECONDS = 5.0


# --- agent profiles ------------------------------------------------------------------------------


def _profile_save(profile: AgentProfile, update_fields: list[str] | None = None) -> None:
    if profile.warning_threshold is not None and profile.warning_threshold > profile.token_budget:
        raise ApiError(
            "Invalid agent profile.",
            fields={
                "warning_threshold": [f"Must be at most the token budget ({profile.token_budget})."]
            },
        )
    try:
        with transaction.atomic():
            profile.save(update_fields=update_fields)
    except IntegrityError as exc:
        if "agentprofile_name_unique" in str(exc) or "UNIQUE" in str(exc).upper():
            raise ApiError(
                "Invalid agent profile.",
                fields={"name": ["An agent profile with this name already exists."]},
                status_code=409,
                code="conflict",
            ) from None
        raise


def agent_profile_create(
    *, name: str, model: str, token_budget: int, warning_threshold: int | None = None
) -> AgentProfile:
    """A guard profile for one agent name (unique: 409 when taken)."""
    profile = AgentProfile(
        name=name, model=model, token_budget=token_budget, warning_threshold=warning_threshold
    )
    _profile_save(profile)
    return profile


def agent_profile_update(*, profile: AgentProfile, **changes: Any) -> AgentProfile:
    """Change the given fields (name, model, token_budget, warning_threshold); the next guard
    call reads them."""
    unknown = set(changes) - {"name", "model", "token_budget", "warning_threshold"}
    if unknown:
        raise validation_error({name: ["Unknown field."] for name in sorted(unknown)})
    for name, value in changes.items():
        setattr(profile, name, value)
    if changes:
        _profile_save(profile, update_fields=[*changes, "updated_at"])
    return profile


def agent_profile_delete(*, profile: AgentProfile) -> None:
    """The agent's guard calls then need a model (and token_budget_override for a budget)."""
    profile.delete()
