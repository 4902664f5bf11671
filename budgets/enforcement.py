"""Enforcement of budgets: check/reserve before a request, cancel a reservation, and budgets'
part of ingestion (`BudgetAccounting`, the usage.hooks accountant): count usage against the
budget counters and settle its reservation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from budgets import alerts, counters, selectors
from budgets.models import Budget, CounterRebuild, Reservation, Window
from budgets.schemas import BudgetCheckIn
from budgets.services import counter_seed, counters_rebuild
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal, within_scope
from usage import buffer, hooks, pricing, tokenizer
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
    values["team_id"], values["project_id"], errors = within_scope(
        principal, values["team_id"], values["project_id"], doing="check requests of"
    )
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
    return str(selectors.percent(value, limit) or Decimal("0.00"))


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


def budget_check_cached(*, principal: Principal, params: BudgetCheckIn) -> CheckResult | None:
    """`budget_check` from caches and Redis alone, for the event loop (core.hotpath), or None
    when it needs the database: rules or price overrides due for a reload, a budget named by id,
    counters to rebuild or seed, Redis not steady. None is always answered before the check's
    one side effect (the Redis script's hold), so the caller simply runs `budget_check`."""
    if (
        params.budget_id is not None
        or not selectors.rules_fresh()
        or not pricing.overrides.fresh()
        or counters.rebuild_due
        or not tm_redis.steady()
    ):
        return None
    return budget_check(principal=principal, params=params, cached_only=True)


def budget_check(
    *, principal: Principal, params: BudgetCheckIn, cached_only: bool = False
) -> CheckResult | None:
    """Would this request fit every applicable budget? With `reserve`, an allowed check holds the
    worst-case cost (all input at the full input rate, plus max_output_tokens) against every
    applicable budget atomically; POST /usage with the reservation_id settles it. (None only
    with `cached_only`: see budget_check_cached.)"""
    input_tokens, estimated = _input_tokens(params)
    attribution = _attribution(params, principal)
    now = timezone.now()
    price = pricing.price_usage(
        choice=pricing.price_choice(params.provider, params.model, now, cached_only=cached_only),
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
    rules = selectors.applicable_rules(attribution, cached_only=cached_only)
    if params.budget_id is not None:
        _expect_budget(principal, params.budget_id, rules)
    holds = [_hold_for(rule, rule.budget.window_at(now)) for rule in rules]
    outcome = _run_check(
        rules, holds, params, attribution, cost=cost, tokens=tokens, cached_only=cached_only
    )
    if outcome is None:
        return None
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
    cached_only: bool = False,
) -> counters.CheckOutcome | None:
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
                seed=(
                    None
                    if cached_only
                    else lambda hold: counter_seed(_budget_of(rules, hold), hold.window)
                ),
                team_id=attribution["team_id"],
                project_id=attribution["project_id"],
            )
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; checking budgets in the database")
            tm_redis.trip()
    if cached_only:
        return None
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
    assert outcome is not None
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


# --- the ingestion accountant (usage.hooks; registered in BudgetsConfig.ready()) ----------------


@dataclass(frozen=True, slots=True)
class UsagePlan:
    """Which counters the rows touched: per counter key a (budget id, occurred_at) inside its
    window, and the budgets counted."""

    budget_ids: set[int]
    windows: dict[str, tuple[int, datetime]] = field(default_factory=dict)


class BudgetAccounting:
    """Budgets' part of every ingestion: the counter increments and reservation settlement
    that the buffer's add script performs atomically with the request-id claim (or the direct
    write performs in its transaction), then alert evaluation."""

    def plan(self, rows: Sequence[Row]) -> hooks.Accounting:
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
        reservations = [row[ROW_INDEX["reservation_id"]] or "" for row in rows]
        counting = None
        if budget_ids or any(reservations):
            counting = []
            for row, row_keys, rsv in zip(rows, keys, reservations, strict=True):
                cost, tokens = counters.row_spend(row)
                counting.append(
                    buffer.Counting(
                        reservation_key=counters.reservation_key(rsv) if rsv else "",
                        # Exact: priced costs are whole units (pricing rounds to ledger scale).
                        cost_units=counters.to_units(cost),
                        tokens=tokens,
                        counter_keys=tuple(row_keys),
                    )
                )
        return hooks.Accounting(
            counting=counting,
            reservations=reservations,
            open_reservations_key=counters.open_reservations_key(),
            state=UsagePlan(budget_ids=budget_ids, windows=windows),
        )

    def unknown_reservations(self, reservation_ids: set[str], *, principal: Principal) -> set[str]:
        """Of these ids, those no reservation inside the principal's scope was ever made with
        (database mode): another scope's reservation is as unknown as one never made."""
        known = set(
            selectors.reservations_for_principal(principal)
            .filter(reservation_id__in=reservation_ids)
            .values_list("reservation_id", flat=True)
        )
        return reservation_ids - known

    def stored_direct(
        self, accounting: hooks.Accounting, *, settled: dict[str, str], redis_configured: bool
    ) -> None:
        plan = accounting.state
        if redis_configured and isinstance(plan, UsagePlan) and plan.windows:
            # Written straight to the database although Redis is configured (it was
            # unreachable): in the same transaction, record which counters it skipped, so they
            # are rebuilt before anyone relies on them again (services.counters_rebuild).
            CounterRebuild.objects.create(
                counters=[[budget_id, at.isoformat()] for budget_id, at in plan.windows.values()]
            )
            counters.rebuild_due = True
        now = timezone.now()
        for reservation_id, request_id in settled.items():  # only open ones change
            Reservation.objects.filter(
                reservation_id=reservation_id, status=Reservation.Status.OPEN
            ).update(
                status=Reservation.Status.SETTLED, settled_request_id=request_id, closed_at=now
            )

    def counted(self, accounting: hooks.Accounting) -> None:
        """Usage landed on these budgets: evaluate their alerts soon (throttled)."""
        plan = accounting.state
        if isinstance(plan, UsagePlan) and plan.budget_ids:
            alerts.alerts_evaluate_soon(plan.budget_ids)
