"""REST views: parse the request, run the named action, shape the response. No rules here."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlencode

from drf_spectacular.utils import OpenApiParameter, extend_schema
from pydantic import BaseModel, ConfigDict, Field, RootModel
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tokenmgr_project.core import actions
from tokenmgr_project.core.api import (
    MAX_QUERY_LENGTH,
    ActionView,
    FieldMessages,
    Money,
    query_params,
)
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import principal_for
from usage import actions as usage_actions
from usage.schemas import (
    CompareIn,
    PriceOverrideIn,
    QuoteIn,
    RepriceIn,
    TokenizeIn,
    TruncateIn,
    UsageEventIn,
)
from usage.selectors import (
    FILTER_FIELDS,
    GROUP_FIELDS,
    INTERVALS,
    MAX_FILTER_LENGTH,
    MAX_PAGE,
    MAX_SUMMARY_ROWS,
    MAX_TIME_LENGTH,
)

# The query parameters as usage.selectors checks them (`query_text`): the schema is the truth.
_NO_CONTROL_CHARS = "^[^\\x00-\\x1f\\x7f]*$"


def _text(max_length: int = MAX_QUERY_LENGTH) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, "pattern": _NO_CONTROL_CHARS}


_TIME = {"type": "string", "format": "date-time", "maxLength": MAX_TIME_LENGTH}
_filters_doc = [
    OpenApiParameter(name, _text(MAX_FILTER_LENGTH), description=f"Only usage with this {name}.")
    for name in FILTER_FIELDS
] + [
    OpenApiParameter("since", _TIME, description="Inclusive. UTC offset within ±15:59."),
    OpenApiParameter("until", _TIME, description="Exclusive; after since."),
]


# --- response bodies (STYLE 6b): what the actions answer, as the schema's components ----------


class UsageProvenanceOut(BaseModel):
    parent_request_id: str
    root_request_id: str
    relationship: str
    intent: str
    input_hash: str
    output_hash: str
    cache_hit: bool | None


class UsageOut(BaseModel):
    request_id: str
    occurred_at: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    total_tokens: int
    cost: Money
    currency: str
    price_source: str
    price_ref: str
    unpriced: bool
    estimated: bool
    team_id: str
    project_id: str
    user_id: str
    feature: str
    agent: str
    task_type: str
    conversation_id: str
    workflow_id: str
    status: str
    error_type: str
    latency_ms: int | None
    metadata: dict[str, Any]
    reservation_id: str
    provenance: UsageProvenanceOut


class UsageListOut(BaseModel):
    results: list[UsageOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
    next: str | None = Field(description="The next page's URL.")


class TrackedOut(BaseModel):
    request_id: str | None
    duplicate: bool = Field(description="Already recorded in this tenant: not counted again.")
    cost: Money | None = None
    currency: str | None = None
    unpriced: bool | None = None


class BatchItemOut(BaseModel):
    index: int
    request_id: str | None
    status: Literal["created", "duplicate", "rejected"]
    errors: FieldMessages | None = Field(None, description="Why a rejected event was refused.")
    duplicate: bool | None = None
    cost: Money | None = None
    currency: str | None = None
    unpriced: bool | None = None


class BatchOut(BaseModel):
    created: int
    duplicates: int
    rejected: int
    results: list[BatchItemOut]


class SummaryRowOut(BaseModel):
    """One group: the `group_by` dimensions (and `period`) as keys, then the totals."""

    model_config = ConfigDict(extra="allow")

    period: str | None = None
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    total_tokens: int
    cost: Money = Field(description="Priced usage; unpriced requests add 0 (counted apart).")
    unpriced_requests: int
    unpriced_tokens: int = Field(description="Input + output tokens of unpriced requests.")
    estimated_requests: int = Field(description="Requests whose token counts were estimated.")
    estimated_cost: Money = Field(description="The part of `cost` from estimated requests.")
    errors: int


class SummaryOut(BaseModel):
    group_by: list[str]
    interval: str | None
    tz: str
    currency: str
    source: Literal["rollups", "rollups+ledger", "ledger"] = Field(
        description="What answered: hourly rollups, the raw ledger (sub-hour edges, hours a "
        "time zone's buckets cut, dimensions rollups lack), or both."
    )
    rows: list[SummaryRowOut]
    truncated: bool = Field(description=f"More than {MAX_SUMMARY_ROWS} groups: the rest is cut.")


class TokenizeOut(BaseModel):
    model: str
    encoding: str
    estimated: bool = Field(description="The model's encoding is a guess (unknown model).")
    tokens: int


class TruncateOut(TokenizeOut):
    text: str
    original_tokens: int
    truncated: bool


class PriceOverrideOut(BaseModel):
    id: int
    provider: str
    model: str
    input_per_mtok: Money
    output_per_mtok: Money
    cache_read_per_mtok: Money | None
    cache_write_per_mtok: Money | None
    effective_from: str
    note: str


class PriceOverrideSetOut(PriceOverrideOut):
    created: bool


class CatalogueEntryOut(BaseModel):
    provider: str
    model: str
    name: str
    context_window: int | None
    input_per_mtok: Money | None
    output_per_mtok: Money | None
    cache_read_per_mtok: Money | None
    cache_write_per_mtok: Money | None
    tiered: bool
    currency: str
    source: str
    ref: str


class PricingOut(BaseModel):
    catalogue_version: str
    currency: str
    overrides: list[PriceOverrideOut]
    catalogue: list[CatalogueEntryOut]


class QuoteOut(BaseModel):
    provider: str
    model: str
    cost: Money
    input_cost: Money
    output_cost: Money
    currency: str
    unpriced: bool
    price_source: str
    price_ref: str
    context_window: int | None


class ComparedOut(QuoteOut):
    vs_cheapest: Money | None = Field(None, description="Absent for unpriced models.")


class CompareOut(BaseModel):
    currency: str
    results: list[ComparedOut] = Field(description="Cheapest first; unpriced models last.")


class RepricedModelOut(BaseModel):
    provider: str
    model: str
    rows: int
    rows_changed: int = Field(description="Rows whose stored price (cost, source, ref) changes.")
    cost_before: Money
    cost_after: Money
    difference: Money = Field(description="cost_after - cost_before (negative: cheaper).")


class RepriceOut(BaseModel):
    applied: bool = Field(description="False: a dry run, nothing was changed.")
    since: str
    until: str
    provider: str
    model: str
    currency: str
    rows_seen: int
    rows_changed: int
    cost_before: Money
    cost_after: Money
    difference: Money
    models: list[RepricedModelOut] = Field(description="Per provider and model, sorted by them.")
    repricing_id: int | None = Field(description="The audit entry of an applied repricing.")


class HealthDatabaseOut(BaseModel):
    reachable: bool
    status: Literal["up", "down"]
    vendor: str
    latency_ms: float


class HealthPersistenceOut(BaseModel):
    appendonly: bool | None
    appendfsync: str | None
    aof_write_ok: bool | None
    source: Literal["config", "info", "unknown"]
    durable: bool = Field(description="An acknowledged write survives a Redis crash (AOF on).")
    volatile_ok: bool = Field(description="TOKENMGR_BUFFER_VOLATILE_OK: buffer even if not.")
    buffered: bool = Field(description="Ingestion buffers in this Redis.")


class HealthRedisOut(BaseModel):
    configured: bool
    reachable: bool | None = Field(description="None without REDIS_URL.")
    persistence: HealthPersistenceOut | None


class HealthBufferOut(BaseModel):
    depth: int = Field(description="Events buffered, not yet in the ledger.")
    pending_entries: int
    last_flush_at: str | None
    last_flush_count: int | None
    last_run_at: str | None = None
    total_flushed: int
    oldest_age_seconds: float | None


class HealthDeadLettersOut(BaseModel):
    count: int
    oldest_id: str | None
    oldest_at: str | None


class HealthOut(BaseModel):
    """Plus one entry per probe an app registers (core.health), e.g. `status_messages`."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded", "down"]
    database: HealthDatabaseOut
    redis: HealthRedisOut
    mode: Literal["buffered", "direct"]
    buffer: HealthBufferOut
    unpriced_requests: int | None = Field(description="None while the database is down.")
    dead_letters: HealthDeadLettersOut
    checked_at: str


