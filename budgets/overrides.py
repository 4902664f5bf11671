"""Budget overrides: a request to raise a budget's limit, and a person's decision on it.

Everything about overrides lives here, in the usual layers: input schemas, services (writes),
selectors (reads), the registered actions (REST and `/signals`) and the thin DRF views. The
rules are checked in the services, so the API, the signals and the admin share one copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from pydantic import BaseModel, Field
from rest_framework.request import Request
from rest_framework.response import Response

from budgets import signals
from budgets.models import Budget, BudgetOverride
from budgets.selectors import budget_for_principal
from budgets.services import budget_limits_changed
from tokenmgr_project.core.actions import Outcome, action, validate
from tokenmgr_project.core.api import ActionView, Money, query_params, with_url_id
from tokenmgr_project.core.errors import ApiError, FieldErrors, validation_error
from tokenmgr_project.core.principal import Principal
from usage import pricing
from usage.models import ApiKey
from usage.schemas import Instant, Strict

APPROVE_PERMISSION = "budgets.approve_budgetoverride"
MAX_EXTRA_TOKENS = 10**15
MAX_REASON = 2000
# The API's history of one budget's overrides is the newest this many; the admin shows all.
HISTORY_LIMIT = 100


# --- input ---------------------------------------------------------------------------------------

Reason = Annotated[str, Field(strict=True, max_length=MAX_REASON)]


class OverrideRequestIn(Strict):
    """`expires_at` must be in the future. Also required: `extra_cost` and/or `extra_tokens`, or
    `"unlimited": true`."""

    budget_id: Annotated[int, Field(strict=True)]
    extra_cost: Annotated[Decimal, Field(gt=0, max_digits=20, decimal_places=6)] | None = None
    extra_tokens: Annotated[int, Field(strict=True, gt=0, le=MAX_EXTRA_TOKENS)] | None = None
    unlimited: Annotated[bool, Field(strict=True)] = False
    reason: Reason
    expires_at: Instant


class OverrideDecisionIn(Strict):
    override_id: Annotated[int, Field(strict=True)]
    reason: Reason


class OverrideListIn(Strict):
    budget_id: Annotated[int, Field(strict=True)]
    status: Literal["pending", "approved", "rejected", "expired"] | None = None


# --- services ------------------------------------------------------------------------------------


def override_request_errors(
    *,
    budget: Budget,
    extra_cost: Decimal | None,
    extra_tokens: int | None,
    unlimited: bool,
    reason: str,
    expires_at: datetime,
    now: datetime,
) -> FieldErrors:
    """Field errors of an override request (the admin's add form shows the same ones)."""
    errors: FieldErrors = {}
    if not budget.is_active:
        errors["budget_id"] = ["This budget is inactive; it needs no override."]
    if unlimited and (extra_cost is not None or extra_tokens is not None):
        errors["unlimited"] = ["Give extra amounts or unlimited, not both."]
    elif not unlimited and extra_cost is None and extra_tokens is None:
        errors["extra_cost"] = ["Give extra_cost and/or extra_tokens, or unlimited: true."]
    if extra_cost is not None and extra_cost <= 0:
        errors["extra_cost"] = ["Must be greater than 0."]
    if extra_tokens is not None and extra_tokens <= 0:
        errors["extra_tokens"] = ["Must be greater than 0."]
    if not reason.strip():
        errors["reason"] = ["Say why the budget needs raising; approvers decide on it."]
    if expires_at <= now:
        errors["expires_at"] = ["Is in the past; an override must expire in the future."]
    return errors


def override_request(
    *,
    budget: Budget,
    extra_cost: Decimal | None,
    extra_tokens: int | None,
    unlimited: bool,
    reason: str,
    expires_at: datetime,
    principal: Principal,
) -> BudgetOverride:
    """Record a pending override. It changes no limit until someone else approves it."""
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    errors = override_request_errors(
        budget=budget,
        extra_cost=extra_cost,
        extra_tokens=extra_tokens,
        unlimited=unlimited,
        reason=reason,
        expires_at=expires_at,
        now=timezone.now(),
    )
    if errors:
        raise validation_error(errors, "Invalid override request.")
    override = BudgetOverride.objects.create(
        budget=budget,
        extra_cost=extra_cost,
        extra_tokens=extra_tokens,
        unlimited=unlimited,
        reason=reason.strip(),
        expires_at=expires_at,
        requested_by_user_id=principal.user_id,
        requested_by_key_id=principal.key_id,
    )
    transaction.on_commit(partial(_announce, override, "requested"))
    return override


def _announce(override: BudgetOverride, change: str) -> None:
    signals.override_changed.send(sender=BudgetOverride, override=override, change=change)


def override_approve(*, override_id: int, user: User, reason: str) -> BudgetOverride:
    """Approve a pending, unexpired override; the budget's effective limit rises on commit."""
    return _override_decide(
        override_id=override_id, user=user, reason=reason, status=BudgetOverride.Status.APPROVED
    )


def override_reject(*, override_id: int, user: User, reason: str) -> BudgetOverride:
    return _override_decide(
        override_id=override_id, user=user, reason=reason, status=BudgetOverride.Status.REJECTED
    )


def user_may_decide(user: Any) -> bool:
    return bool(user is not None and user.is_active and user.has_perm(APPROVE_PERMISSION))


def user_requested(override: BudgetOverride, user: Any) -> bool:
    """The user asked for it, in person or through an API key they created."""
    if override.requested_by_user_id is not None:
        return bool(override.requested_by_user_id == user.pk)
    if override.requested_by_key_id is not None:
        creator = (
            ApiKey.objects.filter(pk=override.requested_by_key_id)
            .values_list("created_by_id", flat=True)
            .first()
        )
        return creator is not None and creator == user.pk
    return False


def _override_decide(
    *, override_id: int, user: User, reason: str, status: BudgetOverride.Status
) -> BudgetOverride:
    if not user_may_decide(user):
        raise ApiError(
            f"Deciding overrides needs the {APPROVE_PERMISSION} permission.",
            status_code=403,
            code="permission_denied",
        )
    if not reason.strip():
        raise validation_error(
            {"reason": ["Say why; every decision is audited and shown on the budget."]}
        )
    with transaction.atomic():
        # The row lock makes two approvers deciding at once queue up: the second sees the first's
        # decision and gets a conflict instead of overwriting it.
        override = BudgetOverride.objects.select_for_update().filter(pk=override_id).first()
        if override is None:
            raise ApiError(
                f"Override {override_id} does not exist.",
                status_code=404,
                code="not_found",
                fields={"override_id": ["No such override."]},
            )
        if user_requested(override, user):
            raise ApiError(
                "You requested this override (or created the API key that did); "
                "another approver must decide it.",
                status_code=403,
                code="permission_denied",
                fields={"override_id": ["The requester may not decide their own override."]},
            )
        now = timezone.now()
        if override.status != BudgetOverride.Status.PENDING:
            raise ApiError(
                f"Override {override_id} is already {override.status}.",
                status_code=409,
                code="conflict",
                fields={"override_id": [f"Already {override.status}; only pending ones."]},
            )
        if override.expires_at <= now:
            raise ApiError(
                f"Override {override_id} expired at {override.expires_at:%Y-%m-%d %H:%M} UTC.",
                status_code=409,
                code="conflict",
                fields={"override_id": ["The request has expired; ask for a new override."]},
            )
        override.status = status
        override.decided_by = user
        override.decided_at = now
        override.decision_reason = reason.strip()
        override.save(update_fields=["status", "decided_by", "decided_at", "decision_reason"])
        if status == BudgetOverride.Status.APPROVED:
            transaction.on_commit(partial(budget_limits_changed, override.budget_id))
        transaction.on_commit(partial(_announce, override, str(status)))
    return override


def overrides_expire(*, now: datetime | None = None) -> int:
    """Mark approved and pending overrides past their expiry as expired; returns how many.

    Idempotent. Limit checks already ignore an approved override past its expiry; this makes the
    status say so and drops the limit caches that may still hold the raised limit.
    """
    now = now or timezone.now()
    with transaction.atomic():
        due = list(
            BudgetOverride.objects.select_for_update(skip_locked=True)
            .filter(
                status__in=[BudgetOverride.Status.APPROVED, BudgetOverride.Status.PENDING],
                expires_at__lte=now,
            )
            .values_list("pk", "budget_id", "status")
        )
        BudgetOverride.objects.filter(pk__in=[pk for pk, _, _ in due]).update(
            status=BudgetOverride.Status.EXPIRED
        )
        # A pending one never raised a limit, so only approved ones change what is allowed.
        for budget_id in sorted({b for _, b, s in due if s == BudgetOverride.Status.APPROVED}):
            transaction.on_commit(partial(budget_limits_changed, budget_id))
    return len(due)


# --- selectors -----------------------------------------------------------------------------------


def overrides_for_budget(budget: Budget, *, status: str | None = None) -> QuerySet[BudgetOverride]:
    rows = budget.overrides.select_related("budget", "requested_by_user", "decided_by")
    if status:
        rows = rows.filter(status=status)
    return rows.order_by("-requested_at", "-pk")


def override_out(row: BudgetOverride) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": row.pk,
        "budget_id": row.budget_id,
        "status": row.status,
        "extra_cost": None if row.extra_cost is None else pricing.money(row.extra_cost),
        "extra_tokens": row.extra_tokens,
        "unlimited": row.unlimited,
        "amount": row.amount_label,
        "reason": row.reason,
        "expires_at": when(row.expires_at),
        "requested_at": when(row.requested_at),
        "requested_by": {
            "user": row.requested_by_user.get_username() if row.requested_by_user else None,
            "api_key_id": row.requested_by_key_id,
        },
        "decided_by": row.decided_by.get_username() if row.decided_by else None,
        "decided_at": when(row.decided_at),
        "decision_reason": row.decision_reason,
    }


