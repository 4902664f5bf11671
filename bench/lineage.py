#!/usr/bin/env python
"""Lineage of a 10,000-node tree over HTTP: GET /api/v1/lineage/{root_request_id} as JSON, as
SVG (?format=svg) and as Graphviz DOT (?format=dot).

Target (issue): the lineage of a 10,000-node tree, JSON and SVG, under 1 s on PostgreSQL, end
to end over HTTP (request sent -> last byte of the response read).

    .venv/bin/python bench/lineage.py                       # 10,000 nodes, 7 runs per format
    .venv/bin/python bench/lineage.py --nodes 2000 --runs 3 # a quick look

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C):
  1. drops/creates database `tokenmgr_bench_lineage`, migrates, creates a global API key;
  2. builds the tree as ingestion would have stored it and COPYs it in (bench/_provenance_data):
     --nodes ledger rows of tenant "org" (a root, depth 0, then levels 1..--depth sized like a
     bell, each internal node with 3-10 children), each child with parent_request_id,
     root_request_id, depth, relationship triggered_by and its `is_tree` edge (type
     triggered_by, source event); before it --background rows of other traffic (a week of
     small agent trees with their edges), so the tree is not alone in the ledger; then
     VACUUM (ANALYZE);
  3. starts uvicorn (2 processes, as `manage.py up`), warms each case up over fresh
     connections, waits (at most --quiet-wait s) for the machine to be idle;
  4. times --runs requests of each case, one at a time, each on a fresh connection: the root's
     lineage as JSON, SVG and DOT; a mid-tree node's (of the nodes halfway down, the one with
     the largest subtree: its ancestors and descendants) as JSON and SVG; a deepest leaf's ancestors
     (direction=up);
  5. the references, measured in the same run: GET /api/v1/health (one HTTP round trip with
     a `SELECT 1`), a one-node lineage (a leaf, direction=down: the fixed cost of the
     endpoint), and via psycopg the raw recursive CTE of the descendant walk
     (provenance.sql.tree_descendants' statement) alone and followed by the fetch of the nodes'
     rows;
  6. in one Django process (no HTTP): where the time of the root's lineage goes -- SQL
     statements, the selector (walks + rows + subtree sums), the SVG / DOT drawing, the JSON
     body and its rendering.
Each case reports the median and the max of its runs and the response size; the verdict
compares the median and the max of the JSON and SVG cases with 1 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
import _provenance_data as d

TARGET_S = 1.0
DB_NAME = "tokenmgr_bench_lineage"
DESCENDANTS_SQL = """
WITH RECURSIVE down(node, parent, lvl) AS (
    SELECT CAST(%s AS VARCHAR(128)), CAST('' AS VARCHAR(128)), 0
    UNION ALL
    SELECT e.from_request_id, down.node, down.lvl + 1
    FROM provenance_provenancerelationship e
    JOIN down ON e.tenant = %s AND e.to_request_id = down.node
    WHERE e.is_tree AND down.lvl < %s
)
SELECT node, parent, lvl FROM down WHERE lvl > 0 LIMIT %s
"""  # provenance.sql.tree_descendants, as lineage_of calls it (max_steps 64 * 4)
NODE_COLUMNS_SQL = (
    "id, tenant, request_id, occurred_at, provider, model, input_tokens, output_tokens, cost, "
    "agent, agent_type, task_type, intent, workflow_id, workflow_step, status, relationship, "
    "latency_ms, cache_hit, depth, team_id, project_id, user_id, parent_request_id, "
    "root_request_id"
)


# --- the data -----------------------------------------------------------------------------------


class Tree:
    def __init__(self, ids: list[str], nodes: list[tuple[int, int]]):
        self.ids, self.nodes = ids, nodes
        children: dict[int, list[int]] = {}
        for i, (p, _depth) in enumerate(nodes):
            if p >= 0:
                children.setdefault(p, []).append(i)
        size = [1] * len(nodes)
        for i in range(len(nodes) - 1, 0, -1):  # children come after their parents
            size[nodes[i][0]] += size[i]
        self.size = size
        fans = sorted(len(c) for c in children.values())
        self.fan = (fans[0], statistics.median(fans), fans[-1], len(fans))
        self.depth = max(depth for _p, depth in nodes)
        # halfway down, the node with the most below it
        mid_level = [i for i, (_p, depth) in enumerate(nodes) if depth == self.depth // 2]
        self.mid = max(mid_level, key=lambda i: size[i])
        self.leaf = max(range(len(nodes)), key=lambda i: nodes[i][1])

    def ancestors(self, i: int) -> int:
        return self.nodes[i][1]


def build(stack: h.Stack, args: argparse.Namespace) -> tuple[Tree, dict[str, Any]]:
    led = d.Ledger(args.seed)
    now = time.time()
    if args.background:
        d.Workload(led, args.background, now - 6.5 * 86400, now - 3600).run()
    rng = random.Random(args.seed + 1)
    nodes = d.fanout_tree(args.nodes, args.depth, (3, 10), rng)
    ids: list[str] = []
    ats: list[float] = []
    workflow = f"wf_{rng.getrandbits(48):012x}"
    for parent, depth in nodes:
        if parent < 0:
            at = now - 1800
            agent = d.AGENTS["router"]
        else:
            at = ats[parent] + rng.uniform(0.1, 3.0)
            agent = d.AGENTS["planner" if depth == 1 else rng.choice(d.CHILD_AGENTS)]
        rid = led.add(
            at,
            agent,
            parent=ids[parent] if parent >= 0 else "",
            root=ids[0] if parent >= 0 else "",
            depth=depth,
            relationship="triggered_by" if parent >= 0 else "",
            input_hash=f"{rng.getrandbits(256):064x}",
            team="research",
            user="u1",
            conversation="conv_lineage",
            workflow=workflow,
        )
        ids.append(rid)
        ats.append(at)
    rows, edges, cycles = d.encode(led.rows), d.encode(led.edges), d.encode(led.cycles)
    out: dict[str, Any] = {"rows": len(led.rows), "edges": len(led.edges)}
    with stack.pg() as conn:
        out["copy_rows_s"] = d.copy_in(conn, d.LEDGER_TABLE, d.ROW_COLUMNS, rows)
        out["copy_edges_s"] = d.copy_in(conn, d.EDGE_TABLE, d.EDGE_COLUMNS, edges)
        d.copy_in(conn, d.CYCLE_TABLE, d.CYCLE_COLUMNS, cycles)
    out["vacuum_s"] = d.vacuum_analyze(stack)
    out["sizes"] = d.table_sizes(stack)
    return Tree(ids, nodes), out


# --- HTTP ---------------------------------------------------------------------------------------


def get(port: int, path: str, key: str) -> tuple[int, bytes, float]:
    """One GET on a fresh connection: (status, body, seconds from connect to last byte)."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    return resp.status, body, time.perf_counter() - t


