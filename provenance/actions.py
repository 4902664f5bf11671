"""The provenance app's actions: links between requests, lineage, workflows, attribution and
patterns (SPEC §6). REST views, /signals and the admin pages all run these."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

from django.conf import settings
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from provenance import graph, selectors, services
from provenance.schemas import (
    LineageIn,
    NodeIn,
    PatternsIn,
    QuestionsIn,
    RangeIn,
    RelationshipBatchIn,
    RelationshipIn,
    TaskCostsIn,
    WorkflowIn,
)
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.actions import Outcome, action, validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import selectors as usage_selectors
from usage.models import TokenUsage
from usage.pricing import money
from usage.services import usage_flush

VIEW_USAGE = "usage.view_tokenusage"
R = TypeVar("R", bound=RangeIn)
ADD_RELATIONSHIP = "provenance.add_provenancerelationship"


def jsonable(value: Any) -> Any:
    """Money as text, times as ISO 8601, through nested dicts and lists."""
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def usage_admin_url(pk: int) -> str:
    return usage_admin_urls()(pk)


def usage_admin_urls() -> Any:
    """pk -> the usage row's admin page, reversing once (a lineage has thousands of nodes)."""
    try:
        template = reverse("admin:usage_tokenusage_change", args=[0])
    except NoReverseMatch:
        return lambda pk: ""
    head, tail = template.split("/0/", 1)
    return lambda pk: f"{head}/{pk}/{tail}"


# --- one request ---------------------------------------------------------------------------------


@action(
    "get_provenance",
    "A request's provenance (parent, root, depth, intent, hashes, …) and its edges in and out.",
    staff_perm=VIEW_USAGE,
)
def get_provenance(principal: Principal, data: Any) -> Outcome:
    params = validate(NodeIn, data)
    row = selectors.node_for_principal(principal, params.request_id, params.tenant)
    return Outcome(jsonable(selectors.provenance_of(principal, row)))


def node_out(node: selectors.LineageNode) -> dict[str, Any]:
    r = node.row
    return {
        "request_id": node.request_id,
        "parent_request_id": node.parent,
        "level": node.level,
        "depth": r["depth"],
        "occurred_at": r["occurred_at"],
        "agent": r["agent"],
        "agent_type": r["agent_type"],
        "provider": r["provider"],
        "model": r["model"],
        "task_type": r["task_type"],
        "intent": r["intent"],
        "workflow_step": r["workflow_step"],
        "relationship": r["relationship"],
        "status": r["status"],
        "latency_ms": r["latency_ms"],
        "cache_hit": r["cache_hit"],
        "input_tokens": r["input_tokens"],
        "output_tokens": r["output_tokens"],
        "tokens": node.tokens,
        "cost": r["cost"],
        "subtree_tokens": node.subtree_tokens,
        "subtree_cost": node.subtree_cost,
        "subtree_size": node.subtree_size,
    }


def graph_nodes(lineage: selectors.Lineage) -> list[graph.Node]:
    """The lineage's nodes for a drawing, each linking to its usage row's admin page."""
    to_row = usage_admin_urls()
    return [
        graph.Node(
            request_id=n.request_id,
            parent=n.parent,
            depth=n.row["depth"] if n.row["depth"] is not None else n.level,
            agent=n.row["agent"],
            model=n.row["model"],
            task_type=n.row["task_type"],
            status=n.row["status"],
            cost=n.row["cost"],
            tokens=n.tokens,
            subtree_cost=n.subtree_cost,
            subtree_tokens=n.subtree_tokens,
            subtree_size=n.subtree_size,
            url=to_row(n.row["pk"]),
        )
        for n in lineage.nodes
    ]


def graph_links(lineage: selectors.Lineage) -> list[graph.Link]:
    return [graph.Link(e.from_request_id, e.to_request_id, e.type) for e in lineage.links]


