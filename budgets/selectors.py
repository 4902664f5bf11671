"""Reads of the budgets app: the permission gate, effective limits, live status, matching rules."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from budgets import counters
from budgets.models import (
    LIFETIME_END,
    SCOPE_COLUMNS,
    AgentProfile,
    Budget,
    BudgetAlert,
    BudgetOverride,
    CounterRebuild,
    Reservation,
    Window,
)
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal, in_scope
from usage import rollups
from usage.pricing import money
from usage.rows import Row

# Attribution dimensions a budget can be keyed on (usage columns).
DIMENSIONS = ("team_id", "project_id", "user_id", "agent", "feature")


# --- the permission gate -------------------------------------------------------------------------


def budgets_for_principal(principal: Principal) -> QuerySet[Budget]:
    """The budgets a caller may see and manage: a scoped key only those inside its scope."""
    qs = Budget.objects.prefetch_related("thresholds")
    if principal.team_id:
        qs = qs.filter(team_id=principal.team_id)
    if principal.project_id:
        qs = qs.filter(project_id=principal.project_id)
    return qs


def budget_for_principal(principal: Principal, budget_id: Any) -> Budget:
    try:
        return budgets_for_principal(principal).get(pk=int(budget_id))
    except (Budget.DoesNotExist, TypeError, ValueError):
        raise ApiError(
            "Budget not found.", fields={"budget_id": ["No such budget."]}, status_code=404
        ) from None


def _reservation_not_found() -> ApiError:
    # One answer for "no such id" and "not yours", so ids of other scopes reveal nothing.
    return ApiError(
        "Unknown reservation.",
        fields={"reservation_id": ["No such reservation."]},
        status_code=404,
    )


def reservations_for_principal(principal: Principal) -> QuerySet[Reservation]:
    """The reservations (database mode) a caller may act on: those of its team/project."""
    return in_scope(Reservation.objects.all(), principal)


def get_reservation_for_principal(
    principal: Principal, reservation_id: str, *, lock: bool = False
) -> Reservation:
    """A reservation row inside the caller's scope (`lock`: FOR UPDATE); else 404."""
    qs = reservations_for_principal(principal)
    row = (qs.select_for_update() if lock else qs).filter(reservation_id=reservation_id).first()
    if row is None:
        raise _reservation_not_found()
    return row


def redis_reservation_for_principal(principal: Principal, reservation_id: str) -> bool:
    """Whether Redis holds this reservation (True) or not (False: look in the database); the
    same 404 as get_reservation_for_principal when it is another scope's."""
    scope = counters.redis_reservation_scope(reservation_id)
    if scope is None:
        return False
    if not principal.covers(*scope):
        raise _reservation_not_found()
    return True


# --- limits --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    cost: Decimal | None
    tokens: int | None
    unlimited_until: datetime | None = None


def _effective(budget: Budget, overrides: list[BudgetOverride], now: datetime) -> Limits:
    cost, tokens = budget.cost_limit, budget.token_limit
    unlimited_until = None
    for o in overrides:
        if o.status != BudgetOverride.Status.APPROVED or o.expires_at <= now:
            continue
        if o.unlimited:
            unlimited_until = max(unlimited_until or o.expires_at, o.expires_at)
            continue
        if o.extra_cost and cost is not None:
            cost += o.extra_cost
        if o.extra_tokens and tokens is not None:
            tokens += o.extra_tokens
    if unlimited_until is not None:
        return Limits(None, None, unlimited_until)
    return Limits(cost, tokens)


def effective_limits(budget: Budget, *, now: datetime | None = None) -> Limits:
    """The limit plus approved, unexpired overrides (None: no limit of that kind)."""
    now = now or timezone.now()
    overrides = list(
        budget.overrides.filter(status=BudgetOverride.Status.APPROVED, expires_at__gt=now)
    )
    return _effective(budget, overrides, now)


# --- applicable budgets (the hot path: cached per process) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    budget: Budget
    filters: tuple[tuple[str, str], ...]
    limits: Limits
    hard: bool
    thresholds: tuple[Decimal, ...]


@dataclass(slots=True)
class _Rules:
    loaded_at: float = 0.0
    everything: list[Rule] = field(default_factory=list)
    # (dimension, value) of the scope → the rules keyed on it; global rules under ("", "").
    by_scope: dict[tuple[str, str], list[Rule]] = field(default_factory=dict)