def check(name: str, status: int, body: bytes, expect_nodes: int | None) -> None:
    if status != 200:
        raise RuntimeError(f"{name}: HTTP {status} {body[:300]!r}")
    if name.endswith("json") and expect_nodes is not None:
        n = len(json.loads(body)["nodes"])
        if n != expect_nodes:
            raise RuntimeError(f"{name}: {n} nodes, expected {expect_nodes}")
    elif name.endswith("svg") and b"<svg" not in body[:400]:
        raise RuntimeError(f"{name}: not an SVG: {body[:200]!r}")
    elif name.endswith("dot") and not body.lstrip().startswith(b"digraph"):
        raise RuntimeError(f"{name}: not DOT: {body[:200]!r}")


def cases(tree: Tree) -> list[tuple[str, str, int | None, bool]]:
    """(name, path, nodes expected, judged against the target)."""
    root, mid, leaf = tree.ids[0], tree.ids[tree.mid], tree.ids[tree.leaf]
    n_mid = tree.size[tree.mid] + tree.ancestors(tree.mid)
    lin = "/api/v1/lineage/"
    return [
        ("root json", f"{lin}{root}", len(tree.ids), True),
        ("root svg", f"{lin}{root}?format=svg", None, True),
        ("root dot", f"{lin}{root}?format=dot", None, False),
        ("mid-tree json", f"{lin}{mid}", n_mid, False),
        ("mid-tree svg", f"{lin}{mid}?format=svg", None, False),
        ("leaf up json", f"{lin}{leaf}?direction=up", tree.ancestors(tree.leaf) + 1, False),
        ("ref one node json", f"{lin}{leaf}?direction=down", 1, False),
        ("ref /health", "/api/v1/health", None, False),
    ]


def warm_up(port: int, key: str, tree: Tree, per_case: int) -> None:
    """Each case a few times over fresh connections, so every server process has run it."""
    for name, path, expect, _judged in cases(tree):
        for _ in range(per_case):
            status, body, _s = get(port, path, key)
            check(name, status, body, expect)


