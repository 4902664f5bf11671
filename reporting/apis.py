from __future__ import annotations

from typing import Any, ClassVar, Literal

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from pydantic import BaseModel, ConfigDict, Field
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from reporting import formats, reports
from reporting.actions import StatusBatchIn, StatusIn
from tokenmgr_project.core import actions
from tokenmgr_project.core.api import ActionView, Money, query_params, query_text
from tokenmgr_project.core.errors import ApiError
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


# --- analytics: forecasts ---


# --- analytics: recommendations ---


# --- analytics: reconciliation ---