# Budgets and overrides change rarely; every process re-reads them at least this often, and at
# once after a change made in this process (budget_limits_changed).
RULES_TTL_SECONDS = 1.0
_rules = _Rules()
_rules_lock = threading.Lock()
_rules_loaded_once = False


def invalidate_rules() -> None:
    _rules.loaded_at = 0.0


def _load_rules(now: datetime) -> _Rules:
    approved = BudgetOverride.objects.filter(
        status=BudgetOverride.Status.APPROVED, expires_at__gt=now
    )
    budgets = Budget.objects.filter(is_active=True).prefetch_related(
        "thresholds", Prefetch("overrides", queryset=approved, to_attr="active_overrides")
    )
    fresh = _Rules(loaded_at=time.monotonic())
    for budget in budgets:
        rule = Rule(
            budget=budget,
            filters=tuple(sorted(budget.filters().items())),
            limits=_effective(budget, budget.active_overrides, now),
            hard=budget.enforcement == Budget.Enforcement.HARD,
            thresholds=tuple(t.percent for t in budget.thresholds.all()),
        )
        fresh.everything.append(rule)
        column = SCOPE_COLUMNS.get(budget.scope, "")
        fresh.by_scope.setdefault((column, budget.scope_id), []).append(rule)
    if tm_redis.configured() and CounterRebuild.objects.exists():
        # Another process wrote usage straight to the database (Redis was unreachable to it):
        # this one's next check rebuilds the counters first. Once per reload, not per request.
        counters.rebuild_due = True
    return fresh


def rules_fresh() -> bool:
    """Are the cached rules current (active_rules would not read the database)?"""
    return time.monotonic() - _rules.loaded_at <= RULES_TTL_SECONDS


def active_rules(*, cached_only: bool = False) -> _Rules:
    """The rules, reloaded after RULES_TTL_SECONDS; with `cached_only` never (the caller checked
    rules_fresh() a moment ago and may not touch the database)."""
    global _rules, _rules_loaded_once
    if not cached_only and time.monotonic() - _rules.loaded_at > RULES_TTL_SECONDS:
        with _rules_lock:
            if time.monotonic() - _rules.loaded_at > RULES_TTL_SECONDS:
                try:
                    _rules = _load_rules(timezone.now())
                    _rules_loaded_once = True
                except unavailable.DATABASE_ERRORS as exc:
                    # Database down: the last rules loaded still say which budgets usage counts
                    # against (tried again after the TTL). Never loaded: nothing to go on (503).
                    if not _rules_loaded_once:
                        raise
                    unavailable.note(exc, "budget rules")
                    _rules.loaded_at = time.monotonic()
    return _rules


def applicable_rules(attribution: Mapping[str, str], *, cached_only: bool = False) -> list[Rule]:
    """Every active budget whose scope matches this attribution (all levels), by budget id."""
    rules = active_rules(cached_only=cached_only)
    found = list(rules.by_scope.get(("", ""), ()))
    for dim in DIMENSIONS:
        value = attribution.get(dim) or ""
        if value:
            found.extend(rules.by_scope.get((dim, value), ()))
    matching = [
        r for r in found if all((attribution.get(col) or "") == value for col, value in r.filters)
    ]
    return sorted(matching, key=lambda r: r.budget.pk)


# --- spend and status ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spend:
    cost: Decimal
    tokens: int
    requests: int


def ledger_spend(budget: Budget, window: Window) -> Spend:
    """The usage ledger's total for this budget's attribution over the window (SQL)."""
    return Spend(*counters.ledger_sums(budget, window))


def current_totals(budget: Budget, window: Window, *, now: datetime) -> counters.Totals:
    """Spent (including buffered usage) and held for one budget's window: the Redis counter
    when it is seeded and current, else computed from the ledger and the buffer. Reads only:
    seeding, rebuilding and sweeping expired holds are the checks' and the beat's work."""
    buffered: list[Row] = []
    if tm_redis.available():
        try:
            totals = None if counters.rebuild_due else counters.redis_totals(budget.pk, window)
            if totals is not None:
                return totals
            # Not seeded (no hold can exist then) or being rebuilt: the ledger plus the buffer.
            buffered = counters.buffered_rows()
        except tm_redis.REDIS_ERRORS:
            tm_redis.trip()
    totals = counters.db_totals([budget], [window], now=now)[0]
    if buffered:
        for row in counters.unflushed(lambda r: counters.row_matches(budget, window, r), buffered):
            cost, tokens = counters.row_spend(row)
            totals = dataclasses.replace(
                totals,
                cost_units=totals.cost_units + counters.to_units(cost),
                tokens=totals.tokens + tokens,
            )
    return totals


