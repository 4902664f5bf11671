from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from pydantic import BaseModel, ConfigDict, Field
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from budgets.apis import BurnRateOut, BurnWindowOut
from reporting import formats, reconcile, reports
from reporting.actions import StatusBatchIn, StatusIn
from reporting.anomalies import AnomaliesIn
from reporting.forecasts import ForecastIn
from reporting.recommendations import DecisionIn, RecommendationsIn
from reporting.trends import TrendsIn
from tokenmgr_project.core import actions
from tokenmgr_project.core.api import (
    ActionView,
    Money,
    query_parameters,
    query_params,
    query_text,
    with_url_id,
)
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.parsers import JsonParser
from tokenmgr_project.core.principal import principal_for


class StatusQueuedOut(BaseModel):
    queued: bool


class StatusApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "publish_status"}
    fast_post = True  # agents publish many status messages a second

    @extend_schema(
        request=StatusIn, responses={202: StatusQueuedOut}, summary="Publish a live status message"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class StatusBatchQueuedOut(BaseModel):
    queued: int


class StatusBatchApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "publish_status_batch"}
    fast_post = True

    @extend_schema(
        request=StatusBatchIn,
        responses={202: StatusBatchQueuedOut},
        summary="Publish up to 500 live status messages (all or none)",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


# --- reports -------------------------------------------------------------------------------------


class TopRowOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # the dimension's own column, e.g. "team_id"
    cost: Money
    share_of_cost: str | None
    requests: int
    total_tokens: int


class ReportOut(BaseModel):
    """A report: the main table (`columns` + `rows`, what CSV holds) and its sections."""

    model_config = ConfigDict(extra="allow")  # each report's own sections (budgets, series, …)
    report: Literal["usage", "cost", "optimization"]
    since: str
    until: str
    tz: str
    interval: str | None
    group_by: list[str]
    filters: dict[str, str]
    currency: str
    source: Literal["rollups", "rollups+ledger", "ledger"] = Field(
        description="What answered: hourly rollups, the raw ledger, or both."
    )
    totals: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]]
    truncated: bool
    top_consumers: dict[str, list[TopRowOut]] | None = None


def _dims(name: str, text: str) -> OpenApiParameter:
    return OpenApiParameter(name, str, description=text)


REPORT_PARAMETERS = [
    OpenApiParameter("format", str, enum=list(formats.FORMATS), default="json"),
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="Default: 30 days before until."),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="Default: now."),
    OpenApiParameter("tz", str, description="IANA time zone of days, weeks and months."),
    OpenApiParameter("interval", str, enum=["hour", "day", "week", "month"]),
    _dims("group_by", f"Comma-separated: {', '.join(reports.DIMENSIONS)}."),
    _dims("top_by", "Dimensions of the top-consumers tables (usage)."),
    OpenApiParameter("top", int, description=f"Rows per top table, 1..{reports.MAX_TOP}."),
    *(OpenApiParameter(d, str) for d in reports.DIMENSIONS),
]


