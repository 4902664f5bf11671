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
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from provenance import sql
from provenance.models import CycleAttempt, ProvenanceRelationship
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import hooks
from usage.hooks import Refusal
from usage.models import RelationshipType
from usage.rows import Row, copy_text, row_lineage, row_with_lineage
from usage.services import retention_cutoff

logger = logging.getLogger(__name__)

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
    depth: int | None  # None: waits for its parent
    root: str


def _stored_rows(tenant: str, ids: Sequence[str]) -> dict[str, _Known]:
    """Depth and root of those of `ids` the ledger holds (one query)."""
    if not ids:
        return {}
    where, params = sql.in_list("request_id", ids)
    rows = sql.fetch(
        f"SELECT request_id, depth, root_request_id FROM {sql.USAGE} WHERE tenant = %s AND {where}",
        [tenant, *params],
    )
    return {rid: _Known(depth, root) for rid, depth, root in rows}


def _waited_for(tenant: str, ids: Sequence[str]) -> set[str]:
    """Those of `ids` that stored rows wait for (their children arrived first). They are the
    only new requests an edge can already point to: relationships through the API join
    recorded requests, and a child whose parent was absent waits (usage_lineage_pending_idx)."""
    if not ids:
        return set()
    where, params = sql.in_list("parent_request_id", ids)
    rows = sql.fetch(
        f"SELECT DISTINCT parent_request_id FROM {sql.USAGE} "
        f"WHERE tenant = %s AND depth IS NULL AND {where}",
        [tenant, *params],
    )
    return {r[0] for r in rows}


def _below(parent: _Known, parent_id: str, own_root: str) -> _Known:
    assert parent.depth is not None
    return _Known(parent.depth + 1, own_root or parent.root or parent_id)


def _derive(
    items: Sequence[hooks.Link], stored: dict[str, _Known]
) -> tuple[list[_Known], dict[int, list[str]]]:
    """Depth and root of one tenant's new rows, from their parents among them or in `stored`;
    and the rows whose link closes a cycle among them (the latest of each cycle) with its path.
    Iterative: a batch may hold a chain as long as the batch."""
    by_id = {link.request_id: i for i, link in enumerate(items)}
    known: list[_Known | None] = [
        _Known(0, link.root)
        if not link.parent
        else (_Known(link.depth, link.root) if link.depth is not None else None)
        for link in items
    ]
    cycles: dict[int, list[str]] = {}
    for start in range(len(items)):
        path: list[int] = []
        on_path: set[int] = set()
        i: int | None = start
        while i is not None and known[i] is None:
            if i in on_path:
                cycle = path[path.index(i) :]
                last = max(cycle)
                ids = [items[j].request_id for j in cycle]
                turn = cycle.index(last)
                cycles[last] = [*ids[turn:], *ids[:turn], items[last].request_id]
                known[last] = _Known(None, items[last].root)  # its link is refused
                break
            path.append(i)
            on_path.add(i)
            i = by_id.get(items[i].parent)
        for j in reversed(path):
            if known[j] is not None:
                continue
            link = items[j]
            p = by_id.get(link.parent)
            up = (None if p in cycles else known[p]) if p is not None else stored.get(link.parent)
            known[j] = (
                _below(up, link.parent, link.root)
                if up is not None and up.depth is not None
                else _Known(None, link.root or (up.root if up else ""))
            )
    return [k if k is not None else _Known(None, "") for k in known], cycles


def _event_attempt(tenant: str, link: hooks.Link, path: list[str]) -> None:
    _attempt(
        tenant, link.request_id, link.parent, link.relationship or DEFAULT_TYPE, path,
        source=ProvenanceRelationship.Source.EVENT, by="",
    )  # fmt: skip


class ProvenanceLineage:
    """Registered as usage's lineage hook (ProvenanceConfig.ready)."""

    def prepare(self, rows: list[Row], *, tenant: str) -> tuple[list[Row], list[Refusal | None]]:
        links = [hooks.Link(tenant, *row_lineage(row)) for row in rows]
        mine = {link.request_id for link in links}
        stored = _stored_rows(tenant, sorted({lk.parent for lk in links if lk.parent} - mine))
        known, cycles = _derive(links, stored)
        # Only a request something already links to can close a cycle through stored edges.
        targets = _waited_for(tenant, [lk.request_id for lk in links if lk.parent])
        refusals: list[Refusal | None] = [None for _row in rows]
        out = list(rows)
        for i, link in enumerate(links):
            if not link.parent:
                continue
            path = cycles.get(i)
            if path is None and link.request_id in targets:
                path = _cycle_path(tenant, link.request_id, link.parent)
            depth = known[i].depth
            if path is not None:
                refusals[i] = _cycle_error(path)
                _event_attempt(tenant, link, path)
            elif depth is not None and depth > max_depth():
                refusals[i] = _too_deep(depth)
            elif depth is not None:
                out[i] = row_with_lineage(out[i], depth, known[i].root)
            elif known[i].root:
                out[i] = row_with_lineage(out[i], None, known[i].root)  # still waits
        return out, refusals

    def storing(
        self, links: list[hooks.Link], *, new_only: bool = False
    ) -> dict[int, tuple[int, str]]:
        by_tenant: dict[str, list[int]] = defaultdict(list)
        for i, link in enumerate(links):
            by_tenant[link.tenant].append(i)
        changed: dict[int, tuple[int, str]] = {}
        for tenant in sorted(by_tenant):  # one order everywhere: two inserts cannot deadlock
            _serialise(tenant)
            items = [(i, links[i]) for i in by_tenant[tenant]]
            changed.update(_store_links(tenant, items, new_only=new_only))
        return changed


