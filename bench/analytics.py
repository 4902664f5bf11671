#!/usr/bin/env python
"""The analytics endpoints over the 10,000,000-row ledger: GET /api/v1/anomalies, /trends,
/recommendations and /forecast, cold and warm, next to a raw SQL GROUP BY over the ledger.

Target (issue 13): "Over a 10,000,000-row ledger on PostgreSQL (from the reporting issue's
generator): anomalies for all teams over 90 days and the recommendations endpoint each under
2 s." (cases 1 and 5; the others are held to the same 2 s).

    .venv/bin/python bench/gen_ledger.py          # once: the 10M-row ledger (minutes)
    .venv/bin/python bench/analytics.py           # the timings
    .venv/bin/python bench/analytics.py --cases 1,5 --repeat 20

Cases (each a GET with a global API key, over the ledger as it is):
  1. /anomalies?dimension=team_id&granularity=day, since = now - 90 days, until = now: the
     issue's "anomalies for all teams over 90 days" (TARGET);
  2. the same by hour;
  3. the same by day with threshold=2, so anomalies exist and the drivers of 10 of them (the
     endpoint's default `drivers`) are worked out;
  4. /trends with its defaults (the last 7 days against the 7 before, six dimensions);
  5. /recommendations with its defaults (the last 30 days) (TARGET);
  6. /forecast with its default dimension, after 3 budgets were created through
     POST /api/v1/budgets (global monthly cost, the largest team's, the largest project's;
     limits from their last 30 days' spend, soft) so it has budgets to project.

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C; the
database is kept):
  1. checks that --db holds --rows ledger rows; it never builds the ledger (if it is missing or
     smaller, it says what to run);
  2. creates a global API key (deleted again at the end);
  3. per case: starts a fresh uvicorn process (1 worker, as `manage.py up` runs it; no
     REDIS_URL: direct mode), ends its health probe's PostgreSQL session, waits for the machine
     to be idle, times the first request (cold), waits 11 s for PostgreSQL's statistics, then
     times --repeat requests on one (new) keep-alive connection (warm: median and p95; fewer, at
     least 3, past --budget seconds), and stops the server again. An endpoint answering 404 is
     reported as missing and skipped;
  4. checks case 1's answer: the series it evaluated must be the distinct team_ids with usage
     in the whole days it evaluated (from the ledger);
  5. the reference in the same run, no target (for a noisy machine): the raw SQL
     `SELECT team_id, date_trunc('day', occurred_at AT TIME ZONE 'UTC'), sum(cost) FROM
     usage_tokenusage WHERE occurred_at >= now() - interval '90 days' GROUP BY 1, 2` -- the
     first run on a new session (cold) and --raw-repeat more (warm);
  6. at the end (also on error): DELETE /api/v1/budgets/<id> for the budgets it created (which
     deactivates them), then removes their rows (and what cascades from them) so the ledger
     database is left as it was found.

"Cold" is the first request a freshly started server process serves, on a new PostgreSQL
session: a new process, empty catalog caches, no plan kept, the first run of that code path.
It is NOT a cold database: the shared PostgreSQL server's buffers and the OS page cache cannot
be emptied without restarting it, so the blocks the request still had to read into
shared_buffers are printed next to it (bench/reports.py: the same method).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import secrets
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
import gen_ledger
from reports import PgCounters, delta, get, last_exception, percentile

TARGET_MS = 2000.0
DEFAULT_DB = gen_ledger.DB_NAME
RANGE = timedelta(days=90)
BUDGET_PREFIX = "bench-analytics-"
DRIVERS_DEFAULT = 10  # reporting.anomalies.DEFAULT_DRIVERS: anomalies whose drivers are computed
RAW_SQL = (
    "SELECT team_id, date_trunc('day', occurred_at AT TIME ZONE 'UTC'), sum(cost) "
    f"FROM {gen_ledger.LEDGER} WHERE occurred_at >= now() - interval '90 days' GROUP BY 1, 2"
)
Window = tuple[datetime, datetime]
RULE = "=" * 76
# PostgreSQL 15 backends report their statistics when idle, but one that reported less than 1 s
# before defers it by PGSTAT_IDLE_INTERVAL (10 s): the counters wait that out after a request,
# or a cold request's blocks would show up in the warm figures instead.
STATS_SETTLE = 11.0


@dataclass(frozen=True)
class Case:
    number: int
    label: str
    path: str
    query: Callable[[Window], dict[str, str]]
    kind: str  # how its answer is summarised
    target: bool = False  # the issue's own target


def _anomalies(granularity: str, threshold: str | None = None) -> Callable[[Window], dict]:
    def query(window: Window) -> dict[str, str]:
        q = {"dimension": "team_id", "granularity": granularity}
        if threshold is not None:
            q["threshold"] = threshold
        return {**q, "since": window[0].isoformat(), "until": window[1].isoformat()}

    return query


CASES = (
    Case(1, "anomalies team day 90d", "/api/v1/anomalies", _anomalies("day"), "anomalies", True),
    Case(2, "anomalies team hour 90d", "/api/v1/anomalies", _anomalies("hour"), "anomalies"),
    Case(3, "anomalies team day thr=2", "/api/v1/anomalies", _anomalies("day", "2"), "anomalies"),
    Case(4, "trends (defaults)", "/api/v1/trends", lambda w: {}, "trends"),
    Case(5, "recommendations (defaults)", "/api/v1/recommendations", lambda w: {}, "recs", True),
    Case(6, "forecast (defaults)", "/api/v1/forecast", lambda w: {}, "forecast"),
)
FORECAST_CASE = 6


class Counters(PgCounters):
    """bench/reports.py's counters (sessions opened on the database, by anyone; blocks read into
    shared_buffers / hit there), over the ledger and every rollup table the database has (the
    day rollup too, which gen_ledger.ROLLUPS does not name)."""

    def __init__(self, stack: h.Stack):
        super().__init__(stack)
        self.tables = [
            gen_ledger.LEDGER,
            *(
                row[0]
                for row in self.conn.execute(
                    "SELECT relname FROM pg_statio_user_tables "
                    "WHERE relname LIKE 'usage\\_%rollup' ORDER BY relname"
                ).fetchall()
            ),
        ]

    def snapshot(self, settle: float = 1.2) -> tuple[int, int, int]:
        time.sleep(settle)
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        sessions = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]
        read, hit = self.conn.execute(
            "SELECT COALESCE(SUM(heap_blks_read + COALESCE(idx_blks_read, 0)), 0), "
            "COALESCE(SUM(heap_blks_hit + COALESCE(idx_blks_hit, 0)), 0) "
            "FROM pg_statio_user_tables WHERE relname = ANY(%s)",
            (self.tables,),
        ).fetchone()
        return int(sessions), int(read), int(hit)


def verdict(ms: float) -> str:
    return "PASS" if ms < TARGET_MS else "FAIL"


# --- timing one case ----------------------------------------------------------------------------


@dataclass
class Timed:
    case: Case
    url: str
    status: int = 0
    cold_ms: float = 0.0
    warm_ms: list[float] = field(default_factory=list)
    cold_pg: str = ""
    warm_pg: str = ""
    size: int = 0
    data: Any = None
    error: str = ""
    stopped: bool = False  # warm requests cut short by --budget
    busy: float = 0.0  # the machine's busy fraction in the second before the cold request


def time_case(
    stack: h.Stack, args: argparse.Namespace, counters: PgCounters, case: Case, window: Window
) -> Timed:
    query = case.query(window)
    url = f"{case.path}?{urllib.parse.urlencode(query)}" if query else case.path
    out = Timed(case, url)
    port = stack.start_uvicorn(1)
    try:
        counters.end_sessions(stack.env["PGAPPNAME"])
        out.busy = h.wait_quiet(args.quiet_wait)
        before = counters.snapshot()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        out.status, body, took = get(conn, url, stack.key)
        out.cold_ms = took * 1000
        after = counters.snapshot(STATS_SETTLE)
        out.cold_pg = delta(before, after)
        out.size = len(body)
        if out.status != 200:
            out.error = body[:300].decode(errors="replace")
            if out.status >= 500:  # the cause is in the server's log, gone with the run
                out.error += f" -- server log: {last_exception(stack.log_tail('uvicorn-w1', 60))}"
            return out
        out.data = json.loads(body)
        conn.close()  # idle past uvicorn's keep-alive timeout (5 s) while the counters settled
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        deadline = time.monotonic() + args.budget
        for i in range(args.repeat):
            if i >= 3 and time.monotonic() > deadline:
                out.stopped = True
                break
            status, _body, took = get(conn, url, stack.key)
            if status != 200:
                out.error = f"a warm request answered HTTP {status}: {_body[:200]!r}"
                break
            out.warm_ms.append(took * 1000)
        out.warm_pg = delta(after, counters.snapshot(STATS_SETTLE))
        conn.close()
    finally:
        stack.stop("uvicorn-w1")
    return out


# --- what the answers say -----------------------------------------------------------------------


def summary(kind: str, data: dict[str, Any], budget_ids: list[int]) -> str:
    if kind == "anomalies":
        items = data.get("anomalies") or []
        ups = sum(1 for a in items if a.get("direction") == "up")
        with_drivers = sum(1 for a in items if a.get("drivers") is not None)
        return (
            f"series_evaluated {data.get('series_evaluated')}, "
            f"{len(data.get('insufficient_history') or [])} with insufficient history; "
            f"{len(items)} anomalies ({ups} up, {len(items) - ups} down), drivers computed for "
            f"{with_drivers}; source={data.get('source')}, truncated={data.get('truncated')}, "
            f"range [{data.get('since')}, {data.get('until')})"
        )
    if kind == "trends":
        dims = data.get("dimensions") or {}
        per = ", ".join(f"{d} {s.get('series')}" for d, s in dims.items())
        return (
            f"{len(dims)} dimensions (series: {per}); metric={data.get('metric')}, "
            f"source={data.get('source')}, truncated={data.get('truncated')}, "
            f"[{data.get('since')}, {data.get('until')})"
        )
    if kind == "recs":
        results = data.get("results") or []
        kinds = collections.Counter(r.get("kind") for r in results)
        saving = sum(Decimal(str(r.get("monthly_savings") or 0)) for r in results)
        listed = ", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "none"
        return (
            f"count {data.get('count')} ({listed}), truncated={data.get('truncated')}; "
            f"monthly savings listed {saving:,.2f} "
            f"{data.get('currency')}; [{data.get('since')}, {data.get('until')})"
        )
    if kind == "forecast":
        budgets = data.get("budgets") or []
        ours = [b for b in budgets if b.get("budget_id") in budget_ids]
        runs_out = "; ".join(
            f"#{b['budget_id']} {b.get('scope')} exhausts_at {b.get('exhausts_at')}" for b in ours
        )
        return (
            f"{len(data.get('series') or [])} {data.get('dimension')} series, {len(budgets)} "
            f"budgets ({len(ours)} of this run's: {runs_out or '-'}); source={data.get('source')}"
            f", truncated={data.get('truncated')}"
        )
    return "-"


def check_drivers(data: dict[str, Any]) -> tuple[bool, str]:
    """Case 3: the drivers of min(10, anomalies) anomalies were worked out."""
    items = data.get("anomalies") or []
    want = min(DRIVERS_DEFAULT, len(items))
    got = sum(1 for a in items[:DRIVERS_DEFAULT] if a.get("drivers") is not None)
    if not items:
        return True, "no anomalies at threshold 2: drivers not exercised"
    named = sum(1 for a in items[:DRIVERS_DEFAULT] if a.get("drivers"))
    ok = got == want
    return ok, (
        f"drivers of the {want} largest-score anomalies computed: {got} of {want} "
        f"({named} name at least one driver) -- {'ok' if ok else 'MISMATCH'}"
    )


def check_series(stack: h.Stack, data: dict[str, Any]) -> tuple[bool, str]:
    """Case 1: series_evaluated = the distinct team_ids with usage in the days evaluated."""
    since = datetime.fromisoformat(data["since"])
    until = datetime.fromisoformat(data["until"])
    with stack.pg() as conn:
        teams = conn.execute(
            f"SELECT count(DISTINCT team_id) FROM {gen_ledger.LEDGER} "
            "WHERE occurred_at >= %s AND occurred_at < %s",
            (since, until),
        ).fetchone()[0]
    got = data.get("series_evaluated")
    insufficient = len(data.get("insufficient_history") or [])
    ok = got == teams
    note = f"; {insufficient} more listed with insufficient history" if insufficient else ""
    return ok, (
        f"series_evaluated {got} vs distinct team_ids with usage in [{data['since']}, "
        f"{data['until']}) from the ledger: {teams} -- {'match' if ok else 'MISMATCH'}{note}"
    )


# --- budgets for /forecast ----------------------------------------------------------------------


def request(
    conn: http.client.HTTPConnection, method: str, path: str, key: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    payload = None
    if body is not None:
        payload = json.dumps(body)
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw[:300].decode(errors="replace")


def _limit(units: int, factor: Decimal) -> str:
    """A whole-dollar cost limit: factor x the spend (rollup units of 1e-10 USD), at least 1."""
    usd = Decimal(units) / Decimal(10**10) * factor
    return str(max(Decimal(1), usd.quantize(Decimal(1), rounding=ROUND_CEILING)))


def budget_bodies(stack: h.Stack, run_id: str, now: datetime) -> list[dict[str, Any]]:
    """Global, largest team, largest project: limits from their last 30 days' spend (the global
    one runs out near month end, the team's mid-month, the project's not at all)."""
    since = now - timedelta(days=30)
    with stack.pg() as conn:
        total = conn.execute(
            "SELECT COALESCE(SUM(cost_units), 0) FROM usage_modelrollup WHERE bucket >= %s",
            (since,),
        ).fetchone()[0]
        team, team_units = conn.execute(
            "SELECT team_id, SUM(cost_units) FROM usage_modelrollup WHERE bucket >= %s "
            "AND team_id <> '' GROUP BY team_id ORDER BY 2 DESC LIMIT 1",
            (since,),
        ).fetchone()
        p_team, project, p_units = conn.execute(
            "SELECT team_id, project_id, SUM(cost_units) FROM usage_modelrollup "
            "WHERE bucket >= %s AND project_id <> '' GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 1",
            (since,),
        ).fetchone()
    common = {"period": "monthly", "timezone": "UTC", "enforcement": "soft"}
    return [
        {"name": f"{BUDGET_PREFIX}{run_id}-global", "scope": "global",
         "cost_limit": _limit(int(total), Decimal(1)), **common},
        {"name": f"{BUDGET_PREFIX}{run_id}-team", "scope": "team", "scope_id": team,
         "cost_limit": _limit(int(team_units), Decimal("0.5")), **common},
        {"name": f"{BUDGET_PREFIX}{run_id}-project", "scope": "project", "scope_id": project,
         "team_id": p_team, "cost_limit": _limit(int(p_units), Decimal(2)), **common},
    ]  # fmt: skip


def create_budgets(stack: h.Stack, run_id: str, now: datetime, ids: list[int]) -> list[str]:
    """POST the 3 budgets through a server of its own (not the timed one); their ids go into
    `ids` as they are made (for the clean-up, also on error)."""
    lines = []
    port = stack.start_uvicorn(1)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for body in budget_bodies(stack, run_id, now):
            status, answer = request(conn, "POST", "/api/v1/budgets", stack.key, body)
            if status != 201 or not isinstance(answer, dict) or "id" not in answer:
                raise RuntimeError(f"POST /api/v1/budgets {body} answered {status}: {answer}")
            ids.append(int(answer["id"]))
            target = body.get("scope_id") or "all usage"
            lines.append(
                f"#{answer['id']} {body['scope']} {target} monthly cost_limit "
                f"{body['cost_limit']} (soft)"
            )
        conn.close()
    finally:
        stack.stop("uvicorn-w1")
    return lines


def purge_budgets(stack: h.Stack, where: str) -> int:
    """Delete the budget rows named by `where` (a Django filter expression) through the ORM, so
    what cascades from them (periods, thresholds, alerts, deliveries) goes too."""
    code = (
        "from budgets.models import Budget\n"
        f"qs = Budget.objects.filter({where}, name__startswith={BUDGET_PREFIX!r})\n"
        "print(qs.delete()[1].get('budgets.Budget', 0))\n"
    )
    return int(stack.python(code).strip().splitlines()[-1])


def delete_budgets(stack: h.Stack, ids: list[int]) -> str:
    """DELETE /api/v1/budgets/<id> (it deactivates), then remove the rows."""
    deactivated, problems = 0, []
    try:
        port = stack.start_uvicorn(1)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for budget_id in ids:
                status, answer = request(conn, "DELETE", f"/api/v1/budgets/{budget_id}", stack.key)
                if status == 200 and isinstance(answer, dict) and answer.get("is_active") is False:
                    deactivated += 1
                else:
                    problems.append(f"DELETE #{budget_id}: HTTP {status} {str(answer)[:200]}")
            conn.close()
        finally:
            stack.stop("uvicorn-w1")
    except Exception as exc:  # noqa: BLE001 - clean-up: the rows are removed below anyway
        problems.append(f"DELETE through the API: {exc}")
    try:
        removed = purge_budgets(stack, f"pk__in={sorted(ids)!r}")
    except Exception as exc:  # noqa: BLE001 - reported, never hides the run's own result
        removed = 0
        problems.append(f"removing the rows: {str(exc)[-300:]}")
    line = (
        f"budgets: {deactivated} of {len(ids)} deactivated by DELETE /api/v1/budgets/<id>, "
        f"{removed} rows removed"
    )
    return line + (f" -- PROBLEM: {'; '.join(problems)}" if problems else "")


# --- the raw SQL reference ------------------------------------------------------------------------


@dataclass
class Raw:
    cold_ms: float
    warm_ms: list[float]
    groups: int
    teams: int


def raw_sql(stack: h.Stack, repeat: int, budget: float) -> Raw:
    """The ledger's own GROUP BY team and UTC day over 90 days, fetched to the client."""
    times: list[float] = []
    rows: list[Any] = []
    deadline = time.monotonic() + budget
    with stack.pg(autocommit=True) as conn:  # a new session: its first run is the cold one
        for i in range(repeat + 1):
            if i >= 2 and time.monotonic() > deadline:
                break
            t = time.perf_counter()
            rows = conn.execute(RAW_SQL).fetchall()
            times.append((time.perf_counter() - t) * 1000)
    return Raw(times[0], times[1:], len(rows), len({r[0] for r in rows}))


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--db", default=DEFAULT_DB, help=f"ledger database (default {DEFAULT_DB})")
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows the ledger must hold")
    ap.add_argument("--repeat", type=int, default=10, help="warm requests per case (default 10)")
    ap.add_argument("--raw-repeat", type=int, default=5, help="warm runs of the raw SQL")
    ap.add_argument(
        "--cases",
        default="all",
        help="'all' or comma-separated case numbers 1-6 (1 and 5: the issue's targets)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait at most for an idle machine before each cold request",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="seconds of warm runs per case at most (at least 3 requests, 1 raw SQL run)",
    )
    args = ap.parse_args()
    if args.repeat < 1 or args.raw_repeat < 1:
        ap.error("--repeat and --raw-repeat must be positive")
    if args.cases == "all":
        args.cases = [c.number for c in CASES]
    else:
        try:
            args.cases = [int(c) for c in args.cases.split(",")]
        except ValueError:
            ap.error("--cases: numbers 1-6, comma-separated")
        if not all(1 <= c <= len(CASES) for c in args.cases):
            ap.error("--cases: numbers 1-6")
    return args


