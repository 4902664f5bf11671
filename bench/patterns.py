#!/usr/bin/env python
"""Pattern analysis over a week of provenance: GET /api/v1/analysis/patterns over 1,000,000
ledger rows with their lineage.

Target (issue): under 5 s on PostgreSQL for 1,000,000 usage rows with provenance (the
endpoint's default range, the last 7 days, covering them all).

    .venv/bin/python bench/patterns.py                  # 1,000,000 rows, 5 runs
    .venv/bin/python bench/patterns.py --rows 50000     # a quick run
    .venv/bin/python bench/patterns.py --explain        # + EXPLAIN ANALYZE of slow sections

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C):
  1. drops/creates database `tokenmgr_bench_patterns`, migrates, creates a global API key;
  2. generates a week of agent traffic (bench/_provenance_data.Workload) as pre-encoded COPY
     text -- user questions (root requests) and their trees (mostly small; 1 % agent loops 9-12
     deep, past the deep-chain limit 8), 200 retry storms (an operation retried 3-8 times
     within minutes, half of them retries of retries; `relationship` retry_of and a tree edge
     of type retry_of), single retries of failed requests, 20 fan-out outliers (50-200
     children), 5 % duplicate inputs (same input_hash and model as a request minutes before;
     some cache hits with a cached_from edge), 8 agents with their own error and cache-hit
     rates and latencies, 30 refused cycles -- and COPYs the rows, edges and cycle attempts
     into the migrated (indexed) tables, then VACUUM (ANALYZE);
  3. the references, in the same run: the COPY rate of that load (rows/s into the indexed
     ledger), and `SELECT count(*) FROM usage_tokenusage` (median of 3 warm runs);
  4. starts uvicorn (2 processes, as `manage.py up`), calls each endpoint once to warm up,
     waits (at most --quiet-wait s) for the machine to be idle, then times --runs calls of GET
     /api/v1/analysis/patterns one after another, and (no target, informative) of
     /analysis/questions and /analysis/task-costs;
  5. in one Django process on the same database (no HTTP): each section's selector timed
     (duplicates, retry_storms, deep_chains, cycles_attempted, fan_out, agents) with the time
     its SQL statements took; with --explain, EXPLAIN (ANALYZE, BUFFERS) of the statements of
     every section slower than --explain-over seconds;
  6. compares the findings with what was generated (duplicates, storms, deep chains, fan-out
     outliers, refused cycles).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
import _provenance_data as d

TARGET_S = 5.0
DB_NAME = "tokenmgr_bench_patterns"
ENDPOINTS = (
    ("patterns", "/api/v1/analysis/patterns"),
    ("questions", "/api/v1/analysis/questions"),
    ("task-costs", "/api/v1/analysis/task-costs"),
)


# --- the data -----------------------------------------------------------------------------------


def load(stack: h.Stack, args: argparse.Namespace) -> tuple[d.Plan, dict[str, Any]]:
    led = d.Ledger(args.seed)
    now = time.time()
    t = time.perf_counter()
    plan = d.Workload(led, args.rows, now - 6.5 * 86400, now - 900).run()
    rows, edges, cycles = d.encode(led.rows), d.encode(led.edges), d.encode(led.cycles)
    out: dict[str, Any] = {
        "generate_s": time.perf_counter() - t,
        "edges": len(led.edges),
        "mib": sum(len(c) for c in rows) / 2**20,
    }
    del led
    h.log(f"generated {plan.rows:,} rows, {out['edges']:,} edges in {out['generate_s']:.1f} s")
    with stack.pg() as conn:
        conn.execute("CHECKPOINT")
        conn.commit()
        out["copy_rows_s"] = d.copy_in(conn, d.LEDGER_TABLE, d.ROW_COLUMNS, rows)
        h.log(f"COPY rows: {out['copy_rows_s']:.1f} s")
        out["copy_edges_s"] = d.copy_in(conn, d.EDGE_TABLE, d.EDGE_COLUMNS, edges)
        d.copy_in(conn, d.CYCLE_TABLE, d.CYCLE_COLUMNS, cycles)
    out["vacuum_s"] = d.vacuum_analyze(stack)
    out["sizes"] = d.table_sizes(stack)
    with stack.pg(autocommit=True) as conn:
        counts = []
        for i in range(4):
            t = time.perf_counter()
            n = conn.execute(f"SELECT count(*) FROM {d.LEDGER_TABLE}").fetchone()[0]
            if i:
                counts.append(time.perf_counter() - t)
        if n != plan.rows:
            raise RuntimeError(f"the ledger holds {n} rows, expected {plan.rows}")
        out["count_s"] = statistics.median(counts)
    return plan, out


# --- HTTP ---------------------------------------------------------------------------------------


def get(port: int, path: str, key: str) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {resp.status} {body[:300]!r}")
    return resp.status, body, time.perf_counter() - t


def time_endpoints(
    port: int, key: str, runs: int, other_runs: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    bodies: dict[str, Any] = {}
    for name, path in ENDPOINTS:
        times, size = [], 0
        for _ in range(runs if name == "patterns" else other_runs):
            _status, body, took = get(port, path, key)
            times.append(took)
            size = len(body)
        bodies[name] = json.loads(body)
        med = statistics.median(times)
        out[name] = {"median": med, "max": max(times), "bytes": size, "runs": times}
        h.log(f"{name:<11} median {med:6.2f} s  max {max(times):6.2f} s")
    return out, bodies


# --- the sections, in process -------------------------------------------------------------------

SECTIONS = """
import json, statistics, time
from datetime import timedelta
from django.db import connection
from django.utils import timezone
from provenance import selectors as s
from tokenmgr_project.core.principal import Principal