@action(
    "get_lineage",
    "Ancestors up to the root and all descendants of a request, each with its own and subtree "
    "tokens and cost; as JSON, Graphviz DOT (format=dot) or SVG (format=svg).",
    staff_perm=VIEW_USAGE,
)
def get_lineage(principal: Principal, data: Any) -> Outcome:
    params = validate(LineageIn, data)
    row = selectors.node_for_principal(principal, params.request_id, params.tenant)
    lineage = selectors.lineage_of(
        principal, row, direction=params.direction, max_depth=params.max_depth
    )
    title = f"lineage of {row.request_id}"
    if params.format == "dot":
        content = graph.to_dot(graph_nodes(lineage), links=graph_links(lineage), title=title)
        return Outcome({"format": "dot", "content": content})
    if params.format == "svg":
        content = graph.to_svg(graph_nodes(lineage), links=graph_links(lineage), title=title)
        return Outcome({"format": "svg", "content": content})
    top = lineage.nodes[0]
    return Outcome(
        jsonable(
            {
                "request_id": row.request_id,
                "tenant": row.tenant,
                "direction": params.direction,
                "max_depth": params.max_depth,
                "top_request_id": top.request_id,
                "waiting_for_parent": lineage.waiting_for or None,
                "cut_at_max_depth": lineage.cut_at_depth,
                "totals": lineage.totals(),
                "nodes": [node_out(n) for n in lineage.nodes],
                "links": [selectors.edge_out(e) for e in lineage.links],
            }
        )
    )


# --- relationships -------------------------------------------------------------------------------


def _find(principal: Principal, request_id: str, tenant: str | None, name: str) -> TokenUsage:
    try:
        return selectors.node_for_principal(principal, request_id, tenant)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        raise ApiError(
            f"No request {request_id!r} in your scope.",
            status_code=404,
            code="not_found",
            fields={name: ["Unknown request id (or not yours)."]},
        ) from None


def _flush_if_buffered() -> None:
    # A request acknowledged moments ago may still be in the buffer: commit it first, so that
    # linking right after recording works. Only when something is buffered.
    if tm_redis.configured() and usage_selectors.buffer_state().get("depth"):
        usage_flush()


@action(
    "create_relationships",
    "Typed relationships between requests you can see (single, or `relationships` for a batch "
    "of up to 500). A relationship that would close a cycle is refused with a 409 naming it.",
    staff_perm=ADD_RELATIONSHIP,
)
def create_relationships(principal: Principal, data: Any) -> Outcome:
    single = isinstance(data, dict) and "relationships" not in data
    items = (
        [validate(RelationshipIn, data)]
        if single
        else validate(RelationshipBatchIn, data).relationships
    )
    for i, item in enumerate(items):
        if item.from_request_id == item.to_request_id:
            where = "to_request_id" if single else f"relationships.{i}.to_request_id"
            raise ApiError("Invalid input.", fields={where: ["A request cannot relate to itself."]})
    names = ["", ""] if single else ["relationships.{}.", "relationships.{}."]
    tenant: str | None = None
    try:
        lookups = _ends(principal, items, names)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        _flush_if_buffered()
        lookups = _ends(principal, items, names)
    for rows in lookups:
        if tenant is None:
            tenant = rows[0].tenant
        if rows[0].tenant != tenant or rows[1].tenant != rows[0].tenant:
            raise ApiError(
                "Relationships link requests of one tenant.",
                fields={"to_request_id": ["Belongs to another tenant than from_request_id."]},
            )
    assert tenant is not None
    created = services.relationships_create(
        principal=principal,
        tenant=tenant,
        edges=[services.EdgeIn(i.from_request_id, i.to_request_id, i.type.value) for i in items],
    )
    body = [{**selectors.edge_out(edge), "created": new} for edge, new in created]
    status = 201 if any(new for _edge, new in created) else 200
    return Outcome(jsonable(body[0] if single else {"relationships": body}), status)