class SignalOut(BaseModel):
    type: str
    result: dict[str, Any] = Field(description="The action's own answer (its endpoint's body).")


class UsageBatchEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", title="UsageBatch")

    events: Annotated[
        list[Any],
        Field(
            min_length=1,
            max_length=1000,
            description="Usage events (UsageEventIn). Each is validated on its own: an invalid "
            "one is answered in `results` (rejected) while the valid ones are stored.",
        ),
    ]


class UsageBatchBody(
    RootModel[UsageBatchEnvelope | Annotated[list[Any], Field(min_length=1, max_length=1000)]]
):
    """`{"events": [...]}` or the bare list of events."""


def _signal_types(schema: dict[str, Any]) -> None:
    # Computed when the document is generated: every app has registered its actions by then.
    schema["properties"]["type"]["enum"] = sorted(actions.REGISTRY)


class SignalIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_signal_types)

    type: str = Field(description="An action name; `data` is that action's input.")
    data: dict[str, Any] = Field(default_factory=dict)


class UsageApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_usage", "post": "track_usage"}
    fast_post = True

    @extend_schema(
        parameters=[
            *_filters_doc,
            OpenApiParameter(
                "cursor",
                {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9_-]*$"},
                description="`next_cursor` of the previous page.",
            ),
            OpenApiParameter(
                "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}
            ),
        ],
        responses={200: UsageListOut},
        summary="List usage (keyset-paginated)",
    )
    def get(self, request: Request) -> Response:
        response = self._run(request, "get", query_params(request))
        cursor = response.data.get("next_cursor")
        if cursor:
            params = {**query_params(request), "cursor": cursor}
            response.data["next"] = (
                request.build_absolute_uri(request.path) + "?" + urlencode(params)
            )
        else:
            response.data["next"] = None
        return response

    @extend_schema(
        request=UsageEventIn,
        responses={201: TrackedOut, 200: TrackedOut},
        summary="Track one request's usage",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class UsageBatchApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "track_usage_batch"}
    fast_post = True

    @extend_schema(
        request=UsageBatchBody, responses={200: BatchOut}, summary="Track up to 1,000 events"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class UsageSummaryApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_usage_summary"}

    @extend_schema(
        parameters=[
            *_filters_doc,
            OpenApiParameter(
                "group_by",
                {"type": "array", "items": {"type": "string", "enum": list(GROUP_FIELDS)}},
                style="form",
                explode=False,
                description="Comma-separated dimensions.",
            ),
            OpenApiParameter("interval", str, enum=list(INTERVALS)),
            OpenApiParameter(
                "tz", _text(64), description="IANA time zone for interval buckets (UTC)."
            ),
        ],
        responses={200: SummaryOut},
        summary="Usage totals grouped by dimensions and time",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))


