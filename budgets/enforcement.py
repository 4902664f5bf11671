"""Enforcement of budgets: check/reserve before a request, cancel a reservation, and settle usage
against the budget counters and reservations during ingestion (called by usage.services)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from budgets import counters, selectors
from budgets.models import Budget, CounterRebuild, Reservation, Window
from budgets.schemas import BudgetCheckIn
from budgets.services import counter_seed, counters_rebuild
from tokenmgr_project import redis as tm_redis
from usage import pricing, tokenizer
from usage.auth import Principal
from usage.errors import ApiError, FieldErrors
from usage.rows import ROW_INDEX, Row

logger = logging.getLogger(__name__)


# --- check / reserve -----------------------------------------------------------------------------


@dataclass(slots=True)
class CheckResult:
    allowed: bool
    cost: Decimal
    tokens: int
    input_tokens: int
    estimated: bool
    blocking: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    reservation_id: str | None = None
    expires_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "allowed": self.allowed,
            "estimated_cost": pricing.money(self.cost),
            "estimated_tokens": self.tokens,
            "input_tokens": self.input_tokens,
            "input_tokens_estimated": self.estimated,
            "currency": pricing.CURRENCY,
            "blocking_budget": self.blocking,
            "warnings": self.warnings,
            "budgets": self.budgets,
        }
        if self.reservation_id:
            body["reservation_id"] = self.reservation_id
            body["reservation_expires_at"] = (
                self.expires_at.isoformat() if self.expires_at else None
            )
        return body


def _input_tokens(params: BudgetCheckIn) -> tuple[int, bool]:
    given = [x for x in (params.input_tokens, params.messages, params.prompt) if x is not None]
    if len(given) != 1:
        raise ApiError(
            "Invalid input.",
            fields={"input_tokens": ["Give exactly one of input_tokens, messages or prompt."]},
        )
    if params.input_tokens is not None:
        return params.input_tokens, False
    choice = tokenizer.encoding_for_model(params.model)
    encoding = tokenizer.get_encoding(choice.name)
    if params.prompt is not None:
        return tokenizer.count_text(params.prompt, encoding), choice.estimated
    messages = [m.model_dump(exclude_none=True) for m in params.messages or []]
    return tokenizer.count_messages(messages, encoding), choice.estimated


def _attribution(params: BudgetCheckIn, principal: Principal) -> dict[str, str]:
    values = {dim: getattr(params, dim) for dim in selectors.DIMENSIONS}
    errors: FieldErrors = {}
    for dim in ("team_id", "project_id"):
        own = getattr(principal, dim)
        if own:
            if values[dim] and values[dim] != own:
                errors[dim] = [f"This API key may only check requests of {dim[:-3]} {own!r}."]
            values[dim] = own
    if errors:
        raise ApiError("Invalid input.", fields=errors, status_code=403)
    return values


def _hold_for(rule: selectors.Rule, window: Window) -> counters.Hold:
    cost = rule.limits.cost
    return counters.Hold(
        budget_id=rule.budget.pk,
        window=window,
        cost_limit_units=None if cost is None else counters.limit_units(cost),
        token_limit=rule.limits.tokens,
        hard=rule.hard,
    )


def _budget_view(
    rule: selectors.Rule,
    hold: counters.Hold,
    totals: counters.Totals,
    cost_units: int,
    tokens: int,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "budget_id": rule.budget.pk,
        "name": rule.budget.name,
        "scope": rule.budget.scope,
        "scope_id": rule.budget.scope_id,
        "enforcement": rule.budget.enforcement,
        "period_end": None
        if rule.budget.period == Budget.Period.LIFETIME
        else hold.window.end.isoformat(),
    }
    if hold.cost_limit_units is not None:
        used = totals.cost_units + totals.held_cost_units
        view["cost_limit"] = pricing.money(counters.from_units(hold.cost_limit_units))
        view["cost_remaining"] = pricing.money(counters.from_units(hold.cost_limit_units - used))
        view["cost_percent_after"] = _pct(used + cost_units, hold.cost_limit_units)
    if hold.token_limit is not None:
        used_t = totals.tokens + totals.held_tokens
        view["token_limit"] = hold.token_limit
        view["tokens_remaining"] = hold.token_limit - used_t
        view["tokens_percent_after"] = _pct(used_t + tokens, hold.token_limit)
    return view


def _pct(value: int, limit: int) -> str:
    return f"{Decimal(value) * 100 / Decimal(limit):.2f}" if limit > 0 else "0.00"


def _warnings(rule: selectors.Rule, view: dict[str, Any]) -> list[dict[str, Any]]:
    warnings = []
    for metric, key in (("cost", "cost_percent_after"), ("tokens", "tokens_percent_after")):
        if key not in view:
            continue
        after = Decimal(view[key])
        crossed = [t for t in rule.thresholds if after >= t]
        if after > 100 and not rule.hard:
            warnings.append(
                {
                    "budget_id": rule.budget.pk,
                    "kind": "soft_limit_exceeded",
                    "metric": metric,
                    "percent_after": view[key],
                    "message": f"{rule.budget.name}: this request takes {metric} over the soft "
                    f"limit ({view[key]} %).",
                }
            )
        elif crossed:
            warnings.append(
                {
                    "budget_id": rule.budget.pk,
                    "kind": "threshold",
                    "metric": metric,
                    "threshold": f"{max(crossed):.2f}",
                    "percent_after": view[key],
                    "message": f"{rule.budget.name}: {metric} at {view[key]} % of its limit "
                    f"after this request.",
                }
            )
    return warnings


def _expect_budget(principal: Principal, budget_id: int, rules: list[selectors.Rule]) -> None:
    """The caller names the budget it means to reserve on: refuse if that one would not hold."""
    budget = selectors.budget_for_principal(principal, budget_id)
    if not budget.is_active:
        raise ApiError(
            "Budget is inactive.",
            fields={"budget_id": ["This budget is inactive: nothing can be reserved on it."]},
            status_code=409,
        )
    if all(rule.budget.pk != budget.pk for rule in rules):
        raise ApiError(
            "Budget does not apply.",
            fields={"budget_id": ["This budget does not cover the request's attribution."]},
        )


def budget_check(*, principal: Principal, params: BudgetCheckIn) -> CheckResult:
    """Would this request fit every applicable budget? With `reserve`, an allowed check holds the
    worst-case cost (all input at the full input rate, plus max_output_tokens) against every
    applicable budget atomically; POST /usage with the reservation_id settles it."""
    input_tokens, estimated = _input_tokens(params)
    attribution = _attribution(params, principal)
    now = timezone.now()
    price = pricing.price_usage(
        choice=pricing.price_choice(params.provider, params.model, now),
        provider=params.provider,
        model=params.model,
        at=now,
        input_tokens=input_tokens,
        output_tokens=params.max_output_tokens,
        cache_read_tokens=0,
        cache_write_tokens=0,
    )
    cost: Decimal = price.cost
    tokens = input_tokens + params.max_output_tokens
    cost_units = counters.hold_units(cost)
    rules = selectors.applicable_rules(attribution)
    if params.budget_id is not None:
        _expect_budget(principal, params.budget_id, rules)
    holds = [_hold_for(rule, rule.budget.window_at(now)) for rule in rules]
    outcome = _run_check(rules, holds, params, attribution, cost=cost, tokens=tokens)
    result = CheckResult(
        allowed=outcome.blocked is None,
        cost=cost,
        tokens=tokens,
        input_tokens=input_tokens,
        estimated=estimated or price.unpriced,
        reservation_id=outcome.reservation_id,
        expires_at=(
            now + timedelta(seconds=params.reservation_ttl_seconds)
            if outcome.reservation_id
            else None
        ),
    )
    for i, (rule, hold, totals) in enumerate(zip(rules, holds, outcome.totals, strict=True)):
        view = _budget_view(rule, hold, totals, cost_units, tokens)
        result.budgets.append(view)
        if i == outcome.blocked:
            result.blocking = view
        else:
            result.warnings.extend(_warnings(rule, view))
    if price.unpriced:
        result.warnings.append(
            {
                "kind": "unpriced_model",
                "message": f"No price is known for {params.model!r}: cost limits see it as 0.",
            }
        )
    return result


def _run_check(
    rules: list[selectors.Rule],
    holds: list[counters.Hold],
    params: BudgetCheckIn,
    attribution: dict[str, str],
    *,
    cost: Decimal,
    tokens: int,
) -> counters.CheckOutcome:
    if not rules:
        reservation_id = None
        if params.reserve:  # nothing to hold, but the caller may still settle it
            reservation_id = _empty_reservation(params, attribution, cost=cost, tokens=tokens)
        return counters.CheckOutcome(None, [], reservation_id)
    if tm_redis.available():
        try:
            if counters.rebuild_due:  # usage went straight to the database lately
                counters_rebuild()
            return counters.redis_check(
                holds,
                cost_units=counters.hold_units(cost),
                tokens=tokens,
                reserve=params.reserve,
                ttl_seconds=params.reservation_ttl_seconds,
                seed=lambda hold: counter_seed(_budget_of(rules, hold), hold.window),
                team_id=attribution["team_id"],
                project_id=attribution["project_id"],
            )
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; checking budgets in the database")
            tm_redis.trip()
    return counters.db_check(
        [r.budget for r in rules],
        holds,
        cost=cost,
        tokens=tokens,
        reserve=params.reserve,
        ttl_seconds=params.reservation_ttl_seconds,
        team_id=attribution["team_id"],
        project_id=attribution["project_id"],
    )


def _budget_of(rules: list[selectors.Rule], hold: counters.Hold) -> Budget:
    return next(r.budget for r in rules if r.budget.pk == hold.budget_id)


def _empty_reservation(
    params: BudgetCheckIn, attribution: dict[str, str], *, cost: Decimal, tokens: int
) -> str:
    outcome = (
        counters.redis_check(
            [],
            cost_units=counters.hold_units(cost),
            tokens=tokens,
            reserve=True,
            ttl_seconds=params.reservation_ttl_seconds,
            seed=lambda hold: None,
            team_id=attribution["team_id"],
            project_id=attribution["project_id"],
        )
        if tm_redis.available()
        else counters.db_check(
            [],
            [],
            cost=cost,
            tokens=tokens,
            reserve=True,
            ttl_seconds=params.reservation_ttl_seconds,
            team_id=attribution["team_id"],
            project_id=attribution["project_id"],
        )
    )
    assert outcome.reservation_id is not None
    return outcome.reservation_id


def reservation_cancel(*, principal: Principal, reservation_id: str) -> str:
    """Free an open reservation's hold now. Returns the status it had. Another scope's
    reservation answers 404, exactly like an unknown id."""
    if tm_redis.available() and selectors.redis_reservation_for_principal(
        principal, reservation_id
    ):
        status = counters.redis_cancel(reservation_id)
        if status is not None:
            return status
    with transaction.atomic():
        row = selectors.get_reservation_for_principal(principal, reservation_id, lock=True)
        before = row.status
        if row.status == Reservation.Status.OPEN:
            row.status = Reservation.Status.CANCELLED
            row.closed_at = timezone.now()
            row.save(update_fields=["status", "closed_at"])
    return before


# --- usage settlement (called by usage.services during ingestion) --------------------------------


@dataclass(frozen=True, slots=True)
class UsagePlan:
    """Per row: the counter keys to increment, its cost (counter units), tokens and reservation
    id; and per counter key a (budget id, occurred_at) inside its window."""

    keys: list[list[str]]
    cost_units: list[int]
    tokens: list[int]
    reservations: list[str]
    budget_ids: set[int]
    windows: dict[str, tuple[int, datetime]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.budget_ids and not any(self.reservations)


def usage_plan(rows: Sequence[Row]) -> UsagePlan:
    keys: list[list[str]] = []
    budget_ids: set[int] = set()
    windows: dict[str, tuple[int, datetime]] = {}
    has_rules = bool(selectors.active_rules().everything)
    for row in rows:
        row_keys = []
        if has_rules:
            attribution = {dim: row[ROW_INDEX[dim]] for dim in selectors.DIMENSIONS}
            occurred_at = row[ROW_INDEX["occurred_at"]]
            for rule in selectors.applicable_rules(attribution):
                key = counters.counter_key(rule.budget.pk, rule.budget.window_at(occurred_at))
                row_keys.append(key)
                budget_ids.add(rule.budget.pk)
                windows.setdefault(key, (rule.budget.pk, occurred_at))
        keys.append(row_keys)
    return UsagePlan(
        keys=keys,
        # Exact: priced costs are whole units (usage.pricing rounds to the ledger's scale).
        cost_units=[counters.to_units(counters.row_spend(row)[0]) for row in rows],
        tokens=[counters.row_spend(row)[1] for row in rows],
        reservations=[row[ROW_INDEX["reservation_id"]] or "" for row in rows],
        budget_ids=budget_ids,
        windows=windows,
    )


def usage_written_direct(plan: UsagePlan) -> None:
    """Usage is being written straight to the database although Redis is configured (it was
    unreachable): in the same transaction, record which counters it skipped, so they are
    rebuilt before anyone relies on them again (services.counters_rebuild)."""
    if not plan.windows:
        return
    CounterRebuild.objects.create(
        counters=[[budget_id, at.isoformat()] for budget_id, at in plan.windows.values()]
    )
    counters.rebuild_due = True


def reservations_unknown_db(reservation_ids: set[str], *, principal: Principal) -> set[str]:
    """Of these ids, those no reservation inside the principal's scope was ever made with
    (database mode): another scope's reservation is as unknown as one never made."""
    if not reservation_ids:
        return set()
    known = set(
        selectors.reservations_for_principal(principal)
        .filter(reservation_id__in=reservation_ids)
        .values_list("reservation_id", flat=True)
    )
    return reservation_ids - known


def reservations_settle_db(settled: dict[str, str]) -> None:
    """reservation_id → request_id of the usage that settled it; only open ones change."""
    now = timezone.now()
    for reservation_id, request_id in settled.items():
        Reservation.objects.filter(
            reservation_id=reservation_id, status=Reservation.Status.OPEN
        ).update(status=Reservation.Status.SETTLED, settled_request_id=request_id, closed_at=now)


def usage_counted(budget_ids: set[int]) -> None:
    """Usage landed on these budgets: evaluate their alerts soon (throttled)."""
    from budgets import alerts  # here: alerts imports usage.services, which imports this module

    alerts.alerts_evaluate_soon(budget_ids)