def _ends(
    principal: Principal, items: list[RelationshipIn], names: list[str]
) -> list[tuple[TokenUsage, TokenUsage]]:
    out = []
    for i, item in enumerate(items):
        frm = _find(principal, item.from_request_id, None, names[0].format(i) + "from_request_id")
        to = _find(principal, item.to_request_id, frm.tenant, names[1].format(i) + "to_request_id")
        out.append((frm, to))
    return out


# --- workflows, attribution, patterns ------------------------------------------------------------


@action(
    "get_workflow_usage",
    "A workflow's requests, totals, per-step breakdown, critical path (by latency) and bottleneck.",
    staff_perm=VIEW_USAGE,
)
def get_workflow_usage(principal: Principal, data: Any) -> Outcome:
    params = validate(WorkflowIn, data)
    since, until = params.bounds(timezone.now()) if params.since or params.until else (None, None)
    found = selectors.workflow_usage(principal, params.workflow_id, since, until)
    rows = found.pop("rows")
    path = found.pop("critical_path")
    body = {
        **found,
        "critical_path": {
            "latency_ms": sum(r["latency_ms"] or 0 for r in path),
            "cost": sum((r["cost"] for r in path), Decimal(0)),
            "requests": [_workflow_row(r) for r in path],
        },
        "requests": [_workflow_row(r) for r in rows[:1000]],
    }
    return Outcome(jsonable(body))


def _workflow_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in _WORKFLOW_ROW}


_WORKFLOW_ROW = (
    "request_id", "parent_request_id", "occurred_at", "workflow_step", "agent", "model",
    "task_type", "status", "latency_ms", "input_tokens", "output_tokens", "cost",
)  # fmt: skip


@action(
    "analyze_task_costs",
    "Cost and tokens by task type, intent, agent and workflow over a range, with per-request "
    "averages and share of the total.",
    staff_perm=VIEW_USAGE,
)
def analyze_task_costs(principal: Principal, data: Any) -> Outcome:
    return _over_range(
        TaskCostsIn,
        data,
        lambda p, since, until: selectors.task_costs(principal, since, until, limit=p.limit),
    )


def _over_range(
    schema: type[R], data: Any, answer: Callable[[R, Any, Any], dict[str, Any]]
) -> Outcome:
    """An analysis over a time range: validated input, its bounds, the answer with them."""
    params = validate(schema, data)
    since, until = params.bounds(timezone.now())
    return Outcome(jsonable({"since": since, "until": until, **answer(params, since, until)}))


@action(
    "analyze_patterns",
    "Duplicate requests, retry storms, deep chains, refused cycles, fan-out outliers and agent "
    "performance over a range, each finding naming its requests and the money at stake.",
    staff_perm=VIEW_USAGE,
)
def analyze_patterns(principal: Principal, data: Any) -> Outcome:
    def answer(p: PatternsIn, since: Any, until: Any) -> dict[str, Any]:
        return selectors.patterns(
            principal,
            since,
            until,
            window=timedelta(seconds=p.window_seconds),
            storm_min=p.storm_min,
            storm_window=timedelta(seconds=p.storm_seconds),
            depth_limit=p.depth_limit or int(settings.TOKENMGR_PROVENANCE_DEEP_CHAIN),
            limit=p.limit,
        )

    return _over_range(PatternsIn, data, answer)


@action(
    "get_question_costs",
    "The most expensive user questions (root requests) over a range, with their trees' totals; "
    "retries=once ranks them with each retried operation counted once.",
    staff_perm=VIEW_USAGE,
)
def get_question_costs(principal: Principal, data: Any) -> Outcome:
    def answer(p: QuestionsIn, since: Any, until: Any) -> dict[str, Any]:
        found = selectors.question_costs(
            principal, since, until, limit=p.limit, retries_once=p.retries == "once"
        )
        return {"retries": p.retries, **found}

    return _over_range(QuestionsIn, data, answer)