p = Principal(scope="global")
until = timezone.now()
since = until - timedelta(days=7)
rows = s._in_range(p, since, until)
sections = {
    "duplicates": lambda: s.duplicate_requests(rows, window=timedelta(seconds=3600), limit=20),
    "retry_storms": lambda: s.retry_storms(
        p, since, until, storm_min=3, storm_window=timedelta(seconds=600), limit=20),
    "deep_chains": lambda: s.deep_chains(rows, depth_limit=8, limit=20),
    "cycles_attempted": lambda: s.cycle_attempts(p, since, until, limit=20),
    "fan_out": lambda: s.fan_out_outliers(rows, limit=20),
    "agents": lambda: s.agent_performance(rows, limit=20),
}
statements = []
def timed(execute, sql, params, many, context):
    t = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        statements.append((sql, params, time.perf_counter() - t))
out = {}
for name, run in sections.items():
    times, sql_times, n_sql, kept = [], [], 0, {}
    for _ in range(__RUNS__):
        statements.clear()
        with connection.execute_wrapper(timed):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        sql_times.append(sum(x[2] for x in statements))
        n_sql = len(statements)
        for sql, params, took in statements:
            if sql not in kept or took > kept[sql][1]:
                kept[sql] = (params, took)
    plans = []
    if __EXPLAIN__ and statistics.median(times) > __EXPLAIN_OVER__:
        with connection.cursor() as cursor:
            for sql, (params, _took) in sorted(kept.items(), key=lambda kv: -kv[1][1])[:4]:
                if not sql.lstrip().upper().startswith("SELECT"):
                    continue
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plans.append((sql, [r[0] for r in cursor.fetchall()]))
    out[name] = {"median": statistics.median(times), "max": max(times),
                 "sql": statistics.median(sql_times), "statements": n_sql, "plans": plans}
