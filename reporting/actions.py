"""Reporting actions, registered in the shared action registry (usage.actions)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field

from reporting import (
    anomalies,
    forecasts,
    formats,
    recommendations,
    reconcile,
    reports,
    services,
    trends,
)
from reporting.models import StatusCategory
from reporting.selectors import conversation_recently_visible, conversation_visible_to
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.actions import Outcome, action, run, validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.actions import VIEW_USAGE, actor_label
from usage.schemas import Dim, Strict


class StatusIn(Strict):
    conversation_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    category: StatusCategory
    # At most 4,096 bytes of UTF-8 (checked after validation: max_length counts characters).
    message: Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
    metadata: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] | None = Field(
        default=None, description="Deprecated name of `metadata` (one of the two, not both)."
    )
    agent_id: Dim = ""
    correlation_id: Dim = ""
    # The scope the message belongs to; a scoped key's own team/project unless it names one
    # inside its scope (a team key: one of its projects). Global keys and staff: any, or none
    # for an organisation-wide message that only global viewers receive.
    team_id: Dim = ""
    project_id: Dim = ""


MAX_STATUS_BATCH = 500


class StatusBatchIn(Strict):
    messages: Annotated[list[StatusIn], Field(min_length=1, max_length=MAX_STATUS_BATCH)]


def _size_errors(params: StatusIn, prefix: str = "") -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    if len(params.message.encode()) > services.MESSAGE_MAX_BYTES:
        errors[prefix + "message"] = [f"At most {services.MESSAGE_MAX_BYTES} bytes (UTF-8)."]
    if not params.message.strip():
        errors[prefix + "message"] = ["Must not be blank."]
    if params.data is not None and params.metadata:
        errors[prefix + "data"] = ["Send `metadata` only (`data` is its old name)."]
    metadata = params.metadata or params.data or {}
    if len(json.dumps(metadata, separators=(",", ":"))) > services.METADATA_MAX_BYTES:
        errors[prefix + "metadata"] = [f"At most {services.METADATA_MAX_BYTES} bytes as JSON."]
    return errors


def _queued_form(principal: Principal, params: StatusIn, prefix: str = "") -> dict[str, Any]:
    """The queued form of a valid status inside the caller's scope (its conversation is
    checked by the caller); the same 400/403 as the API documents."""
    errors = _size_errors(params, prefix)
    if errors:
        raise ApiError("Invalid status.", fields=errors)
    team_id = params.team_id or principal.team_id
    project_id = params.project_id or principal.project_id
    if not principal.covers(team_id, project_id):
        field = "team_id" if principal.team_id and team_id != principal.team_id else "project_id"
        raise ApiError(
            "Not your scope.",
            status_code=403,
            code="permission_denied",
            fields={prefix + field: ["This key may only publish inside its own team/project."]},
        )
    return services.status_message(
        conversation_id=params.conversation_id,
        category=params.category.value,
        message=params.message,
        metadata=params.metadata or params.data or {},
        agent_id=params.agent_id,
        correlation_id=params.correlation_id,
        team_id=team_id,
        project_id=project_id,
    )


def _one(principal: Principal, data: Any) -> list[dict[str, Any]]:
    return [_queued_form(principal, validate(StatusIn, data))]


def _many(principal: Principal, data: Any) -> list[dict[str, Any]]:
    """All of a batch, or a 400/403 naming the first bad message's fields (nothing queued)."""
    params = validate(StatusBatchIn, data)
    return [
        _queued_form(principal, item, f"messages.{i}.") for i, item in enumerate(params.messages)
    ]


def _conversation_refused(
    principal: Principal, messages: list[dict[str, Any]], *, batch: bool
) -> ApiError | None:
    for i, conversation_id in _distinct_conversations(messages):
        if not conversation_visible_to(principal, conversation_id):
            field = f"messages.{i}.conversation_id" if batch else "conversation_id"
            return ApiError(
                "Not your conversation.",
                status_code=403,
                code="permission_denied",
                fields={field: ["This key has no usage in that conversation."]},
            )
    return None