class ReportApi(ActionView):
    """GET /reports/{usage|cost|optimization}?format=json|csv|md; CSV and Markdown stream."""

    actions_by_method: ClassVar[dict[str, str]] = {"get": "generate_report"}

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, location=OpenApiParameter.PATH, enum=list(reports.KINDS)),
            *REPORT_PARAMETERS,
        ],
        responses={
            (200, "application/json"): ReportOut,
            (200, "text/csv"): OpenApiResponse(
                response=OpenApiTypes.STR, description="The main table: a header, a row a group."
            ),
            (200, "text/markdown"): OpenApiResponse(
                response=OpenApiTypes.STR, description="Every section as a Markdown table."
            ),
        },
        summary="A usage, cost or optimization report",
    )
    def get(self, request: Request, kind: str) -> Response | StreamingHttpResponse:
        fmt = query_text("format", request.query_params.get("format", "json"))
        if fmt not in formats.FORMATS:
            raise ApiError(
                "Unknown format.", fields={"format": [f"Use one of {', '.join(formats.FORMATS)}."]}
            )
        if kind not in reports.KINDS:
            raise ApiError(
                "Unknown report.",
                fields={"kind": [f"Use one of {', '.join(reports.KINDS)}."]},
                status_code=404,
            )
        outcome = actions.run(f"get_{kind}_report", principal_for(request), query_params(request))
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type
        if fmt == "json":
            return Response(outcome.body, status=outcome.status)
        render = formats.report_csv if fmt == "csv" else formats.report_markdown
        response = StreamingHttpResponse(
            render(outcome.body), content_type=formats.CONTENT_TYPES[fmt]
        )
        stamp = outcome.body["since"][:10] + "_" + outcome.body["until"][:10]
        response["Content-Disposition"] = f'attachment; filename="{kind}-report-{stamp}.{fmt}"'
        return response

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # ?format= names the body the report makes (json, csv, md); never a DRF renderer.
        return JSONRenderer(), JSONRenderer.media_type


# --- analytics: trends and anomalies ---


class TrendRowOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # the dimension's own column, e.g. "team_id"
    current: str | int
    previous: str | int
    change: str | int
    change_pct: str | None
    state: Literal["new", "gone", "both"]


class TrendSectionOut(BaseModel):
    series: int
    growers: list[TrendRowOut]
    decliners: list[TrendRowOut]
    fastest_growing_pct: list[TrendRowOut]
    fastest_declining_pct: list[TrendRowOut]
    new: int
    gone: int


class TrendsOut(BaseModel):
    metric: Literal["cost", "tokens", "requests"]
    since: str
    until: str
    previous_since: str
    previous_until: str
    filters: dict[str, str]
    currency: str
    source: str
    truncated: bool
    totals: dict[str, Any]
    dimensions: dict[str, TrendSectionOut]


class DriverOut(BaseModel):
    dimension: str
    value: str
    actual: str | int
    expected: str | int
    excess: str | int
    share_of_excess: str | None


class AnomalyOut(BaseModel):
    id: int | None = Field(description="The stored anomaly (beat job), if recorded.")
    dimension: str
    series: str
    team_id: str
    project_id: str
    granularity: Literal["hour", "day"]
    metric: Literal["cost", "tokens"]
    bucket: str
    value: str | int
    expected: str | int
    expected_range: list[str | int]
    score: str
    direction: Literal["up", "down"]
    method: str
    drivers: list[DriverOut] | None
    status: Literal["open", "resolved"] | None
    alerted_at: str | None
    resolved_at: str | None


class AnomaliesOut(BaseModel):
    dimension: str
    metric: str
    granularity: str
    since: str
    until: str
    threshold: float
    filters: dict[str, str]
    method: str
    series_evaluated: int
    insufficient_history: list[dict[str, Any]]
    truncated: bool
    source: str
    anomalies: list[AnomalyOut]


class TrendsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_trends"}

    @extend_schema(
        parameters=query_parameters(TrendsIn),
        responses={200: TrendsOut},
        summary="Period-over-period growth, fastest growers and decliners",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class AnomaliesApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_anomalies"}

    @extend_schema(
        parameters=query_parameters(AnomaliesIn),
        responses={200: AnomaliesOut},
        summary="Anomalous hours or days per series, with expected range and drivers",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


# --- analytics: forecasts ---


class ProjectionOut(BaseModel):
    cost: Money = Field(description="The point forecast (what is spent already included).")
    low: Money = Field(description="The 80 % prediction interval's lower end.")
    high: Money = Field(description="Its upper end.")


class HistoryNeedOut(BaseModel):
    have_days: int = Field(description="Complete days of usage history in the window.")
    need_days: int = Field(description="What the method needs.")


class ForecastSeriesOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # the dimension's own column, e.g. "team_id"
    month_to_date: Money
    projected_month_end: ProjectionOut | None
    projected_until: ProjectionOut | None = Field(description="Spend from now to `until`.")
    expected_today: Money | None = Field(description="The whole of today's forecast spend.")
    weekday_factors: bool
    history_days: int
    insufficient_history: HistoryNeedOut | None


class ForecastBudgetOut(BaseModel):
    budget_id: int
    name: str
    scope: str
    scope_id: str
    team_id: str
    project_id: str
    period: str
    timezone: str
    period_start: str
    period_end: str | None
    cost_limit: Money | None = Field(description="The effective limit (approved overrides).")
    token_limit: int | None
    cost_spent: Money
    tokens_spent: int
    month_end: str
    projected_period_end: ProjectionOut | None
    projected_month_end: ProjectionOut | None
    weekday_factors: bool
    history_days: int
    insufficient_history: HistoryNeedOut | None
    burn_window: BurnWindowOut
    burn_rate: BurnRateOut
    exhausts_at: str | None
    exhausts_in_period: bool
    exhausts_by: Literal["cost", "tokens"] | None
    exhaustion_basis: str


class ForecastMethodOut(BaseModel):
    name: str
    min_history_days: int
    weekday_factors_from_days: int
    level_days: int
    interval: str
    description: str


class ForecastOut(BaseModel):
    """Per series of the dimension and per visible budget: spent so far, the projections with
    their 80 % interval, and for budgets the exhaustion date at the stated burn rate."""

    as_of: str
    currency: str
    dimension: str
    window: int
    tz: str
    month_start: str
    month_end: str
    until: str | None
    method: ForecastMethodOut
    source: Literal["rollups", "rollups+ledger", "ledger"]
    series: list[ForecastSeriesOut]
    truncated: bool
    budgets: list[ForecastBudgetOut]
    budgets_truncated: bool


class ForecastApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "forecast_usage"}

    @extend_schema(
        parameters=query_parameters(ForecastIn),
        responses={200: ForecastOut},
        summary="Projected spend per budget and per dimension, and budget exhaustion dates",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


# --- analytics: recommendations ---


class RecommendationWindowOut(BaseModel):
    since: str
    until: str
    days: str
    source: str = Field(description="rollups, ledger (a bounded sample), or budget periods.")
    seconds: int
    note: str | None = None


class RecommendationTrackingOut(BaseModel):
    accepted_at: str
    baseline_daily_savings: Money = Field(description="Its saving per day at acceptance.")
    baseline_days: int | None
    current_daily_waste: Money | None = Field(description="null: measured after an hour.")
    measured_since: str | None
    measured_until: str
    days_since_acceptance: str
    realized_savings: Money | None = Field(
        description="(baseline per day - current waste per day) x days since acceptance."
    )
    method: str


class RecommendationOut(BaseModel):
    id: int = Field(description="The stored row: POST .../<id>/dismiss or /accept.")
    key: str = Field(description="kind|dimension|target|team_id|project_id")
    kind: str
    dimension: str = Field(description="model, team, feature, agent or budget.")
    target: str
    value: str = Field(description="The dimension's value (a team, feature, agent, budget id).")
    provider: str
    model: str
    team_id: str = Field(description="The narrowest scope holding all its evidence.")
    project_id: str
    savings: Money = Field(description="Over `window`, exact.")
    monthly_savings: Money = Field(description="Over 30 days at the window's rate, to cents.")
    saves_money: bool = Field(description="false: a control recommendation (0 money saved).")
    confidence: str = Field(description="high, medium or low (README: the rule).")
    requests: int = Field(description="The requests (or periods' requests) it rests on.")
    window: RecommendationWindowOut | None
    evidence: dict[str, Any]
    action: str
    status: str = Field(description="open, dismissed or accepted.")
    live: bool = Field(description="Computed now (false: a stored decision no longer seen).")
    first_seen: str
    last_seen: str
    decided_at: str | None
    decided_by: str
    note: str
    tracking: RecommendationTrackingOut | None


class RecommendationsOut(BaseModel):
    since: str
    until: str
    currency: str
    filters: dict[str, str]
    kinds: list[str]
    status: str
    count: int
    truncated: bool = Field(description="More matched than `limit`: the smallest savings left out.")
    monthly_savings_by_dimension: dict[str, Money] = Field(
        description="Live recommendations' monthly savings summed per dimension (targets of "
        "different dimensions overlap: a model's saving holds its teams')."
    )
    results: list[RecommendationOut]


class RecommendationDecisionOut(BaseModel):
    id: int
    key: str
    kind: str
    dimension: str
    target: str
    team_id: str
    project_id: str
    status: str = Field(description="open, dismissed or accepted.")
    decided_at: str | None
    decided_by: str
    note: str
    baseline_daily_savings: Money | None
    baseline_days: int | None


_OFF = OpenApiResponse(
    response={"$ref": "#/components/schemas/Error"},
    description="optimization_enabled is off in the manager settings (or, for a decision, "
    "the recommendation already has it).",
)


class RecommendationsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_recommendations"}

    @extend_schema(
        parameters=query_parameters(RecommendationsIn),
        responses={200: RecommendationsOut, 409: _OFF},
        summary="Savings recommendations with evidence, monthly savings and confidence",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class _RecommendationDecisionApi(ActionView):
    def _decide(self, request: Request, rec_id: int) -> Response:
        empty = request.META.get("CONTENT_LENGTH") in (None, "", "0")
        body = {} if empty else self._body(request)
        return self._run(request, "post", with_url_id(body, "rec_id", rec_id))


class RecommendationDismissApi(_RecommendationDecisionApi):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "dismiss_recommendation"}

    @extend_schema(
        request=DecisionIn,
        responses={200: RecommendationDecisionOut, 409: _OFF},
        summary="Dismiss a recommendation",
    )
    def post(self, request: Request, rec_id: int) -> Response:
        return self._decide(request, rec_id)


class RecommendationAcceptApi(_RecommendationDecisionApi):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "accept_recommendation"}

    @extend_schema(
        request=DecisionIn,
        responses={200: RecommendationDecisionOut, 409: _OFF},
        summary="Accept a recommendation (its realized savings are tracked)",
    )
    def post(self, request: Request, rec_id: int) -> Response:
        return self._decide(request, rec_id)


# --- analytics: reconciliation ---

Day = Annotated[str, Field(description="A UTC day, ISO 8601 (2026-08-01).")]
Pct = Annotated[str | None, Field(description="Percent of the billed amount; null when it is 0.")]


class BillHeaderOut(BaseModel):
    id: int
    provider: reconcile.Provider
    source_format: str = Field(description="The export layout read (README lists them).")
    filename: str
    sha256: str
    currency: str
    first_day: Day
    last_day: Day
    days_covered: int
    rows: int = Field(description="Cost rows read from the file.")
    by_project: bool
    tolerance_pct: str
    billed: Money
    ledger: Money
    difference: Money = Field(description="ledger - billed.")
    difference_pct: Pct
    flagged_days: int
    imported_by: str
    imported_at: str


class BillListOut(BaseModel):
    results: list[BillHeaderOut]


class BillStatusSumOut(BaseModel):
    lines: int
    billed: Money
    ledger: Money
    difference: Money


class BillTotalsOut(BaseModel):
    billed: Money
    ledger: Money
    difference: Money
    difference_pct: Pct
    unexplained: Money = Field(
        description="The absolute differences of the lines beyond the tolerance, summed."
    )
    unexplained_pct: Pct
    lines: int
    flagged_lines: int
    days: int
    flagged_days: int
    by_status: dict[str, BillStatusSumOut]


class BillDayOut(BaseModel):
    day: Day
    billed: Money
    ledger: Money
    difference: Money
    difference_pct: Pct
    flagged: bool
    lines: int
    flagged_lines: int


class BillLineOut(BaseModel):
    day: Day
    model: str
    project_id: str
    billed: Money
    ledger: Money
    difference: Money
    difference_pct: Pct
    billed_tokens: int | None
    ledger_tokens: int
    status: Literal["matched", "over", "under", "missing_in_ledger", "missing_in_bill"]
    flagged: bool


class ReconciliationOut(BillHeaderOut):
    duplicate_of: int | None = Field(description="The latest earlier import of the same file.")
    totals: BillTotalsOut
    days: list[BillDayOut] = Field(
        description="Every day of the bill's span, worst (largest absolute difference) first."
    )
    lines: list[BillLineOut] = Field(description="Worst (largest absolute difference) first.")
    notes: list[str] = Field(description="What the import decided (model names, projects).")


UPLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "The export as downloaded (CSV or JSON), at most 20 MB.",
        },
        "provider": {"type": "string", "enum": list(reconcile.PROVIDERS)},
        "tolerance_pct": {"type": "number", "minimum": 0, "maximum": 100},
        "by_project": {"type": "boolean"},
        "filename": {"type": "string", "maxLength": 255},
    },
    "required": ["file"],
}


