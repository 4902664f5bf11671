"""Writes of provenance: the links of new usage rows (through the ingestion hook) and the
relationships API. No edge ever closes a cycle, and each request has at most one tree parent.

Depth and root live on the ledger row (usage.TokenUsage.depth / root_request_id): derived at
ingestion when the parent is already known, else resolved here once the parent arrives.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from provenance import sql
from provenance.models import CycleAttempt, ProvenanceRelationship
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.hooks import Refusal
from usage.models import RelationshipType
from usage.rows import ROW_INDEX, Row

logger = logging.getLogger(__name__)

_ID, _PARENT, _ROOT = (
    ROW_INDEX["request_id"],
    ROW_INDEX["parent_request_id"],
    ROW_INDEX["root_request_id"],
)
_REL, _DEPTH = ROW_INDEX["relationship"], ROW_INDEX["depth"]
DEFAULT_TYPE = RelationshipType.TRIGGERED_BY.value


def max_depth() -> int:
    return int(settings.TOKENMGR_PROVENANCE_MAX_DEPTH)


def cycle_text(path: Sequence[str]) -> str:
    return " → ".join(path)


def _too_deep(depth: int) -> Refusal:
    return Refusal(
        {
            "provenance.parent_request_id": [
                f"The chain would be {depth} deep; the maximum is {max_depth()} "
                "(TOKENMGR_PROVENANCE_MAX_DEPTH)."
            ]
        }
    )


def _cycle_error(path: Sequence[str]) -> Refusal:
    return Refusal(
        {"provenance.parent_request_id": [f"Would close a cycle: {cycle_text(path)}."]},
        conflict=True,
    )


def _attempt(
    tenant: str, from_id: str, to_id: str, type_: str, path: list[str], *, source: str, by: str
) -> None:
    CycleAttempt.objects.create(
        tenant=tenant,
        from_request_id=from_id,
        to_request_id=to_id,
        type=type_,
        path=path,
        source=source,
        attempted_at=timezone.now(),
        attempted_by=by,
    )


def _cycle_path(tenant: str, from_id: str, to_id: str) -> list[str] | None:
    """The cycle an edge from_id → to_id would close (from_id first and last), or None."""
    reached = sql.reachable_up(tenant, to_id, max_steps=max_depth() * 4)
    if from_id not in reached:
        return None
    back = [from_id]  # from_id, the request it was reached from, …, to_id
    while back[-1] != to_id:
        back.append(reached[back[-1]])
    return [from_id, *reversed(back)]


# --- ingestion (usage.hooks.Lineage) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Known:
    depth: int | None
    root: str


def _ledger_parents(tenant: str, ids: list[str]) -> dict[str, _Known]:
    if not ids:
        return {}
    where, params = sql.in_list("request_id", ids)
    rows = sql.fetch(
        f"SELECT request_id, depth, root_request_id FROM {sql.USAGE} WHERE tenant = %s AND {where}",
        [tenant, *params],
    )
    return {rid: _Known(depth, root) for rid, depth, root in rows}


def _with_edges_into(tenant: str, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    where, params = sql.in_list("to_request_id", ids)
    rows = sql.fetch(
        f"SELECT DISTINCT to_request_id FROM {sql.EDGES} WHERE tenant = %s AND {where}",
        [tenant, *params],
    )
    return {r[0] for r in rows}


class ProvenanceLineage:
    """Registered as usage's lineage hook (ProvenanceConfig.ready)."""

    def prepare(self, rows: list[Row], *, tenant: str) -> tuple[list[Row], list[Refusal | None]]:
        by_id = {row[_ID]: i for i, row in enumerate(rows)}
        linked = [i for i, row in enumerate(rows) if row[_PARENT]]
        outside = sorted({rows[i][_PARENT] for i in linked} - by_id.keys())
        ledger = _ledger_parents(tenant, outside)
        # Only a request something already links to can close a cycle by naming its parent.
        targets = _with_edges_into(tenant, [rows[i][_ID] for i in linked])
        refusals: list[Refusal | None] = [None for _row in rows]
        known: dict[int, _Known] = {}
        out = list(rows)
        for start in linked:
            # Walk up through this batch's rows to one whose depth is known (iteratively: a
            # batch may hold a chain as long as the batch).
            path: list[int] = []
            on_path: set[int] = set()
            i = start
            while i not in known and rows[i][_PARENT]:
                if i in on_path:  # a cycle inside the batch: refuse its last member
                    cycle = path[path.index(i) :]
                    last = max(cycle)
                    ids = [rows[j][_ID] for j in cycle]
                    turn = cycle.index(last)
                    ordered = [*ids[turn:], *ids[:turn], rows[last][_ID]]
                    refusals[last] = _cycle_error(ordered)
                    known[last] = _Known(None, "")
                    _attempt(
                        tenant, rows[last][_ID], rows[last][_PARENT],
                        rows[last][_REL] or DEFAULT_TYPE, ordered,
                        source=ProvenanceRelationship.Source.EVENT, by="",
                    )  # fmt: skip
                    break
                path.append(i)
                on_path.add(i)
                parent = by_id.get(rows[i][_PARENT])
                if parent is None or refusals[parent]:
                    break
                i = parent
            for j in reversed(path):
                if j in known:
                    continue
                parent_id = rows[j][_PARENT]
                p = by_id.get(parent_id)
                up = known.get(p) if p is not None else ledger.get(parent_id)
                if p is not None and up is None and not rows[p][_PARENT]:
                    up = _Known(0, rows[p][_ROOT])  # a root of this batch
                if p is not None and refusals[p]:
                    up = None  # the parent is refused: wait for it like any absent parent
                depth = None if up is None or up.depth is None else up.depth + 1
                root = rows[j][_ROOT] or (up.root if up and up.root else "")
                if not root and up is not None and up.depth is not None:
                    root = parent_id
                if depth is not None and depth > max_depth():
                    refusals[j] = _too_deep(depth)
                    depth = None
                known[j] = _Known(depth, root)
                if not refusals[j]:
                    row = list(out[j])
                    row[_DEPTH], row[_ROOT] = depth, root
                    out[j] = tuple(row)
        for i in linked:
            rid = rows[i][_ID]
            if rid in targets and not refusals[i]:
                closed = _cycle_path(tenant, rid, rows[i][_PARENT])
                if closed is not None:
                    refusals[i] = _cycle_error(closed)
                    _attempt(
                        tenant, rid, rows[i][_PARENT], rows[i][_REL] or DEFAULT_TYPE, closed,
                        source=ProvenanceRelationship.Source.EVENT, by="",
                    )  # fmt: skip
        return out, refusals

    def stored(self, keys: set[tuple[str, str]]) -> None:
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant, request_id in keys:
            by_tenant[tenant].append(request_id)
        for tenant, ids in by_tenant.items():
            _record_links(tenant, ids)


