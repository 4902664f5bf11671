"""The graph walks, in SQL (recursive CTEs that PostgreSQL and SQLite both run).

A walk is one statement however many nodes it reaches; never one query per node. Request ids
travel as VARCHAR(128) so the CTE's column types agree in both databases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection

from provenance.models import ProvenanceRelationship
from usage.models import TokenUsage

EDGES = ProvenanceRelationship._meta.db_table
USAGE = TokenUsage._meta.db_table
_ID = "CAST(%s AS VARCHAR(128))"


def in_list(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """`column` is one of `values`: one array parameter on PostgreSQL, placeholders on SQLite."""
    if connection.vendor == "postgresql":
        return f"{column} = ANY(%s)", [list(values)]
    if not values:
        return "1 = 0", []
    return f"{column} IN ({', '.join(['%s'] * len(values))})", list(values)


def fetch(sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return list(cursor.fetchall())


def execute(sql: str, params: Iterable[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return int(cursor.rowcount)


def reachable_up(tenant: str, start: str, *, max_steps: int) -> dict[str, str]:
    """Every request reachable from `start` along edges of any type (from → to), within
    `max_steps`, each with the request it was reached from (`start` maps to "")."""
    rows = fetch(
        f"""
        WITH RECURSIVE up(node, prev, lvl) AS (
            SELECT {_ID}, CAST('' AS VARCHAR(128)), 0
            UNION
            SELECT e.to_request_id, up.node, up.lvl + 1
            FROM {EDGES} e JOIN up ON e.tenant = %s AND e.from_request_id = up.node
            WHERE up.lvl < %s
        )
        SELECT node, prev, lvl FROM up ORDER BY lvl
        """,
        [start, tenant, max_steps],
    )
    reached: dict[str, str] = {}
    for node, prev, _lvl in rows:
        reached.setdefault(node, prev)
    return reached


def longest_down(tenant: str, start: str, *, max_steps: int) -> int:
    """The longest path (in edges, any type) from a request down to those that link to it."""
    rows = fetch(
        f"""
        WITH RECURSIVE down(node, lvl) AS (
            SELECT {_ID}, 0
            UNION
            SELECT e.from_request_id, down.lvl + 1
            FROM {EDGES} e JOIN down ON e.tenant = %s AND e.to_request_id = down.node
            WHERE down.lvl < %s
        )
        SELECT MAX(lvl) FROM down
        """,
        [start, tenant, max_steps],
    )
    return int(rows[0][0] or 0)


def tree_ancestors(tenant: str, start: str, *, max_steps: int) -> list[tuple[str, str | None]]:
    """(request, its tree parent) from `start` up to its root, `start` first; the last one's
    parent is None, or names a request that has not arrived."""
    rows = fetch(
        f"""
        WITH RECURSIVE up(node, parent, lvl) AS (
            SELECT {_ID}, e.to_request_id, 0
            FROM (SELECT 1 AS one) s
            LEFT JOIN {EDGES} e
                ON e.tenant = %s AND e.from_request_id = {_ID} AND e.is_tree
            UNION ALL
            SELECT up.parent, e.to_request_id, up.lvl + 1
            FROM up LEFT JOIN {EDGES} e
                ON e.tenant = %s AND e.from_request_id = up.parent AND e.is_tree
            WHERE up.parent IS NOT NULL AND up.lvl < %s
        )
        SELECT node, parent FROM up ORDER BY lvl
        """,
        [start, tenant, start, tenant, max_steps],
    )
    return [(node, parent) for node, parent in rows]


def tree_descendants(
    tenant: str, start: str, *, max_steps: int, limit: int
) -> list[tuple[str, str, int]]:
    """(request, its tree parent, steps below `start`) for every descendant of `start` along
    tree edges, at most `limit` of them (breadth first on PostgreSQL)."""
    return [
        (node, parent, lvl)
        for node, parent, lvl in fetch(
            f"""
            WITH RECURSIVE down(node, parent, lvl) AS (
                SELECT {_ID}, CAST('' AS VARCHAR(128)), 0
                UNION ALL
                SELECT e.from_request_id, down.node, down.lvl + 1
                FROM {EDGES} e JOIN down ON e.tenant = %s AND e.to_request_id = down.node
                WHERE e.is_tree AND down.lvl < %s
            )
            SELECT node, parent, lvl FROM down WHERE lvl > 0 LIMIT %s
            """,
            [start, tenant, max_steps, limit],
        )
    ]