def main() -> int:
    args = parse_args()
    run_id = secrets.token_hex(3)
    with h.Stack(redis_db=None, db_name=args.db, keep_db=True) as stack:
        have = gen_ledger.ledger_rows_from_rollup(stack)
        if have is None or have < args.rows:
            print(
                f"{args.db} holds {have or 0:,} rows (< {args.rows:,}); this script never builds "
                f"it. Run: .venv/bin/python bench/gen_ledger.py --db {args.db} --rows {args.rows}"
            )
            return 1
        with stack.pg() as conn:
            leftover = conn.execute(
                "SELECT count(*) FROM budgets_budget WHERE name LIKE %s", (BUDGET_PREFIX + "%",)
            ).fetchone()[0]
        if leftover:  # an earlier run that was killed before its clean-up
            h.log(f"removing {purge_budgets(stack, 'pk__gt=0')} budgets left by an earlier run")
        key_name = f"bench-analytics-{run_id}"
        stack.env["PGAPPNAME"] = key_name  # names the server's PostgreSQL sessions
        stack.key = stack.manage(
            "apikey", "create", "--name", key_name, "--scope", "global", "--quiet"
        ).split()[-1]
        counters = Counters(stack)
        budget_ids: list[int] = []
        try:
            return measure(
                stack, args, counters=counters, rows=have, run_id=run_id, budget_ids=budget_ids
            )
        finally:
            counters.close()
            if budget_ids:
                print(delete_budgets(stack, budget_ids), flush=True)
            # after the budgets: their created_by_key refers to the key
            with stack.pg() as conn:
                conn.execute("DELETE FROM usage_apikey WHERE name = %s", (key_name,))
                conn.commit()
            print(RULE, flush=True)


