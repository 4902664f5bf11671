"""REST views of the budgets app: parse, run the named action, respond."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from drf_spectacular.utils import OpenApiParameter, extend_schema
from pydantic import BaseModel, Field
from rest_framework.request import Request
from rest_framework.response import Response

from budgets.schemas import BudgetCheckIn, BudgetIn, BudgetPatchIn, ReservationCancelIn
from usage.apis import ActionView, Money, _query, with_url_id

# --- response bodies (STYLE 6b) ------------------------------------------------------------------

Percent = Annotated[str, Field(description="A percentage with two decimals.")]
Instant = Annotated[str, Field(description="ISO 8601 date-time.")]


class BudgetOut(BaseModel):
    id: int
    name: str
    scope: str
    scope_id: str
    team_id: str
    project_id: str
    period: str
    timezone: str
    cost_limit: Money | None
    token_limit: int | None
    currency: str
    enforcement: str
    thresholds: list[Percent]
    is_active: bool
    created_at: Instant
    updated_at: Instant


class BudgetListOut(BaseModel):
    results: list[BudgetOut]


class BudgetStatusOut(BaseModel):
    """Limits count approved overrides (`effective_*`); remaining subtracts spent and held."""

    budget_id: int
    name: str
    enforcement: str
    period: str
    period_start: Instant | None
    period_end: Instant | None
    currency: str
    cost_limit: Money | None
    token_limit: int | None
    effective_cost_limit: Money | None
    effective_token_limit: int | None
    unlimited_until: Instant | None
    cost_spent: Money
    cost_reserved: Money
    cost_remaining: Money | None
    cost_percent: Percent | None
    tokens_spent: int
    tokens_reserved: int
    tokens_remaining: int | None
    tokens_percent: Percent | None
    projected_cost: Money | None
    projected_tokens: int | None


class BudgetCheckOut(BaseModel):
    allowed: bool
    estimated_cost: Money
    estimated_tokens: int
    input_tokens: int
    input_tokens_estimated: bool
    currency: str
    blocking_budget: dict[str, Any] | None = Field(description="The budget that denies it.")
    warnings: list[dict[str, Any]]
    budgets: list[dict[str, Any]] = Field(description="Every applicable budget's view.")
    reservation_id: str | None = Field(None, description="With reserve=true and allowed.")
    reservation_expires_at: Instant | None = None


class ReservationCancelOut(BaseModel):
    reservation_id: str
    status_before: str


class BudgetListApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "list_budgets", "post": "create_budget"}

    @extend_schema(
        parameters=[OpenApiParameter("active", bool)],
        responses={200: BudgetListOut},
        summary="Budgets",
        operation_id="v1_budgets_list",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", _query(request))

    @extend_schema(request=BudgetIn, responses={201: BudgetOut}, summary="Create a budget")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class BudgetDetailApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "get_budget",
        "patch": "update_budget",
        "delete": "delete_budget",
    }

    @extend_schema(responses={200: BudgetOut}, summary="One budget")
    def get(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "get", {"budget_id": budget_id})

    @extend_schema(request=BudgetPatchIn, responses={200: BudgetOut}, summary="Change a budget")
    def patch(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "patch", with_url_id(self._body(request), "budget_id", budget_id))

    @extend_schema(responses={200: BudgetOut}, summary="Deactivate a budget (history is kept)")
    def delete(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "delete", {"budget_id": budget_id})


class BudgetStatusApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_budget_status"}

    @extend_schema(responses={200: BudgetStatusOut}, summary="Budget status for the current period")
    def get(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "get", {"budget_id": budget_id})


class BudgetCheckApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "check_budget"}
    fast_post = True

    @extend_schema(
        request=BudgetCheckIn, responses={200: BudgetCheckOut}, summary="Pre-flight check"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class ReservationCancelApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "cancel_reservation"}

    @extend_schema(
        request=ReservationCancelIn, responses={200: ReservationCancelOut}, summary="Free a hold"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))