def _record_links(tenant: str, ids: list[str]) -> None:
    """The tree edges of one tenant's new rows, and the depth/root of rows that waited."""
    now = timezone.now()
    where, params = sql.in_list("u.request_id", ids)
    # New rows that need a closer look: waiting for a parent, or already linked to (by rows
    # that arrived before them). Others are resolved and cannot close a cycle.
    special = sql.fetch(
        f"""
        SELECT u.request_id, u.parent_request_id, u.relationship, u.depth,
               EXISTS (SELECT 1 FROM {sql.EDGES} e
                       WHERE e.tenant = u.tenant AND e.to_request_id = u.request_id)
        FROM {sql.USAGE} u
        WHERE u.tenant = %s AND {where} AND (
            (u.parent_request_id <> '' AND u.depth IS NULL)
            OR EXISTS (SELECT 1 FROM {sql.EDGES} e
                       WHERE e.tenant = u.tenant AND e.to_request_id = u.request_id))
        """,
        [tenant, *params],
    )
    # Rows with a parent that are waiting or linked to: the only ones whose link can close a
    # cycle (a resolved row's chain ends at a root). A cycle of waiting rows alone is found
    # here; one through an older edge enters a linked row, which is walked in SQL below.
    careful = {r[0]: r for r in special if r[1]}
    refused = _cycles_among({rid: r[1] for rid, r in careful.items()})
    linked = [r for r in careful.values() if r[4] and r[0] not in refused]
    held = [*refused, *(r[0] for r in linked)]
    not_held, held_params = sql.in_list("u.request_id", held) if held else ("1 = 0", [])
    sql.execute(
        f"""
        INSERT INTO {sql.EDGES}
            (tenant, from_request_id, to_request_id, type, is_tree, source, created_at, created_by)
        SELECT u.tenant, u.request_id, u.parent_request_id,
               CASE WHEN u.relationship = '' THEN %s ELSE u.relationship END,
               %s, %s, %s, ''
        FROM {sql.USAGE} u
        WHERE u.tenant = %s AND {where} AND u.parent_request_id <> '' AND NOT ({not_held})
        ON CONFLICT DO NOTHING
        """,
        [DEFAULT_TYPE, True, ProvenanceRelationship.Source.EVENT, now, tenant, *params,
         *held_params],
    )  # fmt: skip
    for request_id, path in refused.items():
        _refuse_link(tenant, careful[request_id], path)
    for row in linked:
        request_id, parent, relationship = row[0], row[1], row[2] or DEFAULT_TYPE
        cycle = _cycle_path(tenant, request_id, parent)
        if cycle is None:
            ProvenanceRelationship.objects.bulk_create(
                [_tree_edge(tenant, request_id, parent, relationship, now)],
                ignore_conflicts=True,
            )
        else:
            _refuse_link(tenant, row, cycle)
    if special:
        resolve_waiting(tenant, [r[0] for r in special])