def measure(
    stack: h.Stack,
    args: argparse.Namespace,
    *,
    counters: PgCounters,
    rows: int,
    run_id: str,
    budget_ids: list[int],
) -> int:
    now = datetime.now(UTC)
    window = (now - RANGE, now)
    with stack.pg() as conn:
        last, db_size = conn.execute(
            f"SELECT max(occurred_at), pg_database_size(current_database()) "
            f"FROM {gen_ledger.LEDGER}"
        ).fetchone()
    header = [
        RULE,
        f"analytics  db={args.db}  ledger {rows:,} rows, {db_size / 2**30:.1f} GiB, last row "
        f"{last:%Y-%m-%d %H:%M} UTC",
        h.machine_line(stack),
        f"anomalies window [{window[0].isoformat()}, {window[1].isoformat()}); server: 1 "
        "uvicorn process, direct mode (no Redis); a global API key",
        f"target: < {TARGET_MS:,.0f} ms cold and warm (warm: p95 of {args.repeat} requests); "
        "the issue's: cases 1 and 5",
        "cold = the first request of a freshly started server process, on a new PostgreSQL "
        "session (the health probe's is terminated first); PostgreSQL's shared buffers and the "
        "OS page cache are NOT emptied (a shared server) -- 'blocks read' = blocks it still had "
        "to bring into shared_buffers",
        "-" * 76,
    ]
    print("\n".join(header), flush=True)
    missing: set[str] = set()
    failed = False
    for number in args.cases:
        case = CASES[number - 1]
        tag = f"{case.number}. {case.label:<27}"
        if case.path in missing:
            print(f"{tag} skipped: {case.path} is missing", flush=True)
            continue
        if case.number == FORECAST_CASE and not budget_ids:
            h.log("creating 3 budgets for /forecast")
            made = create_budgets(stack, run_id, now, budget_ids)
            print(f"budgets for /forecast: {'; '.join(made)}", flush=True)
        h.log(f"case {case.number}: {case.label}")
        r = time_case(stack, args, counters, case, window)
        if r.status == 404:
            missing.add(case.path)
            print(f"{tag} HTTP 404: {case.path} is missing (being written?) -- skipped", flush=True)
            continue
        if r.status != 200 or r.error:
            failed = True
            print(f"{tag} ERROR HTTP {r.status} ({r.cold_ms:.0f} ms): {r.error}", flush=True)
            print(f"{tag} url: {r.url}", flush=True)
            continue
        p50, p95 = statistics.median(r.warm_ms), percentile(r.warm_ms, 95)
        mark = "  <- the issue's target" if case.target else ""
        out = [
            f"{tag} cold {r.cold_ms:8.1f} ms  target < {TARGET_MS:,.0f} ms  "
            f"{verdict(r.cold_ms)}  ({r.size / 1024:,.1f} KiB; {r.cold_pg}; machine "
            f"{r.busy:.0%} busy before it){mark}",
            f"{tag} warm p50 {p50:7.1f} ms p95 {p95:7.1f} ms  target < {TARGET_MS:,.0f} ms  "
            f"{verdict(p95)}  ({len(r.warm_ms)} requests, keep-alive"
            f"{', cut short by --budget' if r.stopped else ''}; {r.warm_pg})",
            f"{tag} answer: {summary(case.kind, r.data, budget_ids)}",
        ]
        if case.number == 1:
            ok, line = check_series(stack, r.data)
            failed = failed or not ok
            out.append(f"{tag} check: {line}")
        if case.number == 3:
            ok, line = check_drivers(r.data)
            failed = failed or not ok
            out.append(f"{tag} check: {line}")
        print("\n".join(out), flush=True)
    h.log("raw SQL reference")
    busy = h.wait_quiet(args.quiet_wait)
    raw = raw_sql(stack, args.raw_repeat, args.budget)
    warm = (
        f"warm p50 {statistics.median(raw.warm_ms):7.1f} ms p95 "
        f"{percentile(raw.warm_ms, 95):7.1f} ms"
        if raw.warm_ms
        else "no warm run (--budget)"
    )
    print(
        f"{'raw SQL':<30} cold {raw.cold_ms:8.1f} ms  {warm}  (reference, no target: team x UTC "
        f"day sum(cost) over the ledger's last 90 days -> {raw.groups:,} groups, {raw.teams} "
        f"teams; {len(raw.warm_ms)} warm runs; machine {busy:.0%} busy before it)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