def time_cases(port: int, key: str, tree: Tree, runs: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, path, expect, _judged in cases(tree):
        times, size = [], 0
        for _ in range(runs):
            status, body, took = get(port, path, key)
            check(name, status, body, expect)
            times.append(took)
            size = len(body)
        med = statistics.median(times)
        out[name] = {"median": med, "max": max(times), "bytes": size, "runs": times}
        h.log(f"{name:<18} median {med * 1000:7.1f} ms  max {max(times) * 1000:7.1f} ms")
    return out


# --- references in the database -----------------------------------------------------------------


def sql_reference(stack: h.Stack, tree: Tree, runs: int) -> dict[str, Any]:
    root = tree.ids[0]
    cte, with_rows = [], []
    with stack.pg(autocommit=True) as conn:
        for i in range(runs + 2):
            t = time.perf_counter()
            found = conn.execute(DESCENDANTS_SQL, (root, d.TENANT, 256, 50_001)).fetchall()
            t1 = time.perf_counter()
            ids = [root, *(r[0] for r in found)]
            conn.execute(
                f"SELECT {NODE_COLUMNS_SQL} FROM {d.LEDGER_TABLE} "
                "WHERE tenant = %s AND request_id = ANY(%s)",
                (d.TENANT, ids),
            ).fetchall()
            t2 = time.perf_counter()
            if len(found) != len(tree.ids) - 1:
                raise RuntimeError(f"CTE found {len(found)} descendants")
            if i >= 2:  # the first two warm the cache
                cte.append(t1 - t)
                with_rows.append(t2 - t)
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + DESCENDANTS_SQL,
            (root, d.TENANT, 256, 50_001),
        ).fetchall()
    return {
        "cte": statistics.median(cte),
        "cte_max": max(cte),
        "rows": statistics.median(with_rows),
        "rows_max": max(with_rows),
        "plan": "\n".join(r[0] for r in plan),
    }


BREAKDOWN = """
import json, statistics, time
from django.db import connection
from rest_framework.renderers import JSONRenderer
from provenance import actions, graph, selectors
from tokenmgr_project.core import actions as core
from tokenmgr_project.core.principal import Principal

principal = Principal(scope="global")
root = __ROOT__
sql_s = [0.0]
def timed(execute, sql, params, many, context):
    t = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        sql_s[0] += time.perf_counter() - t
out = {}
def keep(name, seconds):
    out.setdefault(name, []).append(seconds)
for _ in range(__RUNS__):
    row = selectors.node_for_principal(principal, root)
    sql_s[0] = 0.0
    with connection.execute_wrapper(timed):
        t = time.perf_counter()
        lineage = selectors.lineage_of(principal, row)
        keep("selectors.lineage_of", time.perf_counter() - t)
    keep("  of which SQL (execute + fetch)", sql_s[0])
    t = time.perf_counter()
    nodes, links = actions.graph_nodes(lineage), actions.graph_links(lineage)
    keep("graph nodes (admin URLs)", time.perf_counter() - t)
    t = time.perf_counter()
    graph.to_svg(nodes, links=links, title="t")
    keep("graph.to_svg", time.perf_counter() - t)
    t = time.perf_counter()
    graph.to_dot(nodes, links=links, title="t")
    keep("graph.to_dot", time.perf_counter() - t)
    t = time.perf_counter()
    body = core.run("get_lineage", principal, {"request_id": root}).body
    keep("action get_lineage (json body)", time.perf_counter() - t)
    t = time.perf_counter()
    JSONRenderer().render(body)
    keep("JSONRenderer.render", time.perf_counter() - t)
    t = time.perf_counter()
    core.run("get_lineage", principal, {"request_id": root, "format": "svg"})
    keep("action get_lineage (svg)", time.perf_counter() - t)
print(json.dumps({k: statistics.median(v) for k, v in out.items()}))
"""


def breakdown(stack: h.Stack, tree: Tree, runs: int) -> dict[str, float]:
    code = BREAKDOWN.replace("__ROOT__", repr(tree.ids[0])).replace("__RUNS__", str(runs))
    return json.loads(stack.python(code, timeout=600).strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=10_000, help="nodes in the tree")
    ap.add_argument("--depth", type=int, default=12, help="the tree's deepest level")
    ap.add_argument("--background", type=int, default=100_000, help="other ledger rows")
    ap.add_argument("--runs", type=int, default=7, help="timed requests per case")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn server processes")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="max s to wait for idle")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the in-process timings")
    h.add_common_args(ap)
    args = ap.parse_args()
    if args.nodes < 2 or args.depth < 1 or args.nodes < args.depth + 1:
        ap.error("--nodes must exceed --depth")
    return args