# --- actions (REST views and /signals) -----------------------------------------------------------


def _deciding_user(principal: Principal) -> User:
    user = None
    if principal.user_id is not None:
        user = get_user_model().objects.filter(pk=principal.user_id, is_active=True).first()
    if user is None:
        raise ApiError(
            "Only a person can approve or reject an override: sign in as a staff user holding "
            f"the {APPROVE_PERMISSION} permission. API keys cannot decide overrides.",
            status_code=403,
            code="permission_denied",
        )
    return user


@action(
    "request_override",
    "Ask for a budget's limit to be raised until a time (needs approval).",
    staff_perm="budgets.add_budgetoverride",
)
def request_override(principal: Principal, data: Any) -> Outcome:
    params = validate(OverrideRequestIn, data)
    budget = budget_for_principal(principal, params.budget_id)
    row = override_request(
        budget=budget,
        extra_cost=params.extra_cost,
        extra_tokens=params.extra_tokens,
        unlimited=params.unlimited,
        reason=params.reason,
        expires_at=params.expires_at,
        principal=principal,
    )
    return Outcome(override_out(row), status=201)


@action(
    "approve_override",
    f"Approve a pending override (staff holding {APPROVE_PERMISSION}).",
    staff_perm=APPROVE_PERMISSION,
)
def approve_override(principal: Principal, data: Any) -> Outcome:
    user = _deciding_user(principal)
    params = validate(OverrideDecisionIn, data)
    row = override_approve(override_id=params.override_id, user=user, reason=params.reason)
    return Outcome(override_out(row))