def _cycles_among(parents: dict[str, str]) -> dict[str, list[str]]:
    """Cycles of parent links among these rows alone: for each, the row refused (the greatest
    id, so the choice does not depend on order) and the cycle's path."""
    refused: dict[str, list[str]] = {}
    done: set[str] = set()
    for start in parents:
        walk: list[str] = []
        node: str | None = start
        while node is not None and node in parents and node not in done:
            if node in walk:
                cycle = walk[walk.index(node) :]
                last = max(cycle)
                turn = cycle.index(last)
                refused[last] = [*cycle[turn:], *cycle[:turn], last]
                break
            walk.append(node)
            node = parents[node]
        done.update(walk)
    return refused


def _refuse_link(tenant: str, row: tuple[Any, ...], path: list[str]) -> None:
    # Acknowledged usage is stored whatever its link says: the link is refused, the request
    # becomes a root, and the attempt is kept for pattern analysis.
    request_id, parent, relationship = row[0], row[1], row[2] or DEFAULT_TYPE
    logger.warning("refused a lineage link that would close a cycle: %s", cycle_text(path))
    _attempt(
        tenant,
        request_id,
        parent,
        relationship,
        path,
        source=ProvenanceRelationship.Source.EVENT,
        by="",
    )
    sql.execute(
        f"UPDATE {sql.USAGE} SET depth = 0 WHERE tenant = %s AND request_id = %s",
        [tenant, request_id],
    )


def _tree_edge(
    tenant: str, from_id: str, to_id: str, type_: str, now: Any
) -> ProvenanceRelationship:
    return ProvenanceRelationship(
        tenant=tenant,
        from_request_id=from_id,
        to_request_id=to_id,
        type=type_,
        is_tree=True,
        source=ProvenanceRelationship.Source.EVENT,
        created_at=now,
    )