def percent(
    spent: Decimal | int, limit: Decimal | int | None, *, rounding: str = ROUND_HALF_EVEN
) -> Decimal | None:
    """The budgets' one percent: spent as a share of limit, to two decimals (None: no limit)."""
    if limit is None or limit <= 0:
        return None
    return (Decimal(spent) * 100 / Decimal(limit)).quantize(Decimal("0.01"), rounding)


def plain(value: Decimal) -> str:
    """A Decimal in plain digits, no exponent or trailing zeros (alert messages and payloads)."""
    return f"{value.normalize():f}"


# --- burn rate and exhaustion date ----------------------------------------------------------------

# The burn rate's window: the last 7 days, or the period so far when it began less than that ago.
BURN_WINDOW = timedelta(days=7)
_DAY_SECONDS = 86400


def _span(seconds: int) -> str:
    if seconds < 3600:
        return f"{max(1, round(seconds / 60))} minutes"
    if seconds < _DAY_SECONDS:
        return f"{plain(Decimal(seconds / 3600).quantize(Decimal('0.1')))} hours"
    return f"{plain(Decimal(seconds / _DAY_SECONDS).quantize(Decimal('0.1')))} days"


@dataclass(frozen=True, slots=True)
class Burn:
    """Spend over a stated trailing window as daily rates, and when the limit in force now
    (with approved overrides) is reached at those rates. Cost in counter units (1e-10 USD)."""

    start: datetime
    end: datetime
    whole_period: bool  # the window is the period so far (it began less than BURN_WINDOW ago)
    cost_units: int
    tokens: int
    exhausts_at: datetime | None
    exhausts_by: str | None  # "cost" or "tokens": the limit reached first
    exhausts_in_period: bool
    basis: str

    @property
    def seconds(self) -> int:
        return max(0, int((self.end - self.start).total_seconds()))

    @property
    def cost_per_day(self) -> Decimal:
        if not self.seconds:
            return Decimal(0)
        per_day = counters.from_units(self.cost_units) * _DAY_SECONDS / self.seconds
        return per_day.quantize(Decimal("0.000001"))

    @property
    def tokens_per_day(self) -> int:
        if not self.seconds:
            return 0
        return int((Decimal(self.tokens) * _DAY_SECONDS / self.seconds).to_integral_value())

    @property
    def window_label(self) -> str:
        """The window in words: "the last 7 days", "the period so far (2.5 days)"."""
        if self.whole_period:
            return f"the period so far ({_span(self.seconds)})"
        return f"the last {_span(self.seconds)}"

    @property
    def rate_label(self) -> str:
        """How the dashboard and the basis name the rate: "the last 7 days' rate"."""
        if self.whole_period:
            return f"the rate of {self.window_label}"
        return f"{self.window_label}' rate"

    def as_dict(self) -> dict[str, Any]:
        return {
            "burn_window": {
                "start": self.start.isoformat(),
                "end": self.end.isoformat(),
                "days": plain(Decimal(self.seconds / _DAY_SECONDS).quantize(Decimal("0.01"))),
                "whole_period": self.whole_period,
                "label": self.rate_label,
            },
            "burn_rate": {
                "cost_per_day": money(self.cost_per_day),
                "tokens_per_day": self.tokens_per_day,
            },
            "exhausts_at": self.exhausts_at.isoformat() if self.exhausts_at else None,
            "exhausts_in_period": self.exhausts_in_period,
            "exhausts_by": self.exhausts_by,
            "exhaustion_basis": self.basis,
        }


def _reached(
    remaining: int, used: int, seconds: int, now: datetime, horizon: datetime
) -> datetime | None:
    """When `remaining` is used up at `used` per `seconds` (now if nothing remains; None if
    never, or not before `horizon`)."""
    if remaining <= 0:
        return now
    if used <= 0 or seconds <= 0:
        return None
    after = Decimal(remaining) * seconds / used  # seconds from now, exact but for the division
    if after >= Decimal((horizon - now).total_seconds()):
        return None
    return now + timedelta(seconds=float(after))