print(json.dumps(out))
"""


def sections(stack: h.Stack, args: argparse.Namespace) -> dict[str, Any]:
    code = (
        SECTIONS.replace("__RUNS__", str(args.section_runs))
        .replace("__EXPLAIN_OVER__", repr(args.explain_over))
        .replace("__EXPLAIN__", repr(args.explain))
    )
    return json.loads(stack.python(code, timeout=3600).strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="ledger rows to generate")
    ap.add_argument("--runs", type=int, default=5, help="timed calls of /analysis/patterns")
    ap.add_argument("--other-runs", type=int, default=3, help="of /questions and /task-costs")
    ap.add_argument("--section-runs", type=int, default=3, help="in-process runs per section")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn server processes")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="max s to wait for idle")
    ap.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE slow sections")
    ap.add_argument("--explain-over", type=float, default=0.5, help="what is slow (s)")
    ap.add_argument("--seed", type=int, default=11)
    h.add_common_args(ap)
    args = ap.parse_args()
    if args.rows < 10_000:
        ap.error("--rows must be at least 10,000 (200 storms and 20 fan-out trees go in)")
    return args


def main() -> int:
    args = parse_args()
    h.log(f"patterns: {args.rows:,} rows, {args.runs} runs")
    env = {"DJANGO_SETTINGS_MODULE": args.settings}
    r: dict[str, Any] = {}
    with h.Stack(redis_db=None, extra_env=env, db_name=DB_NAME) as stack:
        stack.setup()
        plan, r["load"] = load(stack, args)
        r["machine"] = h.machine_line(stack).replace(", Redis ?", "")  # reads only: no Redis
        port = stack.start_uvicorn(args.workers)
        h.log(f"uvicorn up on 127.0.0.1:{port}; warming up")
        for _name, path in ENDPOINTS:
            get(port, path, stack.key)
        h.wait_quiet(args.quiet_wait)
        profiler = h.Profiler(stack, args.profile, ("uvicorn",))
        profiler.start()
        cpu0 = h.cpu_snapshot(stack)
        wall0 = time.perf_counter()
        r["http"], bodies = time_endpoints(port, stack.key, args.runs, args.other_runs)
        wall = time.perf_counter() - wall0
        r["cpu"] = h.cpu_report(cpu0, h.cpu_snapshot(stack), wall)
        r["profiles"] = profiler.stop()
        h.log("timing each section in process")
        r["sections"] = sections(stack, args)
    return report(args, plan, bodies, r)


def findings(plan: d.Plan, body: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """(what, generated, found) for each pattern put in."""
    return [
        ("duplicate requests", plan.duplicates, body["duplicates"]["duplicate_requests"]),
        ("retry storms", plan.storms, body["retry_storms"]["storms"]),
        ("deep chains (trees past 8)", plan.trees_past_deep_limit, body["deep_chains"]["chains"]),
        ("fan-out outliers", plan.fanout_parents, body["fan_out"]["outliers"]),
        ("refused cycles", plan.cycles, body["cycles_attempted"]["attempts"]),
    ]


def report(args: argparse.Namespace, plan: d.Plan, bodies: dict[str, Any], r: dict) -> int:
    ld = r["load"]
    rule = "=" * 84
    print(f"\n{rule}")
    print(f"patterns  rows={plan.rows:,}  uvicorn x{args.workers}  runs={args.runs}")
    if args.settings != "tokenmgr_project.settings":
        print(f"WHAT-IF settings: {args.settings}")
    print(r["machine"])
    print(
        f"data: {plan.rows:,} rows in {plan.trees:,} trees (max depth {plan.max_depth}), "
        f"{ld['edges']:,} edges, {plan.cycles} refused cycles; {plan.storms} storms "
        f"({plan.storm_retries:,} retries), {plan.single_retries:,} single retries, "
        f"{plan.deep_trees} agent loops, {plan.rows_past_deep_limit:,} rows past depth 8, "
        f"{plan.fanout_parents} fan-out parents, {plan.duplicates:,} duplicates "
        f"({plan.duplicates / plan.rows:.1%}); {plan.trimmed} rows trimmed off the last tree"
    )
    print(f"sizes: {ld['sizes']}; generated in {ld['generate_s']:.1f} s (not timed below)")
    print("-" * 84)
    rate = plan.rows / ld["copy_rows_s"]
    print(
        f"ref COPY rows        {ld['copy_rows_s']:8.2f} s  -> {rate:>9,.0f} rows/s "
        f"({ld['mib']:.0f} MiB pre-encoded text into the indexed ledger, 1 txn)"
    )
    print(
        f"ref COPY edges       {ld['copy_edges_s']:8.2f} s  -> "
        f"{ld['edges'] / ld['copy_edges_s']:>9,.0f} rows/s; VACUUM ANALYZE {ld['vacuum_s']:.1f} s"
    )
    print(f"ref SELECT count(*)  {ld['count_s']:8.3f} s  (the whole ledger, median of 3 warm)")
    print("-" * 84)
    print(f"{'GET /api/v1/analysis/':<24}{'median s':>9}{'max s':>8}{'bytes':>10}   runs (s)")
    for name, t in r["http"].items():
        runs = " ".join(f"{x:.2f}" for x in t["runs"])
        print(f"{name:<24}{t['median']:>9.2f}{t['max']:>8.2f}{t['bytes']:>10,}   {runs}")
    print("-" * 84)
    print(f"patterns' sections, in one Django process ({args.section_runs} runs each):")
    print(f"  {'section':<18}{'median s':>9}{'max s':>8}{'SQL s':>8}{'statements':>12}")
    total = 0.0
    for name, s in r["sections"].items():
        total += s["median"]
        print(
            f"  {name:<18}{s['median']:>9.3f}{s['max']:>8.3f}{s['sql']:>8.3f}{s['statements']:>12}"
        )
    print(f"  {'sum':<18}{total:>9.3f}   (SQL s: execute time; a server-side cursor's fetches")
    print("                              fall outside it: duplicates iterates one)")
    for name, s in r["sections"].items():
        for sql, lines in s["plans"]:
            print(f"--- EXPLAIN (ANALYZE, BUFFERS), section {name}:\n  {sql[:600]}")
            for line in lines:
                print(f"    {line}")
    print("-" * 84)
    print("findings vs what was generated:")
    for what, made, found in findings(plan, bodies["patterns"]):
        flag = "" if made == found else "   <- differs"
        print(f"  {what:<28} generated {made:>8,}  found {found:>8,}{flag}")
    agents = bodies["patterns"]["agents"]
    print(
        "  agents: "
        + ", ".join(
            f"{a['agent']} {a['requests']:,} req {a['error_rate_percent']}% err "
            f"{a['mean_latency_ms']} ms"
            for a in agents
        )
    )
    print("-" * 84)
    print(r["cpu"])
    for path in r["profiles"]:
        print(h.pyspy_summary(path, packages=("provenance", "usage", "tokenmgr_project")))
    print("-" * 84)
    t = r["http"]["patterns"]
    ok = t["max"] < TARGET_S
    print(
        f"target: GET /analysis/patterns over {plan.rows:,} rows < {TARGET_S:.0f} s -> "
        f"{'PASS' if ok else 'FAIL'} (median {t['median']:.2f} s, max {t['max']:.2f} s)"
    )
    print(rule)
    return 0 if ok else 1


if __name__ == "__main__":
    h.run_main(main)
