"""REST views of provenance: parse, run the named action, respond (SPEC §6)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from pydantic import BaseModel, Field, RootModel
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from provenance.schemas import RelationshipBatchIn, RelationshipIn
from tokenmgr_project.core import actions
from tokenmgr_project.core.api import ActionView, Money, query_params, query_text
from tokenmgr_project.core.principal import principal_for

Instant = Annotated[str, Field(description="ISO 8601 date-time.")]
NO_CONTROL_CHARS = "^[^\\x00-\\x1f\\x7f]*$"

# --- response bodies (STYLE 6b) ------------------------------------------------------------------


class EdgeOut(BaseModel):
    id: int
    from_request_id: str
    to_request_id: str
    type: str
    tree: bool = Field(description="The from-request's link to the parent its event named.")
    source: str
    created_at: Instant


class CreatedEdgeOut(EdgeOut):
    created: bool = Field(description="False: the same relationship existed already.")


class RelationshipBatchOut(BaseModel):
    relationships: list[CreatedEdgeOut]


class RelationshipsBody(RootModel[RelationshipBatchIn | RelationshipIn]):
    """One relationship, or `{"relationships": [...]}` for a batch of up to 500."""


class RelationshipsOut(RootModel[RelationshipBatchOut | CreatedEdgeOut]):
    """The relationship (a single one asked for) or `{"relationships": [...]}`."""


class ProvenanceOut(BaseModel):
    request_id: str
    tenant: str
    parent_request_id: str
    root_request_id: str
    relationship: str
    depth: int | None = Field(description="0 for a root; null while the parent has not arrived.")
    waiting_for_parent: bool
    intent: str
    agent: str
    agent_type: str
    task_type: str
    workflow_id: str
    workflow_step: str
    conversation_id: str
    system_context: dict[str, Any]
    input_hash: str
    output_hash: str
    cache_hit: bool | None
    edges_out: list[EdgeOut]
    edges_in: list[EdgeOut]


class LineageNodeOut(BaseModel):
    request_id: str
    parent_request_id: str | None = Field(description="Its parent among these nodes.")
    level: int = Field(description="Relative to the request asked about: ancestors are < 0.")
    depth: int | None
    occurred_at: Instant
    agent: str
    agent_type: str
    provider: str
    model: str
    task_type: str
    intent: str
    workflow_step: str
    relationship: str
    status: str
    latency_ms: int | None
    cache_hit: bool | None
    input_tokens: int
    output_tokens: int
    tokens: int
    cost: Money
    subtree_tokens: int
    subtree_cost: Money = Field(description="Own cost plus its descendants' among these nodes.")
    subtree_size: int


class LineageTotalsOut(BaseModel):
    nodes: int
    input_tokens: int
    output_tokens: int
    tokens: int
    cost: Money = Field(description="The sum of the nodes' own costs.")
    errors: int
    max_level: int


class LineageOut(BaseModel):
    request_id: str
    tenant: str
    direction: str
    max_depth: int | None
    top_request_id: str
    waiting_for_parent: str | None = Field(description="The top node's parent, not recorded yet.")
    cut_at_max_depth: bool
    totals: LineageTotalsOut
    nodes: list[LineageNodeOut]
    links: list[EdgeOut]


class FlexibleOut(BaseModel):
    """Analysis bodies: see the description of each endpoint for their sections."""

    since: Instant | None = None
    until: Instant | None = None
    model_config = {"extra": "allow"}


def _range_params(*extra: OpenApiParameter) -> list[OpenApiParameter]:
    return [
        OpenApiParameter(
            "since",
            {"type": "string", "format": "date-time", "maxLength": 64},
            description="From (inclusive); default 7 days before `until`.",
        ),
        OpenApiParameter(
            "until",
            {"type": "string", "format": "date-time", "maxLength": 64},
            description="To (exclusive); default now. At most 400 days after `since`.",
        ),
        *extra,
    ]


def _int(name: str, low: int, high: int, default: int | None, text: str) -> OpenApiParameter:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    if default is not None:
        schema["default"] = default
    return OpenApiParameter(name, schema, description=text)


_TENANT = OpenApiParameter(
    "tenant",
    {"type": "string", "minLength": 1, "maxLength": 300, "pattern": NO_CONTROL_CHARS},
    description="Whose request id, when several tenants you can see have it.",
)
_REQUEST_ID = OpenApiParameter(
    "request_id",
    {"type": "string", "minLength": 1, "maxLength": 128, "pattern": NO_CONTROL_CHARS},
    location=OpenApiParameter.PATH,
)


class _AsIs(BaseRenderer):
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> Any:
        return data


class DotRenderer(_AsIs):
    media_type = "text/vnd.graphviz"
    format = "dot"


class SvgRenderer(_AsIs):
    media_type = "image/svg+xml"
    format = "svg"


# --- views ---------------------------------------------------------------------------------------


class RelationshipsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "create_relationships"}

    @extend_schema(
        request=RelationshipsBody,
        responses={201: RelationshipsOut, 200: RelationshipsOut},
        summary="Relate requests (one, or a batch of up to 500)",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class ProvenanceApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_provenance"}

    @extend_schema(
        parameters=[_REQUEST_ID, _TENANT],
        responses={200: ProvenanceOut},
        summary="A request's provenance and its edges",
    )
    def get(self, request: Request, request_id: str) -> Response:
        return self._run(request, "get", {**query_params(request), "request_id": request_id})


class LineageApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_lineage"}
    # DRF picks a renderer by ?format=; dot and svg bodies are made by the action itself.
    renderer_classes: ClassVar[list[type[BaseRenderer]]] = [  # type: ignore[misc]
        JSONRenderer,
        DotRenderer,
        SvgRenderer,
    ]

    @extend_schema(
        parameters=[
            _REQUEST_ID,
            _TENANT,
            OpenApiParameter("format", str, enum=["json", "dot", "svg"], default="json"),
            OpenApiParameter("direction", str, enum=["both", "up", "down"], default="both"),
            _int("max_depth", 0, 1000, None, "Levels below the request (ancestors: all)."),
        ],
        responses={
            (200, "application/json"): LineageOut,
            (200, "text/vnd.graphviz"): OpenApiResponse(
                response=OpenApiTypes.STR, description="Graphviz DOT"
            ),
            (200, "image/svg+xml"): OpenApiResponse(
                response=OpenApiTypes.STR, description="An SVG drawing of the tree"
            ),
        },
        summary="A request's lineage: ancestors and descendants with cumulative cost",
    )
    def get(self, request: Request, request_id: str) -> Response | HttpResponse:
        params = {**query_params(request), "request_id": request_id}
        if "format" in request.query_params:
            params["format"] = query_text("format", request.query_params["format"])
        outcome = actions.run("get_lineage", principal_for(request), params)
        body = outcome.body
        if body.get("format") in ("dot", "svg") and "content" in body:
            renderer = DotRenderer if body["format"] == "dot" else SvgRenderer
            return HttpResponse(
                body["content"], content_type=f"{renderer.media_type}; charset=utf-8"
            )
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type
        return Response(body, status=outcome.status)

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # ?format= names the body the action makes (json, dot, svg); never a DRF renderer.
        return JSONRenderer(), JSONRenderer.media_type

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(response, Response):  # errors too: always the JSON error shape
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


class WorkflowUsageApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_workflow_usage"}

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "workflow_id",
                {"type": "string", "minLength": 1, "maxLength": 128, "pattern": NO_CONTROL_CHARS},
                location=OpenApiParameter.PATH,
            ),
            *_range_params()[:2],
        ],
        responses={200: FlexibleOut},
        summary="A workflow's usage: totals, steps, critical path, bottleneck",
        description="Without since/until: all of the workflow's usage (up to 20,000 requests).",
    )
    def get(self, request: Request, workflow_id: str) -> Response:
        return self._run(request, "get", {**query_params(request), "workflow_id": workflow_id})


class TaskCostsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "analyze_task_costs"}

    @extend_schema(
        parameters=_range_params(_int("limit", 1, 1000, 50, "Groups per dimension.")),
        responses={200: FlexibleOut},
        summary="Cost by task type, intent, agent and workflow",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class PatternsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "analyze_patterns"}

    @extend_schema(
        parameters=_range_params(
            _int("window_seconds", 1, 86_400, 3600, "Duplicates: same input within this window."),
            _int("storm_min", 2, 10_000, 3, "Retry storm: at least this many retries…"),
            _int("storm_seconds", 1, 86_400, 600, "…of one request within this many seconds."),
            _int("depth_limit", 1, 1000, None, "Deep chains: deeper than this."),
            _int("limit", 1, 1000, 20, "Findings per pattern."),
        ),
        responses={200: FlexibleOut},
        summary="Patterns worth money: duplicates, retry storms, deep chains, cycles, fan-out",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class QuestionCostsApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_question_costs"}

    @extend_schema(
        parameters=_range_params(
            _int("limit", 1, 1000, 20, "How many questions."),
            OpenApiParameter("retries", str, enum=["all", "once"], default="all"),
        ),
        responses={200: FlexibleOut},
        summary="Cost per user question: the most expensive root requests and their trees",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))