def _form_value(name: str, value: str) -> Any:
    """A form or query value as the JSON body would carry it (booleans only)."""
    if name == "by_project" and value in ("true", "false"):
        return value == "true"
    return value


class ReconciliationListApi(ActionView):
    """POST: a JSON body with `content`, or a multipart upload with the field `file`."""

    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "list_reconciliations",
        "post": "import_bill",
    }
    parser_classes = [JsonParser, MultiPartParser]

    @extend_schema(
        parameters=query_parameters(reconcile.BillListIn),
        responses={200: BillListOut},
        summary="Imported provider bills, newest first",
        operation_id="v1_reconciliations_list",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))

    @extend_schema(
        request={"application/json": reconcile.BillImportIn, "multipart/form-data": UPLOAD_SCHEMA},
        responses={201: ReconciliationOut},
        summary="Import a provider bill and reconcile it with the ledger",
    )
    def post(self, request: Request) -> Response:
        if (request.content_type or "").startswith("multipart/form-data"):
            data: Any = self._upload(request)
        else:
            data = self._body(request)
        if isinstance(data, dict):
            for name, raw in query_params(request).items():
                value = _form_value(name, raw)
                if name in data and data[name] != value:
                    raise ApiError(
                        "Invalid input.",
                        fields={name: ["Given in the query and in the body: give it once."]},
                    )
                data[name] = value
        return self._run(request, "post", data)

    @staticmethod
    def _upload(request: Request) -> dict[str, Any]:
        files = request.FILES
        for name in files:
            if name != "file":
                raise ApiError(
                    "Invalid upload.", fields={name: ["Unknown file field: send it as `file`."]}
                )
        upload = files.get("file")
        if upload is None:
            raise ApiError(
                "No provider bill.",
                fields={"file": ["Attach the export as the multipart file field `file`."]},
            )
        if upload.size is not None and upload.size > reconcile.MAX_BILL_BYTES:
            raise reconcile.too_large(upload.size)
        form: Any = request.data  # a QueryDict of the fields and the files
        data = {
            name: _form_value(name, form.getlist(name)[-1]) for name in form if name not in files
        }
        if "content" in data:
            raise ApiError(
                "Invalid upload.",
                fields={"content": ["Send the export as the file `file` or as JSON `content`."]},
            )
        data["content"] = reconcile.decode_upload(upload.read())
        data.setdefault("filename", (upload.name or "")[:255])
        return data


class ReconciliationDetailApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_reconciliation"}

    @extend_schema(
        responses={200: ReconciliationOut},
        summary="One provider bill against the ledger, worst days and lines first",
        operation_id="v1_reconciliations_detail",
    )
    def get(self, request: Request, bill_id: int) -> Response:
        return self._run(request, "get", {"bill_id": bill_id})