# Advisory lock class of "one tenant's ledger inserts" (the second key is the tenant's hash).
_LOCK_CLASS = 7411


def _serialise(tenant: str) -> None:
    """Make concurrent inserts of one tenant's rows take turns until commit: otherwise a child
    and its parent committed side by side never see each other, and the child waits forever."""
    if connection.vendor == "postgresql":
        sql.fetch("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [_LOCK_CLASS, tenant])


def _store_links(
    tenant: str, items: list[tuple[int, hooks.Link]], *, new_only: bool
) -> dict[int, tuple[int, str]]:
    """One tenant's part of `storing`: tree edges for the rows' links (none closing a cycle),
    then the depth and root of every row that waited for one of them, level by level."""
    ids = {link.request_id for _i, link in items}
    parents = {link.parent for _i, link in items if link.parent}
    present = _stored_rows(tenant, sorted(parents - ids if new_only else ids | parents))
    # A row the ledger holds already is a duplicate: the insert leaves it out, and so do we.
    fresh = [(i, link) for i, link in items if link.request_id not in present]
    if not fresh:
        return {}
    links = [link for _i, link in fresh]
    known, cycles = _derive(links, present)
    targets = _waited_for(tenant, [link.request_id for link in links])
    refused: dict[int, list[str]] = dict(cycles)
    careful = [k for k, lk in enumerate(links) if lk.parent and lk.request_id in targets]
    plain = [k for k, lk in enumerate(links) if lk.parent and k not in refused and k not in careful]
    now = timezone.now()
    _insert_tree_edges(tenant, [links[k] for k in plain], now, new_only=new_only)
    for k in careful:  # linked to already: may close a cycle through older edges
        path = refused.get(k) or _cycle_path(tenant, links[k].request_id, links[k].parent)
        if path is None:
            _insert_tree_edges(tenant, [links[k]], now)
        else:
            refused[k] = path
    for k, path in refused.items():
        # Acknowledged usage is stored whatever its link says: the link is refused, the
        # request becomes a root, and the attempt is kept for pattern analysis.
        logger.warning("refused a lineage link that would close a cycle: %s", cycle_text(path))
        _event_attempt(tenant, links[k], path)
        known[k] = _Known(0, links[k].root)
    waiting_db = _resolve_below(tenant, links, known, refused, targets)
    if waiting_db:
        _update_depths(tenant, waiting_db)
    return {
        fresh[k][0]: (kn.depth, kn.root)
        for k, kn in enumerate(known)
        if kn.depth is not None and (kn.depth != links[k].depth or kn.root != links[k].root)
    }


def _resolve_below(
    tenant: str,
    links: list[hooks.Link],
    known: list[_Known],
    refused: dict[int, list[str]],
    targets: set[str],
) -> list[tuple[str, int, str]]:
    """Resolve, level by level from the rows now known, the new rows (in `known`) and the
    stored rows that waited for them; returns the stored ones' (request_id, depth, root)."""
    waiting_here: dict[str, list[int]] = defaultdict(list)
    for k, link in enumerate(links):
        if known[k].depth is None and link.parent:
            waiting_here[link.parent].append(k)
    # Level 0: new rows known now that something waits for (here, or stored: `targets`).
    frontier = {
        lk.request_id: known[k]
        for k, lk in enumerate(links)
        if known[k].depth is not None
        and (lk.request_id in waiting_here or lk.request_id in targets or k in refused)
    }
    new_ids = {lk.request_id for lk in links}
    found: list[tuple[str, int, str]] = []
    while frontier:
        nxt: dict[str, _Known] = {}
        for parent_id, up in frontier.items():
            for k in waiting_here.pop(parent_id, []):
                known[k] = _below(up, parent_id, links[k].root)
                nxt[links[k].request_id] = known[k]
        # Stored rows wait only below a stored row resolved here, or a new one linked to.
        ask = [rid for rid in frontier if rid not in new_ids or rid in targets]
        for rid, root, parent_id in _waiting_children(tenant, ask):
            below = _below(frontier[parent_id], parent_id, root)
            found.append((rid, below.depth, below.root))  # type: ignore[arg-type]
            nxt[rid] = below
        frontier = nxt
    return found


def _waiting_children(tenant: str, parent_ids: list[str]) -> list[tuple[str, str, str]]:
    """(request_id, root_request_id, parent) of stored rows waiting for one of `parent_ids`
    (served by usage_lineage_pending_idx)."""
    if not parent_ids:
        return []
    where, params = sql.in_list("parent_request_id", parent_ids)
    return [
        (rid, root, parent)
        for rid, root, parent in sql.fetch(
            f"SELECT request_id, root_request_id, parent_request_id FROM {sql.USAGE} "
            f"WHERE tenant = %s AND depth IS NULL AND {where}",
            [tenant, *params],
        )
    ]


_EDGE_COLUMNS = (
    "tenant, from_request_id, to_request_id, type, is_tree, source, created_at, created_by"
)


def _insert_tree_edges(
    tenant: str, links: list[hooks.Link], now: Any, *, new_only: bool = False
) -> None:
    """`new_only`: the edges' requests are all new (an edge from one cannot exist yet), so they
    are COPYed; a conflict anyway fails the whole insert, which the ledger then retries
    row by row (usage.services.ledger._insert_staged)."""
    if not links:
        return
    if connection.vendor == "postgresql" and new_only:
        head = f"{copy_text(tenant)}\t"
        tail = f"\tt\t{ProvenanceRelationship.Source.EVENT.value}\t{now.isoformat()}\t\n"
        data = "".join(
            f"{head}{copy_text(lk.request_id)}\t{copy_text(lk.parent)}\t"
            f"{lk.relationship or DEFAULT_TYPE}{tail}"
            for lk in links
        )
        with (
            connection.cursor() as cursor,
            cursor.cursor.copy(f"COPY {sql.EDGES} ({_EDGE_COLUMNS}) FROM STDIN") as copy,
        ):
            copy.write(data)
        return
    if connection.vendor == "postgresql":
        # One statement with array parameters, however many edges.
        sql.execute(
            f"""
            INSERT INTO {sql.EDGES} ({_EDGE_COLUMNS})
            SELECT %s, f, t, y, true, %s, %s, ''
            FROM unnest(%s::varchar[], %s::varchar[], %s::varchar[]) AS x(f, t, y)
            ON CONFLICT DO NOTHING
            """,
            [
                tenant,
                ProvenanceRelationship.Source.EVENT.value,
                now,
                [lk.request_id for lk in links],
                [lk.parent for lk in links],
                [lk.relationship or DEFAULT_TYPE for lk in links],
            ],
        )
        return
    ProvenanceRelationship.objects.bulk_create(
        [
            ProvenanceRelationship(
                tenant=tenant,
                from_request_id=lk.request_id,
                to_request_id=lk.parent,
                type=lk.relationship or DEFAULT_TYPE,
                is_tree=True,
                source=ProvenanceRelationship.Source.EVENT,
                created_at=now,
            )
            for lk in links
        ],
        ignore_conflicts=True,
        batch_size=500,
    )


def _update_depths(tenant: str, rows: list[tuple[str, int, str]]) -> None:
    """Stored waiting rows get their depth and root (one statement on PostgreSQL)."""
    if connection.vendor == "postgresql":
        sql.execute(
            f"""
            UPDATE {sql.USAGE} u SET depth = v.depth, root_request_id = v.root
            FROM unnest(%s::varchar[], %s::int[], %s::varchar[]) AS v(node, depth, root)
            WHERE u.tenant = %s AND u.request_id = v.node AND u.depth IS NULL
            """,
            [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], tenant],
        )
        return
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {sql.USAGE} SET depth = %s, root_request_id = %s "
            "WHERE tenant = %s AND request_id = %s AND depth IS NULL",
            [(depth, root, tenant, rid) for rid, depth, root in rows],
        )


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


# --- retention -----------------------------------------------------------------------------------
_PURGE_CHUNK = 10_000


def provenance_purge_expired(*, now: datetime | None = None, max_chunks: int = 100) -> int:
    """Delete relationships and refused cycles older than the ledger's retention (the requests
    they link are purged with it), in bounded chunks. Returns how many rows went."""
    cutoff = retention_cutoff(now=now)
    if cutoff is None:
        return 0
    deleted = 0
    for model, column in ((ProvenanceRelationship, "created_at"), (CycleAttempt, "attempted_at")):
        for _ in range(max_chunks):
            ids = list(
                model.objects.filter(**{f"{column}__lt": cutoff}).values_list("pk", flat=True)[
                    :_PURGE_CHUNK
                ]
            )
            if not ids:
                break
            deleted += model.objects.filter(pk__in=ids).delete()[0]
    return deleted