def budget_burn(budget: Budget, status: BudgetStatus, *, now: datetime) -> Burn:
    """The burn rate over BURN_WINDOW (or the period so far, if shorter) and the exhaustion date
    at it. The period-so-far case reuses the status's own figures (counter, buffer included);
    a longer period costs one rollups query (usage.rollups.totals: the flushed ledger)."""
    start = max(status.period_start, now - BURN_WINDOW)
    whole_period = start == status.period_start
    if whole_period:
        cost_units, tokens = counters.to_units(status.cost_spent), status.tokens_spent
    else:
        cost_units, tokens, _requests = rollups.totals(
            filters=budget.filters(), since=start, until=now
        )
    seconds = max(0, int((now - start).total_seconds()))
    end = status.period_end or LIFETIME_END
    draft = Burn(start, now, whole_period, cost_units, tokens, None, None, False, "")
    rate = (
        f"At {draft.rate_label}, {money(draft.cost_per_day)} USD and {draft.tokens_per_day:,} "
        f"tokens a day ({start:%Y-%m-%d %H:%M} to {now:%Y-%m-%d %H:%M} UTC)"
    )
    if status.unlimited_until is not None:
        basis = f"Unlimited by an override until {status.unlimited_until.isoformat()}."
        return dataclasses.replace(draft, basis=basis)
    found: list[tuple[datetime, str]] = []
    if status.effective_cost_limit is not None:
        remaining = counters.limit_units(status.effective_cost_limit)
        remaining -= counters.to_units(status.cost_spent) + counters.to_units(status.cost_reserved)
        at = _reached(remaining, cost_units, seconds, now, end)
        if at is not None:
            found.append((at, "cost"))
    if status.effective_token_limit is not None:
        remaining = status.effective_token_limit - status.tokens_spent - status.tokens_reserved
        at = _reached(remaining, tokens, seconds, now, end)
        if at is not None:
            found.append((at, "tokens"))
    if not found:
        if not cost_units and not tokens:
            basis = f"{rate}: nothing is spent, so the limit is not reached."
        elif status.period_end is None:
            basis = f"{rate}: the limit is not reached before {LIFETIME_END:%Y}."
        else:
            basis = f"{rate}: the limit is not reached before the period ends ({end.isoformat()})."
        return dataclasses.replace(draft, basis=basis)
    at, metric = min(found)
    verb = "was already reached" if at == now else f"is reached at {at.isoformat()}"
    basis = f"{rate}: the {metric} limit {verb}."
    return dataclasses.replace(
        draft, exhausts_at=at, exhausts_by=metric, exhausts_in_period=True, basis=basis
    )


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    budget_id: int
    name: str
    enforcement: str
    period: str
    period_start: datetime
    period_end: datetime | None
    cost_limit: Decimal | None
    token_limit: int | None
    effective_cost_limit: Decimal | None
    effective_token_limit: int | None
    unlimited_until: datetime | None
    cost_spent: Decimal
    cost_reserved: Decimal
    cost_remaining: Decimal | None
    cost_percent: Decimal | None
    tokens_spent: int
    tokens_reserved: int
    tokens_remaining: int | None
    tokens_percent: Decimal | None
    projected_cost: Decimal | None
    projected_tokens: int | None
    burn: Burn | None = None  # with budget_status(burn=True)

    def as_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        def pct(value: Decimal | None) -> str | None:
            return None if value is None else f"{value:.2f}"

        return {
            "budget_id": self.budget_id,
            "name": self.name,
            "enforcement": self.enforcement,
            "period": self.period,
            "period_start": iso(self.period_start),
            "period_end": iso(self.period_end),
            "currency": "USD",
            "cost_limit": money(self.cost_limit) if self.cost_limit is not None else None,
            "token_limit": self.token_limit,
            "effective_cost_limit": (
                money(self.effective_cost_limit) if self.effective_cost_limit is not None else None
            ),
            "effective_token_limit": self.effective_token_limit,
            "unlimited_until": iso(self.unlimited_until),
            "cost_spent": money(self.cost_spent),
            "cost_reserved": money(self.cost_reserved),
            "cost_remaining": (
                money(self.cost_remaining) if self.cost_remaining is not None else None
            ),
            "cost_percent": pct(self.cost_percent),
            "tokens_spent": self.tokens_spent,
            "tokens_reserved": self.tokens_reserved,
            "tokens_remaining": self.tokens_remaining,
            "tokens_percent": pct(self.tokens_percent),
            "projected_cost": money(self.projected_cost)
            if self.projected_cost is not None
            else None,
            "projected_tokens": self.projected_tokens,
            **(self.burn.as_dict() if self.burn is not None else _NO_BURN),
        }