def main() -> int:
    args = parse_args()
    h.log(f"lineage: {args.nodes:,}-node tree, depth {args.depth}, {args.background:,} other rows")
    env = {"DJANGO_SETTINGS_MODULE": args.settings}
    with h.Stack(redis_db=None, extra_env=env, db_name=DB_NAME) as stack:
        stack.setup()
        t = time.perf_counter()
        tree, load = build(stack, args)
        h.log(
            f"loaded {load['rows']:,} rows + {load['edges']:,} edges in "
            f"{time.perf_counter() - t:.1f} s; {load['sizes']}"
        )
        machine = h.machine_line(stack).replace(", Redis ?", "")  # reads only: no Redis
        port = stack.start_uvicorn(args.workers)
        profiler = h.Profiler(stack, args.profile, ("uvicorn",))
        h.log(f"uvicorn up on 127.0.0.1:{port}; warming up")
        warm_up(port, stack.key, tree, 2 * args.workers)
        h.wait_quiet(args.quiet_wait)
        profiler.start()
        cpu0 = h.cpu_snapshot(stack)
        wall0 = time.perf_counter()
        timings = time_cases(port, stack.key, tree, args.runs)
        wall = time.perf_counter() - wall0
        cpu1 = h.cpu_snapshot(stack)
        profiles = profiler.stop()
        ref = sql_reference(stack, tree, args.runs)
        parts = {} if args.no_breakdown else breakdown(stack, tree, 3)
    cpu = h.cpu_report(cpu0, cpu1, wall)
    r = {"machine": machine, "load": load, "timings": timings, "ref": ref, "parts": parts}
    return report(args, tree, {**r, "cpu": cpu, "profiles": profiles})


def report(args: argparse.Namespace, tree: Tree, r: dict[str, Any]) -> int:
    load, timings, ref, parts = r["load"], r["timings"], r["ref"], r["parts"]
    rule = "=" * 84
    print(f"\n{rule}")
    print(f"lineage  uvicorn x{args.workers}  runs={args.runs} per case (fresh connection each)")
    if args.settings != "tokenmgr_project.settings":
        print(f"WHAT-IF settings: {args.settings}")
    print(r["machine"])
    fan_min, fan_med, fan_max, internal = tree.fan
    print(
        f"tree: {len(tree.ids):,} nodes, depth {tree.depth}, {internal:,} internal nodes with "
        f"{fan_min}-{fan_max} children (median {fan_med}); mid-tree node: depth "
        f"{tree.ancestors(tree.mid)}, {tree.size[tree.mid]:,}-node subtree"
    )
    print(
        f"ledger: {load['rows']:,} rows ({load['rows'] - len(tree.ids):,} other traffic), "
        f"{load['edges']:,} edges; COPY {load['copy_rows_s']:.1f} s rows + "
        f"{load['copy_edges_s']:.1f} s edges, VACUUM ANALYZE {load['vacuum_s']:.1f} s; "
        f"{load['sizes']}"
    )
    print("-" * 84)
    print(f"{'case':<20}{'median ms':>11}{'max ms':>10}{'bytes':>12}   runs (ms)")
    for name, t in timings.items():
        runs = " ".join(f"{x * 1000:.0f}" for x in t["runs"])
        print(
            f"{name:<20}{t['median'] * 1000:>11.1f}{t['max'] * 1000:>10.1f}"
            f"{int(t['bytes']):>12,}   {runs}"
        )
    print(
        f"{'ref SQL: CTE alone':<20}{ref['cte'] * 1000:>11.1f}{ref['cte_max'] * 1000:>10.1f}"
        f"{'':>12}   psycopg, the descendant walk's recursive CTE ({len(tree.ids) - 1:,} rows)"
    )
    print(
        f"{'ref SQL: CTE + rows':<20}{ref['rows'] * 1000:>11.1f}{ref['rows_max'] * 1000:>10.1f}"
        f"{'':>12}   ... then the {len(tree.ids):,} nodes' ledger rows (= ANY(ids))"
    )
    if parts:
        print("-" * 84)
        print("where the root's lineage goes, in one Django process (median of 3, ms):")
        for name, s in parts.items():
            print(f"  {name:<36}{s * 1000:>9.1f}")
    print("-" * 84)
    print("EXPLAIN (ANALYZE, BUFFERS) of the descendant walk:")
    for line in str(ref["plan"]).splitlines():
        print(f"  {line}")
    print("-" * 84)
    print(r["cpu"])
    for path in r["profiles"]:
        print(h.pyspy_summary(path, packages=("provenance", "usage", "tokenmgr_project")))
    print("-" * 84)
    ok = True
    for name, _path, _n, judged in cases(tree):
        if not judged:
            continue
        t = timings[name]
        passed = t["max"] < TARGET_S
        ok &= passed
        print(
            f"target: {name} < {TARGET_S:.0f} s -> {'PASS' if passed else 'FAIL'} "
            f"(median {t['median']:.3f} s, max {t['max']:.3f} s)"
        )
    print(rule)
    return 0 if ok else 1


if __name__ == "__main__":
    h.run_main(main)