def _distinct_conversations(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    seen: dict[str, int] = {}
    for i, message in enumerate(messages):
        seen.setdefault(message["conversation_id"], i)
    return [(i, c) for c, i in seen.items()]


def _inline(messages: list[dict[str, Any]], principal: Principal) -> bool:
    """Straight onto the Redis queue from the event loop, when nothing needs the database:
    Redis is the queue, and each conversation is a global key's or one this scoped key was
    admitted to lately. False: the thread path decides."""
    if not all(
        conversation_recently_visible(principal, c) for _i, c in _distinct_conversations(messages)
    ):
        return False
    try:
        services.status_push_redis(messages)
    except tm_redis.REDIS_ERRORS:
        return False  # the thread path queues them in the database
    return True


def _redis_queue() -> bool:
    return tm_redis.configured() and tm_redis.available()


def publish_status_cached(principal: Principal, data: Any) -> Outcome | None:
    """The event-loop first phase (core.hotpath) of publish_status."""
    if not _redis_queue():
        return None
    return _QUEUED if _inline(_one(principal, data), principal) else None


def publish_status_batch_cached(principal: Principal, data: Any) -> Outcome | None:
    """The event-loop first phase (core.hotpath) of publish_status_batch."""
    if not _redis_queue():
        return None
    messages = _many(principal, data)
    return _batch_queued(messages) if _inline(messages, principal) else None


_QUEUED = Outcome({"queued": True}, status=202)


def _batch_queued(messages: list[dict[str, Any]]) -> Outcome:
    return Outcome({"queued": len(messages)}, status=202)


@action(
    "publish_status",
    "Publish a status message to a conversation's live channel.",
    # Publishing onto a feed is allowed to those who may watch it (the websocket's rule).
    staff_perm=VIEW_USAGE,
    inline=publish_status_cached,
)
def publish_status(principal: Principal, data: Any) -> Outcome:
    messages = _one(principal, data)
    refused = _conversation_refused(principal, messages, batch=False)
    if refused is not None:
        raise refused
    services.status_push_many(messages)
    return _QUEUED


@action(
    "publish_status_batch",
    f"Publish up to {MAX_STATUS_BATCH} status messages at once (all or none).",
    staff_perm=VIEW_USAGE,
    inline=publish_status_batch_cached,
)
def publish_status_batch(principal: Principal, data: Any) -> Outcome:
    messages = _many(principal, data)
    refused = _conversation_refused(principal, messages, batch=True)
    if refused is not None:
        raise refused
    services.status_push_many(messages)
    return _batch_queued(messages)


# --- reports -----------------------------------------------------------------------------------
VIEW_BUDGET = "budgets.view_budget"


def _report(kind: str) -> Any:
    def handler(principal: Principal, data: Any) -> Outcome:
        params = dict(data) if isinstance(data, dict) else data
        fmt = params.pop("format", "json") if isinstance(params, dict) else "json"
        if fmt not in formats.FORMATS:
            raise ApiError(
                "Unknown format.", fields={"format": [f"Use one of {', '.join(formats.FORMATS)}."]}
            )
        body = reports.report_generate(principal, params, kind=kind)
        if fmt == "json":
            return Outcome(body)
        render = formats.report_csv if fmt == "csv" else formats.report_markdown
        return Outcome({"format": fmt, "content": "".join(render(body))})

    return handler


action(
    "get_usage_report",
    "Usage report: totals, efficiency, breakdown and series, top consumers, model mix.",
    staff_perm=VIEW_USAGE,
)(_report("usage"))
action(
    "get_cost_report",
    "Cost report: spend by dimension with period-over-period change, budget utilisation.",
    staff_perm=(VIEW_USAGE, VIEW_BUDGET),
)(_report("cost"))
action(
    "get_optimization_report",
    "Optimization report: savings opportunities with their evidence, priced.",
    staff_perm=VIEW_USAGE,
)(_report("optimization"))


@action(
    "generate_report",
    "Any report by name: {'report': 'usage'|'cost'|'optimization', ...its parameters}.",
    staff_perm=VIEW_USAGE,
)
def generate_report(principal: Principal, data: Any) -> Outcome:
    kind = data.get("report", "usage") if isinstance(data, dict) else "usage"
    if kind not in reports.KINDS:
        raise ApiError(
            "Unknown report.", fields={"report": [f"Use one of {', '.join(reports.KINDS)}."]}
        )
    return run(f"get_{kind}_report", principal, data)


@action(
    "aggregate_usage",
    "Measure sums from the rollups grouped by dimensions and hour/day/week/month.",
    staff_perm=VIEW_USAGE,
)
def aggregate_usage(principal: Principal, data: Any) -> Outcome:
    return Outcome(reports.aggregate_table(principal, data))


# --- analytics: trends and anomalies (reporting.trends, reporting.anomalies) ---


@action(
    "get_trends",
    "Period-over-period growth per dimension: fastest growers and decliners.",
    staff_perm=VIEW_USAGE,
)
def get_trends(principal: Principal, data: Any) -> Outcome:
    return Outcome(trends.trends(principal, data))


@action(
    "get_anomalies",
    "Hours or days far outside a series' own history, with their drivers.",
    staff_perm=VIEW_USAGE,
)
def get_anomalies(principal: Principal, data: Any) -> Outcome:
    return Outcome(anomalies.anomalies_list(principal, data))


# --- analytics: forecasts (reporting.forecasts) ---


@action(
    "forecast_usage",
    "Projected spend to period end and month end per budget and per dimension, with an 80 % "
    "interval, and each budget's exhaustion date at its burn rate.",
    staff_perm=(VIEW_USAGE, VIEW_BUDGET),
)
def forecast_usage(principal: Principal, data: Any) -> Outcome:
    return Outcome(forecasts.forecast_usage(principal, data))


# --- analytics: recommendations (reporting.recommendations) ---
CHANGE_RECOMMENDATION = "reporting.change_recommendation"


@action(
    "get_recommendations",
    "Savings recommendations with their evidence, monthly savings and confidence, computed for "
    "the caller's scope and joined with dismiss/accept decisions; accepted ones with what they "
    "saved since.",
    staff_perm=VIEW_USAGE,
)
def get_recommendations(principal: Principal, data: Any) -> Outcome:
    return Outcome(recommendations.recommendations_list(principal, data))


def _decide(status: str) -> Any:
    def handler(principal: Principal, data: Any) -> Outcome:
        params = validate(recommendations.DecisionIn, data)
        row = recommendations.recommendation_decide(
            principal=principal, rec_id=params.rec_id, status=status, note=params.note
        )
        return Outcome(recommendations.decision_out(row))

    return handler


action(
    "dismiss_recommendation",
    "Dismiss a recommendation (hidden from the list unless status=dismissed|all).",
    staff_perm=CHANGE_RECOMMENDATION,
)(_decide(recommendations.Status.DISMISSED))
action(
    "accept_recommendation",
    "Accept a recommendation: its waste per day becomes the baseline its realized savings are "
    "tracked against.",
    staff_perm=CHANGE_RECOMMENDATION,
)(_decide(recommendations.Status.ACCEPTED))


# --- analytics: reconciliation with provider bills (reporting.reconcile) ---
# Bills are the organisation's: global keys and staff only (the admin asks the same).
ADD_BILL = "reporting.add_billimport"
VIEW_BILL = "reporting.view_billimport"


@action(
    "import_bill",
    "Import a provider's cost export (OpenAI costs, Anthropic cost report; CSV or JSON) and "
    "compare it per UTC day x model (x project) with the ledger: matched, over, under, missing "
    "either way, days beyond the tolerance; stored with its lines (global key or staff).",
    staff_perm=ADD_BILL,
    staff_or_global=True,
)
def import_bill(principal: Principal, data: Any) -> Outcome:
    params = validate(reconcile.BillImportIn, data)
    body = reconcile.bill_import(
        principal=principal,
        content=params.content,
        provider=params.provider,
        filename=params.filename,
        tolerance_pct=params.tolerance_pct,
        by_project=params.by_project,
        actor=actor_label(principal),
    )
    return Outcome(body, status=201)


@action(
    "list_reconciliations",
    "Imported provider bills, newest first, with their totals (global key or staff).",
    staff_perm=VIEW_BILL,
    staff_or_global=True,
)
def list_reconciliations(principal: Principal, data: Any) -> Outcome:
    params = validate(reconcile.BillListIn, data)
    rows = reconcile.bills_for_principal(principal, provider=params.provider, limit=params.limit)
    return Outcome({"results": [reconcile.bill_header(row) for row in rows]})


@action(
    "get_reconciliation",
    "One imported provider bill against the ledger: totals, days and lines, worst first "
    "(global key or staff).",
    staff_perm=VIEW_BILL,
    staff_or_global=True,
)
def get_reconciliation(principal: Principal, data: Any) -> Outcome:
    params = validate(reconcile.BillIdIn, data)
    return Outcome(reconcile.bill_result(reconcile.bill_for_principal(principal, params.bill_id)))
