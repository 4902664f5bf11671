"""Reads of provenance: a request's links, its lineage, workflows, cost attribution and the
patterns worth money. Scoped like usage: a scoped key sees only rows of its team or project,
and a lineage stops where the caller's scope ends. Walks and aggregates run in SQL."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Avg, Count, F, Max, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, NullIf

from provenance import sql
from provenance.models import CycleAttempt, ProvenanceRelationship
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.models import RelationshipType, TokenUsage
from usage.selectors import usage_for_principal

ZERO = Decimal(0)
# Columns a lineage node shows (and the graph drawings label with).
NODE_COLUMNS = (
    "pk", "tenant", "request_id", "occurred_at", "provider", "model", "input_tokens",
    "output_tokens", "cost", "agent", "agent_type", "task_type", "intent", "workflow_id",
    "workflow_step", "status", "relationship", "latency_ms", "cache_hit", "depth", "team_id",
    "project_id", "user_id", "parent_request_id", "root_request_id",
)  # fmt: skip
_CHUNK = 5000  # ids per IN (…) (SQLite binds at most 32,766 parameters)


# --- the permission gate -------------------------------------------------------------------------


def node_for_principal(
    principal: Principal, request_id: str, tenant: str | None = None
) -> TokenUsage:
    """The ledger row of `request_id` the caller may see: its own tenant's first; 404 when it
    sees none (another scope's request is answered exactly like a missing one)."""
    rows = usage_for_principal(principal).filter(request_id=request_id)
    if tenant:
        rows = rows.filter(tenant=tenant)
    found = list(rows.order_by("pk")[:20])
    if not found:
        raise ApiError(
            f"No request {request_id!r} in your scope.",
            status_code=404,
            code="not_found",
            fields={"request_id": ["Unknown request id (or not yet flushed from the buffer)."]},
        )
    own = [r for r in found if r.tenant == principal.tenant]
    if own:
        return own[0]
    if len({r.tenant for r in found}) > 1:
        raise ApiError(
            "Several tenants have this request id.",
            fields={
                "tenant": [f"Say whose: one of {', '.join(sorted({r.tenant for r in found}))}."]
            },
        )
    return found[0]


def _rows_by_id(tenant: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for row in TokenUsage.objects.filter(tenant=tenant, request_id__in=chunk).values(
            *NODE_COLUMNS
        ):
            out[row["request_id"]] = row
    return out


def _edges_among(tenant: str, ids: Sequence[str], *, tree: bool) -> list[ProvenanceRelationship]:
    found: list[ProvenanceRelationship] = []
    wanted = set(ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        edges = ProvenanceRelationship.objects.filter(
            tenant=tenant, is_tree=tree, from_request_id__in=chunk
        )
        found += [e for e in edges if e.to_request_id in wanted]
    return found


# --- one request ---------------------------------------------------------------------------------


def edge_out(edge: ProvenanceRelationship) -> dict[str, Any]:
    return {
        "id": edge.pk,
        "from_request_id": edge.from_request_id,
        "to_request_id": edge.to_request_id,
        "type": edge.type,
        "tree": edge.is_tree,
        "source": edge.source,
        "created_at": edge.created_at.isoformat(),
    }


def provenance_of(principal: Principal, row: TokenUsage) -> dict[str, Any]:
    """The row's provenance, and its edges out (what it relates to) and in (what relates to
    it) whose other end the caller may see too."""
    edges = ProvenanceRelationship.objects.filter(tenant=row.tenant)
    out_edges = list(edges.filter(from_request_id=row.request_id).order_by("pk")[:1000])
    in_edges = list(edges.filter(to_request_id=row.request_id).order_by("pk")[:1000])
    others = [e.to_request_id for e in out_edges] + [e.from_request_id for e in in_edges]
    present = _rows_by_id(row.tenant, others)
    visible = {
        rid
        for rid, other in present.items()
        if principal.covers(other["team_id"], other["project_id"])
    }
    return {
        "request_id": row.request_id,
        "tenant": row.tenant,
        "parent_request_id": row.parent_request_id,
        "root_request_id": row.root_request_id or row.request_id,
        "relationship": row.relationship,
        "depth": row.depth,
        "waiting_for_parent": row.depth is None,
        "intent": row.intent,
        "agent": row.agent,
        "agent_type": row.agent_type,
        "task_type": row.task_type,
        "workflow_id": row.workflow_id,
        "workflow_step": row.workflow_step,
        "conversation_id": row.conversation_id,
        "system_context": row.system_context,
        "input_hash": row.input_hash,
        "output_hash": row.output_hash,
        "cache_hit": row.cache_hit,
        # An edge to a request not recorded yet is shown: its id came from this row's sender.
        "edges_out": [
            edge_out(e)
            for e in out_edges
            if e.to_request_id in visible or e.to_request_id not in present
        ],
        "edges_in": [edge_out(e) for e in in_edges if e.from_request_id in visible],
    }


# --- lineage -------------------------------------------------------------------------------------


@dataclass(slots=True)
class LineageNode:
    row: dict[str, Any]
    parent: str | None
    level: int  # relative to the request asked about: ancestors < 0 < descendants
    subtree_cost: Decimal = ZERO
    subtree_tokens: int = 0
    subtree_size: int = 0

    @property
    def request_id(self) -> str:
        return str(self.row["request_id"])

    @property
    def tokens(self) -> int:
        return int(self.row["input_tokens"] + self.row["output_tokens"])


@dataclass(slots=True)
class Lineage:
    focus: TokenUsage
    nodes: list[LineageNode]  # parents before children
    links: list[ProvenanceRelationship] = field(default_factory=list)
    waiting_for: str = ""  # the top node's parent, not recorded (yet)
    cut_at_depth: bool = False

    def totals(self) -> dict[str, Any]:
        cost = sum((n.row["cost"] for n in self.nodes), ZERO)
        return {
            "nodes": len(self.nodes),
            "input_tokens": sum(n.row["input_tokens"] for n in self.nodes),
            "output_tokens": sum(n.row["output_tokens"] for n in self.nodes),
            "tokens": sum(n.tokens for n in self.nodes),
            "cost": cost,
            "errors": sum(1 for n in self.nodes if n.row["status"] == TokenUsage.Status.ERROR),
            "max_level": max((n.level for n in self.nodes), default=0),
        }


def _max_depth() -> int:
    return int(settings.TOKENMGR_PROVENANCE_MAX_DEPTH)


def lineage_of(
    principal: Principal,
    focus: TokenUsage,
    *,
    direction: str = "both",
    max_depth: int | None = None,
) -> Lineage:
    """Ancestors of `focus` up to its root and all its descendants (two recursive walks), each
    node with its own and subtree sums over the nodes returned; 422 over the node limit."""
    tenant = focus.tenant
    limit = int(settings.TOKENMGR_LINEAGE_MAX_NODES)
    up = (
        []
        if direction == "down"
        else sql.tree_ancestors(tenant, focus.request_id, max_steps=_max_depth() * 4)[1:]
    )
    steps = _max_depth() * 4 if max_depth is None else max_depth
    down = (
        []
        if direction == "up" or steps == 0
        else sql.tree_descendants(tenant, focus.request_id, max_steps=steps, limit=limit + 1)
    )
    if len(up) + len(down) + 1 > limit:
        raise ApiError(
            f"This lineage has more than {limit} requests.",
            status_code=422,
            code="too_large",
            fields={"max_depth": ["Ask for fewer levels (max_depth=) or one direction."]},
        )
    ids = [focus.request_id, *(node for node, _p in up), *(node for node, _p, _l in down)]
    rows = _rows_by_id(tenant, ids)

    def visible(rid: str) -> bool:
        row = rows.get(rid)
        return row is not None and principal.covers(row["team_id"], row["project_id"])

    chain: list[LineageNode] = []
    waiting_for = ""
    for level, (node, _parent) in enumerate(up, start=1):
        if not visible(node):
            if node not in rows:
                waiting_for = node
            break
        chain.append(LineageNode(rows[node], None, -level))
    chain.reverse()
    for upper, lower in itertools.pairwise(chain):
        lower.parent = upper.request_id
    me = LineageNode(rows[focus.request_id], chain[-1].request_id if chain else None, 0)
    if not chain and direction != "down":
        parent = focus.parent_request_id
        waiting_for = parent if parent and parent not in rows else waiting_for
    nodes = [*chain, me]
    kept = {n.request_id for n in nodes}
    cut = False
    for node, parent, level in sorted(down, key=lambda d: d[2]):
        if parent in kept and visible(node):
            nodes.append(LineageNode(rows[node], parent, level))
            kept.add(node)
        if max_depth is not None and level == max_depth:
            cut = True
    _subtree_sums(nodes)
    links = _edges_among(tenant, list(kept), tree=False)
    return Lineage(focus, nodes, links, waiting_for, cut)


def _subtree_sums(nodes: list[LineageNode]) -> None:
    by_id = {n.request_id: n for n in nodes}
    for node in nodes:
        node.subtree_cost, node.subtree_tokens, node.subtree_size = node.row["cost"], node.tokens, 1
    for node in reversed(nodes):  # children come after parents: each is complete when added
        if node.parent is not None and node.parent in by_id:
            up = by_id[node.parent]
            up.subtree_cost += node.subtree_cost
            up.subtree_tokens += node.subtree_tokens
            up.subtree_size += node.subtree_size


# --- workflows -----------------------------------------------------------------------------------

MAX_WORKFLOW_ROWS = 20_000


def _money_share(part: Decimal, whole: Decimal) -> str:
    return f"{(part / whole * 100):.2f}" if whole else "0.00"


def workflow_usage(
    principal: Principal, workflow_id: str, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """A workflow's requests, totals, per-step breakdown, the critical path (the chain of
    linked requests with the largest summed latency) and its bottleneck steps."""
    rows_q = usage_for_principal(principal).filter(workflow_id=workflow_id)
    if since:
        rows_q = rows_q.filter(occurred_at__gte=since)
    if until:
        rows_q = rows_q.filter(occurred_at__lt=until)
    rows = list(rows_q.order_by("occurred_at", "pk").values(*NODE_COLUMNS)[: MAX_WORKFLOW_ROWS + 1])
    if not rows:
        raise ApiError(
            f"No usage for workflow {workflow_id!r} in your scope.",
            status_code=404,
            code="not_found",
            fields={"workflow_id": ["Unknown workflow (or no usage in the range)."]},
        )
    truncated = len(rows) > MAX_WORKFLOW_ROWS
    rows = rows[:MAX_WORKFLOW_ROWS]
    total_cost = sum((r["cost"] for r in rows), ZERO)
    steps: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = r["workflow_step"] or r["task_type"] or r["agent"] or "(unnamed)"
        s = steps.setdefault(
            key,
            {"step": key, "requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": ZERO,
             "errors": 0, "latency_ms": 0, "first_at": r["occurred_at"],
             "last_at": r["occurred_at"]},
        )  # fmt: skip
        s["requests"] += 1
        s["input_tokens"] += r["input_tokens"]
        s["output_tokens"] += r["output_tokens"]
        s["cost"] += r["cost"]
        s["errors"] += r["status"] == TokenUsage.Status.ERROR
        s["latency_ms"] += r["latency_ms"] or 0
        s["last_at"] = r["occurred_at"]
    step_list = sorted(steps.values(), key=lambda s: s["first_at"])
    for s in step_list:
        s["mean_latency_ms"] = round(s["latency_ms"] / s["requests"], 1)
        s["cost_share_percent"] = _money_share(s["cost"], total_cost)
    path = _critical_path(rows)
    slowest = max(step_list, key=lambda s: (s["latency_ms"], s["cost"]))
    dearest = max(step_list, key=lambda s: (s["cost"], s["latency_ms"]))
    return {
        "workflow_id": workflow_id,
        "rows": rows,
        "truncated": truncated,
        "totals": {
            "requests": len(rows),
            "input_tokens": sum(r["input_tokens"] for r in rows),
            "output_tokens": sum(r["output_tokens"] for r in rows),
            "tokens": sum(r["input_tokens"] + r["output_tokens"] for r in rows),
            "cost": total_cost,
            "errors": sum(1 for r in rows if r["status"] == TokenUsage.Status.ERROR),
            "latency_ms": sum(r["latency_ms"] or 0 for r in rows),
        },
        "steps": step_list,
        "critical_path": path,
        "bottleneck": {"slowest_step": slowest["step"], "most_expensive_step": dearest["step"]},
    }


def _critical_path(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The root-to-leaf chain (by parent links inside the workflow) with the largest summed
    latency; iterative, so a long chain cannot exhaust the stack."""
    by_id = {r["request_id"]: r for r in rows}
    children: dict[str, list[str]] = defaultdict(list)
    roots: list[str] = []
    for r in rows:
        parent = r["parent_request_id"]
        if parent and parent in by_id and r["depth"] != 0:  # depth 0: its link was refused
            children[parent].append(r["request_id"])
        else:
            roots.append(r["request_id"])
    best: dict[str, tuple[int, str | None]] = {}  # id -> (latency of best chain from it, next)
    order: list[str] = []
    stack = list(roots)
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(children[node])
    for node in reversed(order):
        own = by_id[node]["latency_ms"] or 0
        tail = max(((best[c][0], c) for c in children[node] if c in best), default=(0, None))
        best[node] = (own + tail[0], tail[1])
    if not best:
        return []
    start = max(roots, key=lambda r: best.get(r, (0, None))[0])
    path: list[dict[str, Any]] = []
    step: str | None = start
    while step is not None:
        path.append(by_id[step])
        step = best[step][1]
    return path


# --- cost attribution ----------------------------------------------------------------------------

TASK_DIMENSIONS = ("task_type", "intent", "agent", "workflow_id")


def _in_range(principal: Principal, since: datetime, until: datetime) -> QuerySet[TokenUsage]:
    return usage_for_principal(principal).filter(occurred_at__gte=since, occurred_at__lt=until)


def _sums() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "input_tokens": Coalesce(Sum("input_tokens"), 0),
        "output_tokens": Coalesce(Sum("output_tokens"), 0),
        "cost": Coalesce(Sum("cost"), Value(ZERO)),
    }


def task_costs(
    principal: Principal, since: datetime, until: datetime, *, limit: int
) -> dict[str, Any]:
    """Cost and tokens by task type, intent, agent and workflow, each group with its
    per-request averages and share of the total (one aggregate query per dimension)."""
    rows = _in_range(principal, since, until)
    totals = rows.aggregate(**_sums())
    whole = totals["cost"]
    breakdowns: dict[str, list[dict[str, Any]]] = {}
    for dim in TASK_DIMENSIONS:
        groups = rows.values(dim).annotate(**_sums()).order_by("-cost", dim)[:limit]
        breakdowns[dim] = [
            {
                "value": g[dim],
                **{k: g[k] for k in ("requests", "input_tokens", "output_tokens", "cost")},
                "cost_per_request": g["cost"] / g["requests"] if g["requests"] else ZERO,
                "tokens_per_request": round(
                    (g["input_tokens"] + g["output_tokens"]) / g["requests"], 1
                )
                if g["requests"]
                else 0,
                "cost_share_percent": _money_share(g["cost"], whole),
            }
            for g in groups
        ]
    return {"totals": totals, "breakdowns": breakdowns}


# --- patterns ------------------------------------------------------------------------------------

IDS_SHOWN = 20  # request ids named per finding


def _ids(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.append(v)
        if len(out) == IDS_SHOWN:
            break
    return out


def duplicate_requests(
    rows: QuerySet[TokenUsage], *, window: timedelta, limit: int
) -> dict[str, Any]:
    """Requests whose input (hash) and model repeat an earlier request within `window`: what
    a cache would have saved is their cost."""
    repeated = (
        rows.exclude(input_hash="")
        .values("input_hash")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values("input_hash")
    )
    found = (
        rows.filter(input_hash__in=repeated)
        .order_by("input_hash", "model", "occurred_at", "pk")
        .values_list("input_hash", "model", "request_id", "occurred_at", "cost")
    )
    groups: list[dict[str, Any]] = []
    current: tuple[str, str] | None = None
    last_at: datetime | None = None
    group: dict[str, Any] = {}
    for input_hash, model, rid, at, cost in found.iterator(chunk_size=5000):
        if (input_hash, model) != current:
            if group.get("duplicates"):
                groups.append(group)
            current, last_at = (input_hash, model), None
            group = {"input_hash": input_hash, "model": model, "requests": 0, "duplicates": 0,
                     "savings": ZERO, "request_ids": []}  # fmt: skip
        group["requests"] += 1
        if len(group["request_ids"]) < IDS_SHOWN:
            group["request_ids"].append(rid)
        if last_at is not None and at - last_at <= window:
            group["duplicates"] += 1
            group["savings"] += cost
        last_at = at
    if group.get("duplicates"):
        groups.append(group)
    groups.sort(key=lambda g: (-g["savings"], g["input_hash"]))
    return {
        "groups": len(groups),
        "duplicate_requests": sum(g["duplicates"] for g in groups),
        "savings": sum((g["savings"] for g in groups), ZERO),
        "findings": groups[:limit],
    }


def _scope_sql(principal: Principal, alias: str) -> tuple[str, list[Any]]:
    where, params = "", []
    if principal.team_id:
        where += f" AND {alias}.team_id = %s"
        params.append(principal.team_id)
    if principal.project_id:
        where += f" AND {alias}.project_id = %s"
        params.append(principal.project_id)
    return where, params


def retry_storms(
    principal: Principal,
    since: datetime,
    until: datetime,
    *,
    storm_min: int,
    storm_window: timedelta,
    limit: int,
) -> dict[str, Any]:
    """Operations retried at least `storm_min` times within `storm_window` (retries of
    retries count for the original). Waste: every attempt's cost but the last successful one."""
    scope, scope_params = _scope_sql(principal, "r")
    retries = sql.fetch(
        f"""
        SELECT e.tenant, e.from_request_id, e.to_request_id, r.occurred_at, r.cost, r.status
        FROM {sql.EDGES} e
        JOIN {sql.USAGE} r ON r.tenant = e.tenant AND r.request_id = e.from_request_id
        WHERE e.type = %s AND r.occurred_at >= %s AND r.occurred_at < %s {scope}
        """,
        [RelationshipType.RETRY_OF.value, since, until, *scope_params],
    )
    target = {(t, f): to for t, f, to, _a, _c, _s in retries}

    def original(tenant: str, rid: str) -> str:
        seen = {rid}
        while (tenant, rid) in target and target[(tenant, rid)] not in seen:
            rid = target[(tenant, rid)]
            seen.add(rid)
        return rid

    attempts: dict[tuple[str, str], list[tuple[datetime, str, Decimal, str]]] = defaultdict(list)
    for tenant, rid, _to, at, cost, status in retries:
        # A raw query on SQLite answers a decimal column as a float, and a time as text.
        attempts[(tenant, original(tenant, rid))].append(
            (_instant(at), rid, Decimal(str(cost)), status)
        )
    storms_found: list[dict[str, Any]] = []
    candidates = {k: v for k, v in attempts.items() if len(v) >= storm_min}
    originals = _originals(candidates)
    for (tenant, op), tries in candidates.items():
        tries.sort()
        left, burst = 0, 0
        for right in range(len(tries)):
            while tries[right][0] - tries[left][0] > storm_window:
                left += 1
            burst = max(burst, right - left + 1)
        if burst < storm_min:
            continue
        first = originals.get((tenant, op))
        everything = [(first["occurred_at"], op, first["cost"], first["status"])] if first else []
        everything += tries
        succeeded = [t for t in everything if t[3] == TokenUsage.Status.SUCCESS]
        kept = succeeded[-1][2] if succeeded else ZERO
        cost = sum((t[2] for t in everything), ZERO)
        storms_found.append(
            {
                "operation": op,
                "retries": len(tries),
                "largest_burst": burst,
                "first_at": tries[0][0],
                "last_at": tries[-1][0],
                "succeeded": bool(succeeded),
                "cost": cost,
                "waste": cost - kept,
                "request_ids": _ids([op, *(t[1] for t in tries)]),
            }
        )
    storms_found.sort(key=lambda s: (-s["waste"], s["operation"]))
    return {
        "storms": len(storms_found),
        "waste": sum((s["waste"] for s in storms_found), ZERO),
        "findings": storms_found[:limit],
    }


def _instant(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _originals(candidates: dict[tuple[str, str], Any]) -> dict[tuple[str, str], dict[str, Any]]:
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for tenant, op in candidates:
        by_tenant[tenant].append(op)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for tenant, ops in by_tenant.items():
        for rid, row in _rows_by_id(tenant, ops).items():
            out[(tenant, rid)] = row
    return out


def deep_chains(rows: QuerySet[TokenUsage], *, depth_limit: int, limit: int) -> dict[str, Any]:
    """Trees with requests deeper than `depth_limit`: what the requests past it cost."""
    root = Coalesce(NullIf(F("root_request_id"), Value("")), F("request_id"))
    groups = (
        rows.filter(depth__gt=depth_limit)
        .annotate(root=root)
        .values("tenant", "root")
        .annotate(
            requests=Count("id"),
            max_depth=Max("depth"),
            cost=Coalesce(Sum("cost"), Value(ZERO)),
            tokens=Coalesce(Sum(F("input_tokens") + F("output_tokens")), 0),
        )
        .order_by("-cost", "root")
    )
    found = list(groups[:limit])
    deepest = {
        (g["tenant"], g["root"]): list(
            rows.filter(tenant=g["tenant"], depth=g["max_depth"])
            .filter(Q(root_request_id=g["root"]))
            .values_list("request_id", flat=True)[:IDS_SHOWN]
        )
        for g in found
    }
    return {
        "depth_limit": depth_limit,
        "chains": groups.count(),
        "cost": rows.filter(depth__gt=depth_limit).aggregate(c=Coalesce(Sum("cost"), Value(ZERO)))[
            "c"
        ],
        "findings": [
            {
                "root_request_id": g["root"],
                "max_depth": g["max_depth"],
                "requests_past_limit": g["requests"],
                "cost": g["cost"],
                "tokens": g["tokens"],
                "request_ids": deepest[(g["tenant"], g["root"])],
            }
            for g in found
        ],
    }


def _tenants_of(principal: Principal) -> Q:
    if principal.project_id:
        return Q(tenant=principal.tenant)
    if principal.team_id:
        return Q(tenant=principal.tenant) | Q(tenant__startswith=f"p:{principal.team_id}/")
    return Q()


def cycle_attempts(
    principal: Principal, since: datetime, until: datetime, *, limit: int
) -> dict[str, Any]:
    """Relationships refused because they would have closed a cycle (in the caller's tenants)."""
    attempts = CycleAttempt.objects.filter(
        _tenants_of(principal), attempted_at__gte=since, attempted_at__lt=until
    )
    found = list(attempts.order_by("-attempted_at", "-pk")[:limit])
    costs: dict[str, Decimal] = {}
    for a in found:
        rows = _rows_by_id(a.tenant, list(a.path))
        costs[str(a.pk)] = sum(
            (r["cost"] for r in rows.values() if principal.covers(r["team_id"], r["project_id"])),
            ZERO,
        )
    return {
        "attempts": attempts.count(),
        "findings": [
            {
                "from_request_id": a.from_request_id,
                "to_request_id": a.to_request_id,
                "type": a.type,
                "path": a.path,
                "source": a.source,
                "attempted_at": a.attempted_at,
                "cost": costs[str(a.pk)],
                "request_ids": _ids(dict.fromkeys(a.path)),
            }
            for a in found
        ],
    }


FANOUT_MIN = 10


def fan_out_outliers(rows: QuerySet[TokenUsage], *, limit: int) -> dict[str, Any]:
    """Requests with far more direct children than is usual (robust: median + 6 MAD, and at
    least FANOUT_MIN): what their children cost. The ledger is grouped once."""
    groups = (
        rows.exclude(parent_request_id="")
        .values("tenant", "parent_request_id")
        .annotate(
            n=Count("id"),
            cost=Coalesce(Sum("cost"), Value(ZERO)),
            tokens=Coalesce(Sum(F("input_tokens") + F("output_tokens")), 0),
        )
        .values("parent_request_id", "n", "cost", "tokens")
    )
    inner, params = groups.query.sql_with_params()
    if connection.vendor == "postgresql":
        median, threshold, total, found = _fan_out_pg(inner, list(params), limit)
    else:
        median, threshold, total, found = _fan_out_portable(groups, limit)
    return {
        "median_children": median,
        "threshold": threshold,
        "outliers": total,
        "findings": [
            {
                "request_id": parent,
                "children": n,
                "children_cost": Decimal(str(cost)),
                "children_tokens": tokens,
                "request_ids": [parent],
            }
            for parent, n, cost, tokens in found
        ],
    }


FanOut = tuple[float | None, int | None, int, list[tuple[str, int, Any, int]]]


def _fan_out_pg(inner: str, params: list[Any], limit: int) -> FanOut:
    rows = sql.fetch(
        f"""
        WITH g AS MATERIALIZED ({inner}),
        s AS (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY n) AS med FROM g),
        t AS (
            SELECT s.med, GREATEST(%s, floor(s.med + 6 * GREATEST(1, (
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(g.n - s.med)) FROM g
            ))))::int AS thr
            FROM s
        )
        SELECT t.med, t.thr, o.parent_request_id, o.n, o.cost, o.tokens, o.total
        FROM t LEFT JOIN LATERAL (
            SELECT g.parent_request_id, g.n, g.cost, g.tokens, COUNT(*) OVER () AS total
            FROM g WHERE g.n > t.thr ORDER BY g.n DESC, g.parent_request_id LIMIT %s
        ) o ON true
        """,
        [*params, FANOUT_MIN, limit],
    )
    median, threshold = rows[0][0], rows[0][1]
    found = [(r[2], r[3], r[4], r[5]) for r in rows if r[2] is not None]
    total = int(rows[0][6]) if found else 0
    return median, threshold, total, found


def _weighted_median(pairs: Iterable[tuple[float, int]]) -> float:
    """The median of values given as (value, how many times), as statistics.median has it."""
    ordered = sorted(pairs)
    size = sum(c for _v, c in ordered)
    wanted = [(size - 1) // 2, size // 2]  # the middle one or two positions
    found: list[float] = []
    seen = 0
    for value, count in ordered:
        while wanted and wanted[0] < seen + count:
            found.append(value)
            wanted.pop(0)
        seen += count
    return sum(found) / len(found)


def _fan_out_portable(groups: QuerySet[Any], limit: int) -> FanOut:
    inner, params = groups.query.sql_with_params()
    histogram = sql.fetch(f"SELECT n, COUNT(*) FROM ({inner}) g GROUP BY n", params)
    if not histogram:
        return None, None, 0, []
    median = _weighted_median((n, c) for n, c in histogram)
    mad = _weighted_median((abs(n - median), c) for n, c in histogram)
    threshold = max(FANOUT_MIN, int(median + 6 * max(mad, 1)))
    outliers = groups.filter(n__gt=threshold).order_by("-n", "parent_request_id")
    found = [(g["parent_request_id"], g["n"], g["cost"], g["tokens"]) for g in outliers[:limit]]
    return median, threshold, outliers.count(), found


def agent_performance(rows: QuerySet[TokenUsage], *, limit: int) -> list[dict[str, Any]]:
    groups: Any = (
        rows.values("agent")
        .annotate(
            **_sums(),
            errors=Count("id", filter=Q(status=TokenUsage.Status.ERROR)),
            cache_hits=Count("id", filter=Q(cache_hit=True)),
            cache_known=Count("id", filter=Q(cache_hit__isnull=False)),
            mean_latency_ms=Avg("latency_ms"),
        )
        .order_by("-cost", "agent")[:limit]
    )
    return [
        {
            "agent": g["agent"],
            "requests": g["requests"],
            "input_tokens": g["input_tokens"],
            "output_tokens": g["output_tokens"],
            "cost": g["cost"],
            "error_rate_percent": f"{g['errors'] / g['requests'] * 100:.2f}",
            "cache_hit_rate_percent": f"{g['cache_hits'] / g['cache_known'] * 100:.2f}"
            if g["cache_known"]
            else None,
            "mean_latency_ms": round(g["mean_latency_ms"], 1)
            if g["mean_latency_ms"] is not None
            else None,
        }
        for g in groups
    ]


ANALYSIS_WORK_MEM = "64MB"


def patterns(
    principal: Principal,
    since: datetime,
    until: datetime,
    *,
    window: timedelta,
    storm_min: int,
    storm_window: timedelta,
    depth_limit: int,
    limit: int,
) -> dict[str, Any]:
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Each section groups up to the whole range: sorts and hashes stay in memory.
            sql.execute(f"SET LOCAL work_mem = '{ANALYSIS_WORK_MEM}'", [])
        rows = _in_range(principal, since, until)
        return {
            "duplicates": duplicate_requests(rows, window=window, limit=limit),
            "retry_storms": retry_storms(
                principal, since, until, storm_min=storm_min, storm_window=storm_window, limit=limit
            ),
            "deep_chains": deep_chains(rows, depth_limit=depth_limit, limit=limit),
            "cycles_attempted": cycle_attempts(principal, since, until, limit=limit),
            "fan_out": fan_out_outliers(rows, limit=limit),
            "agents": agent_performance(rows, limit=limit),
        }


# --- cost per user question ----------------------------------------------------------------------


def question_costs(
    principal: Principal, since: datetime, until: datetime, *, limit: int, retries_once: bool
) -> dict[str, Any]:
    """The root requests (user questions) whose trees cost most in the range, with the tree
    totals; `retries_once` ranks by cost without retries (`retry_of` requests), the waste apart."""
    root = Coalesce(NullIf(F("root_request_id"), Value("")), F("request_id"))
    retry = Q(relationship=RelationshipType.RETRY_OF)
    trees = (
        _in_range(principal, since, until)
        .annotate(root=root)
        .values("tenant", "root")
        .annotate(
            requests=Count("id"),
            tokens=Coalesce(Sum(F("input_tokens") + F("output_tokens")), 0),
            spent=Coalesce(Sum("cost"), Value(ZERO)),
            retry_cost=Coalesce(Sum("cost", filter=retry), Value(ZERO)),
            retries=Count("id", filter=retry),
            errors=Count("id", filter=Q(status=TokenUsage.Status.ERROR)),
            max_depth=Max("depth"),
        )
    )
    ordered = trees.order_by(
        (F("spent") - F("retry_cost")).desc() if retries_once else F("spent").desc(), "root"
    )
    top = list(ordered[:limit])
    roots: dict[tuple[str, str], dict[str, Any]] = {}
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for t in top:
        by_tenant[t["tenant"]].append(t["root"])
    for tenant, ids in by_tenant.items():
        for rid, row in _rows_by_id(tenant, ids).items():
            roots[(tenant, rid)] = row
    return {
        "questions": [
            {
                "root_request_id": t["root"],
                "root": _root_summary(roots.get((t["tenant"], t["root"]))),
                "requests": t["requests"],
                "tokens": t["tokens"],
                "cost": t["spent"],
                "retries": t["retries"],
                "retry_waste": t["retry_cost"],
                "cost_without_retries": t["spent"] - t["retry_cost"],
                "errors": t["errors"],
                "max_depth": t["max_depth"],
            }
            for t in top
        ]
    }


def _root_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None  # the root request is outside the range or not recorded (yet)
    return {
        k: row[k]
        for k in ("occurred_at", "agent", "model", "intent", "user_id", "task_type", "status")
    }