class HealthApi(APIView):
    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(responses={200: HealthOut, 503: HealthOut}, summary="Health and buffer state")
    def get(self, request: Request) -> Response:
        outcome = usage_actions.get_status(None, {})  # type: ignore[arg-type]  # public, reads no scoped data
        return Response(outcome.body, status=outcome.status)


class TokenizeApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "tokenize"}

    @extend_schema(request=TokenizeIn, responses={200: TokenizeOut}, summary="Count tokens")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class TruncateApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "truncate"}

    @extend_schema(
        request=TruncateIn, responses={200: TruncateOut}, summary="Trim text to max_tokens"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class PricingApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_pricing", "post": "update_pricing"}

    @extend_schema(
        parameters=[
            OpenApiParameter("provider", _text()),
            OpenApiParameter("model", _text(), description="Substring."),
        ],
        responses={200: PricingOut},
        summary="Price catalogue and overrides",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", query_params(request))

    @extend_schema(
        request=PriceOverrideIn,
        responses={201: PriceOverrideSetOut, 200: PriceOverrideSetOut},
        summary="Set a price override",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class RepriceApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "reprice_usage"}

    @extend_schema(
        request=RepriceIn,
        responses={200: RepriceOut, 201: RepriceOut},
        summary="Re-price past usage (dry run, or apply)",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class QuoteApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "quote_price"}

    @extend_schema(request=QuoteIn, responses={200: QuoteOut}, summary="Price one request")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class CompareApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "compare_prices"}

    @extend_schema(
        request=CompareIn, responses={200: CompareOut}, summary="Compare models, cheapest first"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class SignalsApi(APIView):
    @extend_schema(
        request=SignalIn,
        responses={200: SignalOut, 201: SignalOut, 202: SignalOut},
        summary="Run an action by name",
    )
    def post(self, request: Request) -> Response:
        envelope = request.data
        if not isinstance(envelope, dict):
            raise ApiError(
                "Invalid signal.", fields={"body": ['Send {"type": ..., "data": {...}}.']}
            )
        unknown = sorted(set(envelope) - {"type", "data"})
        if unknown:
            raise ApiError("Invalid signal.", fields={k: ["Unknown field."] for k in unknown})
        kind = envelope.get("type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(
                "Invalid signal.",
                fields={
                    "type": [f"Required. Known actions: {', '.join(sorted(actions.REGISTRY))}."]
                },
            )
        outcome = actions.run(kind, principal_for(request), envelope.get("data", {}))
        return Response({"type": kind, "result": outcome.body}, status=outcome.status)
