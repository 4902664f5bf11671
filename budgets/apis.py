"""REST views of the budgets app: parse, run the named action, respond."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from drf_spectacular.utils import OpenApiParameter, extend_schema
from pydantic import BaseModel, Field
from rest_framework.request import Request
from rest_framework.response import Response

from budgets.schemas import (
    MAX_ALERT_PAGE,
    AgentProfileIn,
    AgentProfilePatchIn,
    AlertKind,
    BudgetCheckIn,
    BudgetIn,
    BudgetPatchIn,
    ReservationCancelIn,
)
from tokenmgr_project.core.api import ActionView, Money, query_params, with_url_id

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


class BurnWindowOut(BaseModel):
    start: Instant
    end: Instant
    days: str = Field(description="The window's length in days (two decimals at most).")
    whole_period: bool = Field(description="The window is the period so far (under 7 days).")
    label: str = Field(description='How the rate is named, e.g. "the last 7 days\' rate".')


class BurnRateOut(BaseModel):
    cost_per_day: Money
    tokens_per_day: int


class BudgetStatusOut(BaseModel):
    """Limits count approved overrides (`effective_*`); remaining subtracts spent and held.
    The burn rate is the spend over `burn_window` (the last 7 days, or the period so far if it
    began less than 7 days ago) per day; `exhausts_at` is when the effective cost or token limit
    (the earlier) is reached at it: null when it is not reached before the period ends
    (`exhausts_in_period` false), the budget is unlimited by an override, or nothing is spent."""

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
    burn_window: BurnWindowOut | None
    burn_rate: BurnRateOut | None
    exhausts_at: Instant | None
    exhausts_in_period: bool
    exhausts_by: Literal["cost", "tokens"] | None = Field(description="The limit reached first.")
    exhaustion_basis: str = Field(description="The window, the rates and the conclusion.")


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


class AlertOut(BaseModel):
    id: int
    budget_id: int
    budget_name: str
    team_id: str
    project_id: str
    kind: AlertKind
    metric: Literal["cost", "tokens"]
    period_start: Instant
    threshold: Percent = Field(description="The threshold crossed (100 for exhausted, else 0).")
    spent: str = Field(description="Spent in the period: USD for cost alerts, else tokens.")
    limit: str | None = Field(description="The effective limit, in the same unit as spent.")
    percent: Percent | None
    message: str
    created_at: Instant


class AlertListOut(BaseModel):
    results: list[AlertOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page.")


class AgentProfileOut(BaseModel):
    id: int
    name: str
    model: str
    token_budget: int
    warning_threshold: int | None = Field(description="null: 80 % of token_budget.")
    created_at: Instant
    updated_at: Instant


class AgentProfileListOut(BaseModel):
    results: list[AgentProfileOut]


class BudgetListApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "list_budgets", "post": "create_budget"}

    @extend_schema(
        parameters=[OpenApiParameter("active", bool)],
        responses={200: BudgetListOut},
        summary="Budgets",
        operation_id="v1_budgets_list",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))

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


# Query values are refused with control characters (core.api.query_params).
NO_CONTROL_CHARS = "^[^\\x00-\\x1f\\x7f]*$"
_ALERT_FILTERS = [
    OpenApiParameter(
        "budget_id",
        {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
        description="Only this budget's.",
    ),
    OpenApiParameter("kind", str, enum=list(get_args(AlertKind))),
    OpenApiParameter(
        "since",
        {"type": "string", "format": "date-time", "maxLength": 64},
        description="Created at or after (inclusive). UTC offset within ±15:59.",
    ),
    OpenApiParameter(
        "cursor",
        {"type": "string", "pattern": "^[0-9]{1,19}$"},
        description="`next_cursor` of the previous page.",
    ),
    OpenApiParameter(
        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_ALERT_PAGE, "default": 100}
    ),
]


class AlertListApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "list_alerts"}

    @extend_schema(
        parameters=_ALERT_FILTERS, responses={200: AlertListOut}, summary="Budget alerts"
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class AgentProfileListApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "list_agent_profiles",
        "post": "create_agent_profile",
    }

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "name",
                {"type": "string", "minLength": 1, "maxLength": 128, "pattern": NO_CONTROL_CHARS},
                description="Only the profile of this agent.",
            )
        ],
        responses={200: AgentProfileListOut},
        summary="Agent profiles",
        operation_id="v1_agent_profiles_list",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))

    @extend_schema(
        request=AgentProfileIn, responses={201: AgentProfileOut}, summary="Create an agent profile"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class AgentProfileDetailApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "get_agent_profile",
        "patch": "update_agent_profile",
        "delete": "delete_agent_profile",
    }

    @extend_schema(responses={200: AgentProfileOut}, summary="One agent profile")
    def get(self, request: Request, profile_id: int) -> Response:
        return self._run(request, "get", {"profile_id": profile_id})

    @extend_schema(
        request=AgentProfilePatchIn,
        responses={200: AgentProfileOut},
        summary="Change an agent profile",
    )
    def patch(self, request: Request, profile_id: int) -> Response:
        body = with_url_id(self._body(request), "profile_id", profile_id)
        return self._run(request, "patch", body)

    @extend_schema(
        responses={200: AgentProfileOut}, summary="Delete an agent profile (answers it as it was)"
    )
    def delete(self, request: Request, profile_id: int) -> Response:
        return self._run(request, "delete", {"profile_id": profile_id})