@action(
    "reject_override",
    f"Reject a pending override (staff holding {APPROVE_PERMISSION}).",
    staff_perm=APPROVE_PERMISSION,
)
def reject_override(principal: Principal, data: Any) -> Outcome:
    user = _deciding_user(principal)
    params = validate(OverrideDecisionIn, data)
    row = override_reject(override_id=params.override_id, user=user, reason=params.reason)
    return Outcome(override_out(row))


@action(
    "list_overrides",
    "One budget's overrides, newest first: requests and decisions.",
    staff_perm="budgets.view_budgetoverride",
)
def list_overrides(principal: Principal, data: Any) -> Outcome:
    params = validate(OverrideListIn, data)
    budget = budget_for_principal(principal, params.budget_id)
    rows = overrides_for_budget(budget, status=params.status)[:HISTORY_LIMIT]
    return Outcome({"budget_id": budget.pk, "results": [override_out(r) for r in rows]})


# --- DRF views -----------------------------------------------------------------------------------


class OverrideRequesterOut(BaseModel):
    user: str | None = Field(description="The staff user who asked (None: an API key did).")
    api_key_id: int | None


class OverrideOut(BaseModel):
    id: int
    budget_id: int
    status: Literal["pending", "approved", "rejected", "expired"]
    extra_cost: Money | None
    extra_tokens: int | None
    unlimited: bool
    amount: str = Field(description="What the override grants, as text.")
    reason: str
    expires_at: str | None
    requested_at: str | None
    requested_by: OverrideRequesterOut
    decided_by: str | None
    decided_at: str | None
    decision_reason: str


class OverrideListOut(BaseModel):
    budget_id: int
    results: list[OverrideOut]


class BudgetOverridesApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "list_overrides",
        "post": "request_override",
    }

    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=[s.value for s in BudgetOverride.Status])],
        responses={200: OverrideListOut},
        summary="A budget's overrides (history)",
    )
    def get(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "get", {**query_params(request), "budget_id": budget_id})

    @extend_schema(
        request=OverrideRequestIn, responses={201: OverrideOut}, summary="Request an override"
    )
    def post(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "post", with_url_id(self._body(request), "budget_id", budget_id))


class OverrideApproveApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "approve_override"}

    @extend_schema(
        request=OverrideDecisionIn, responses={200: OverrideOut}, summary="Approve override"
    )
    def post(self, request: Request, override_id: int) -> Response:
        body = with_url_id(self._body(request), "override_id", override_id)
        return self._run(request, "post", body)


class OverrideRejectApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "reject_override"}

    @extend_schema(
        request=OverrideDecisionIn, responses={200: OverrideOut}, summary="Reject override"
    )
    def post(self, request: Request, override_id: int) -> Response:
        body = with_url_id(self._body(request), "override_id", override_id)
        return self._run(request, "post", body)