def resolve_waiting(tenant: str, ids: list[str]) -> int:
    """Depth and root of the waiting rows among `ids` and of every waiting row below them, from
    the nearest ancestor whose depth is known; returns how many rows were resolved."""
    child_in, p1 = sql.in_list("c.request_id", ids)
    parent_in, p2 = sql.in_list("p.request_id", ids)
    resolved = sql.fetch(
        f"""
        WITH RECURSIVE fix(node, depth, root) AS (
            SELECT c.request_id, p.depth + 1,
                   CASE WHEN c.root_request_id <> '' THEN c.root_request_id
                        WHEN p.root_request_id <> '' THEN p.root_request_id
                        ELSE p.request_id END
            FROM {sql.EDGES} e
            JOIN {sql.USAGE} c ON c.tenant = e.tenant AND c.request_id = e.from_request_id
            JOIN {sql.USAGE} p ON p.tenant = e.tenant AND p.request_id = e.to_request_id
            WHERE e.tenant = %s AND e.is_tree AND c.depth IS NULL AND p.depth IS NOT NULL
              AND ({child_in} OR {parent_in})
            UNION ALL
            SELECT e.from_request_id, fix.depth + 1,
                   CASE WHEN c.root_request_id <> '' THEN c.root_request_id ELSE fix.root END
            FROM fix
            JOIN {sql.EDGES} e ON e.tenant = %s AND e.to_request_id = fix.node AND e.is_tree
            JOIN {sql.USAGE} c ON c.tenant = e.tenant AND c.request_id = e.from_request_id
            WHERE c.depth IS NULL
        )
        SELECT node, depth, root FROM fix
        """,
        [tenant, *p1, *p2, tenant],
    )
    if not resolved:
        return 0
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {sql.USAGE} SET depth = %s, root_request_id = %s "
            "WHERE tenant = %s AND request_id = %s AND depth IS NULL",
            [(depth, root, tenant, node) for node, depth, root in resolved],
        )
    return len(resolved)


# --- the relationships API ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EdgeIn:
    from_request_id: str
    to_request_id: str
    type: str


def relationships_create(
    *, principal: Principal, tenant: str, edges: Sequence[EdgeIn]
) -> list[tuple[ProvenanceRelationship, bool]]:
    """Store typed relationships between requests the caller can see (both ends checked by the
    caller); each (edge, created) — an existing identical edge is answered, not duplicated.

    All or nothing: a cycle (409, naming its path) or a chain over the maximum depth (422)
    stores none of them. A refused cycle is kept as a CycleAttempt.
    """
    now = timezone.now()
    out: list[tuple[ProvenanceRelationship, bool]] = []
    refused: tuple[EdgeIn, list[str], int] | None = None
    with transaction.atomic():
        for index, edge in enumerate(edges):
            existing = ProvenanceRelationship.objects.filter(
                tenant=tenant,
                from_request_id=edge.from_request_id,
                to_request_id=edge.to_request_id,
                type=edge.type,
            ).first()
            if existing is not None:
                out.append((existing, False))
                continue
            path = _cycle_path(tenant, edge.from_request_id, edge.to_request_id)
            if path is not None:
                refused = (edge, path, index)
                break
            depth = len(sql.tree_ancestors(tenant, edge.to_request_id, max_steps=max_depth() + 1))
            below = sql.longest_down(tenant, edge.from_request_id, max_steps=max_depth() + 1)
            if depth + below > max_depth():
                raise ApiError(
                    "The relationship would make a chain too deep.",
                    fields={
                        _field(len(edges), index, "to_request_id"): [
                            f"The chain would be {depth + below} deep; the maximum is "
                            f"{max_depth()} (TOKENMGR_PROVENANCE_MAX_DEPTH)."
                        ]
                    },
                    status_code=422,
                )
            try:
                with transaction.atomic():
                    created = ProvenanceRelationship.objects.create(
                        tenant=tenant,
                        from_request_id=edge.from_request_id,
                        to_request_id=edge.to_request_id,
                        type=edge.type,
                        source=ProvenanceRelationship.Source.API,
                        created_at=now,
                        created_by=principal.label,
                    )
            except IntegrityError:  # the same edge, created concurrently
                created = ProvenanceRelationship.objects.get(
                    tenant=tenant,
                    from_request_id=edge.from_request_id,
                    to_request_id=edge.to_request_id,
                    type=edge.type,
                )
                out.append((created, False))
                continue
            out.append((created, True))
        if refused is not None:
            transaction.set_rollback(True)
    if refused is not None:
        edge, path, index = refused
        _attempt(
            tenant, edge.from_request_id, edge.to_request_id, edge.type, path,
            source=ProvenanceRelationship.Source.API, by=principal.label,
        )  # fmt: skip
        raise ApiError(
            f"The relationship would close a cycle: {cycle_text(path)}.",
            status_code=409,
            code="cycle",
            fields={_field(len(edges), index, "to_request_id"): [f"Cycle: {cycle_text(path)}."]},
        )
    return out


def _field(count: int, index: int, name: str) -> str:
    return name if count == 1 else f"relationships.{index}.{name}"