# as_dict's burn fields when the status was read without them (budget_status(burn=False)).
_NO_BURN: dict[str, Any] = {
    "burn_window": None,
    "burn_rate": None,
    "exhausts_at": None,
    "exhausts_in_period": False,
    "exhausts_by": None,
    "exhaustion_basis": "Not computed.",
}


def budget_status(
    budget: Budget, *, now: datetime | None = None, burn: bool = False
) -> BudgetStatus:
    """Live status for the period containing `now`. Percent is of the effective limit; remaining
    subtracts spent and reserved; the projection extends the period's spend rate to its end.
    With `burn`, also the burn rate and exhaustion date (budget_burn: one rollups query at
    most); the alert evaluation and the reports, reading every budget, go without."""
    now = now or timezone.now()
    window = budget.window_at(now)
    limits = effective_limits(budget, now=now)
    totals = current_totals(budget, window, now=now)
    cost_spent, tokens_spent = totals.cost, totals.tokens
    lifetime = budget.period == Budget.Period.LIFETIME
    projected_cost: Decimal | None = None
    projected_tokens: int | None = None
    if not lifetime:
        elapsed = (now - window.start).total_seconds()
        length = (window.end - window.start).total_seconds()
        if elapsed > 0:
            factor = Decimal(length) / Decimal(elapsed)
            projected_cost = (cost_spent * factor).quantize(Decimal("0.000001"))
            projected_tokens = int(tokens_spent * length / elapsed)
    status = BudgetStatus(
        budget_id=budget.pk,
        name=budget.name,
        enforcement=budget.enforcement,
        period=budget.period,
        period_start=window.start,
        period_end=None if lifetime else window.end,
        cost_limit=budget.cost_limit,
        token_limit=budget.token_limit,
        effective_cost_limit=limits.cost,
        effective_token_limit=limits.tokens,
        unlimited_until=limits.unlimited_until,
        cost_spent=cost_spent,
        cost_reserved=totals.held_cost,
        cost_remaining=(
            None if limits.cost is None else limits.cost - cost_spent - totals.held_cost
        ),
        cost_percent=percent(cost_spent, limits.cost),
        tokens_spent=tokens_spent,
        tokens_reserved=totals.held_tokens,
        tokens_remaining=(
            None if limits.tokens is None else limits.tokens - tokens_spent - totals.held_tokens
        ),
        tokens_percent=percent(
            Decimal(tokens_spent), None if limits.tokens is None else Decimal(limits.tokens)
        ),
        projected_cost=projected_cost,
        projected_tokens=projected_tokens,
    )
    if burn:
        status = dataclasses.replace(status, burn=budget_burn(budget, status, now=now))
    return status


# --- alerts --------------------------------------------------------------------------------------


def alerts_for_principal(principal: Principal) -> QuerySet[BudgetAlert]:
    """The alerts of the budgets the caller may see (`budgets_for_principal`'s rule)."""
    visible = budgets_for_principal(principal).values("pk")
    return BudgetAlert.objects.filter(budget__in=visible).select_related("budget")


def alert_list(
    *,
    principal: Principal,
    budget_id: int | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[list[BudgetAlert], str | None]:
    """Newest first, keyset-paginated on the id: (alerts, next cursor or None). Another scope's
    budget answers 404 like an unknown one."""
    rows = alerts_for_principal(principal)
    if budget_id is not None:
        rows = rows.filter(budget=budget_for_principal(principal, budget_id))
    if kind:
        rows = rows.filter(kind=kind)
    if since is not None:
        rows = rows.filter(created_at__gte=since if since.tzinfo else since.replace(tzinfo=UTC))
    if cursor:
        rows = rows.filter(pk__lt=int(cursor))
    page = list(rows.order_by("-pk")[: limit + 1])
    next_cursor = str(page[limit - 1].pk) if len(page) > limit else None
    return page[:limit], next_cursor


# --- agent profiles ------------------------------------------------------------------------------


def agent_profiles_for_principal(principal: Principal) -> QuerySet[AgentProfile]:
    """Every profile: profiles are organisation-wide (the guard applies one by agent name to any
    caller), so every key may read them; writing them needs a global key or staff (actions)."""
    return AgentProfile.objects.all()


def get_agent_profile_for_principal(principal: Principal, profile_id: Any) -> AgentProfile:
    try:
        return agent_profiles_for_principal(principal).get(pk=int(profile_id))
    except (AgentProfile.DoesNotExist, TypeError, ValueError, OverflowError):
        raise ApiError(
            "Agent profile not found.",
            fields={"profile_id": ["No such agent profile."]},
            status_code=404,
        ) from None
