#!/usr/bin/env python
"""Usage reports over a 10,000,000-row ledger: GET /api/v1/reports/usage and /usage/summary,
cold and warm, next to the raw SQL GROUP BY over the ledger that rollups save.

Target (issue): "A usage report grouped by team and model by day over 30 days, on a ledger of
10,000,000 rows on PostgreSQL: under 500 ms, cold and warm figures both reported."

    .venv/bin/python bench/gen_ledger.py                   # once: the 10M-row ledger (minutes)
    .venv/bin/python bench/reports.py                      # the timings
    .venv/bin/python bench/reports.py --export             # + `manage.py token export` of ~1M rows

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C; the
database is kept):
  1. runs `bench/gen_ledger.py --reuse` (instant when database --db already holds --rows rows,
     otherwise it builds it first; --no-generate: only check, and say what to run);
  2. creates a global API key (deleted again at the end);
  3. for each case -- the issue's (group_by=team_id,model, interval=day, UTC), the same in
     tz=America/New_York, and group_by=user_id,model (the fine rollup) -- and each endpoint
     (/api/v1/reports/usage, /api/v1/usage/summary), over [now - 30 days, now): starts a fresh
     uvicorn process (1 worker, as `manage.py up` runs it; no REDIS_URL: direct mode), waits for
     the machine to be idle, times the first request (cold), then --repeat requests on one
     keep-alive connection (warm: median and p95; fewer, at least 3, past --budget seconds),
     and stops the server again. An endpoint answering 404 is reported as missing and skipped;
  4. the reference in the same run: the equivalent SQL (date_trunc day in the case's time zone,
     GROUP BY the two dimensions, count and sums) over the ledger through psycopg -- the first
     run on a new session (cold) and --raw-repeat more (warm);
  5. checks each endpoint's groups (dimension values, period, requests) against that SQL's;
     (--whole-hours: the window ends at the current hour's start, so rollups answer all of it)
  6. with --export: `manage.py token export --format csv --period <hours> --output <file>` with
     <hours> chosen so the period covers ~--export-rows rows (the ledger count is printed), its
     wall time, rows/s, peak RSS (/usr/bin/time -v, else VmHWM polled from /proc) and file size.

"Cold" is the first request a freshly started server process serves (only GET /api/v1/health
before it, whose PostgreSQL session is then terminated): a new process, a new PostgreSQL session
(catalog caches empty, no plan kept), the first run of that code path. It is NOT a cold
database: the shared PostgreSQL server's buffers and the OS page cache cannot be emptied without
restarting it, so the blocks the request still had to read into shared_buffers (from the OS
cache or the disk) are printed next to it, with the sessions it opened.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
import gen_ledger

TARGET_MS = 500.0
DEFAULT_DB = gen_ledger.DB_NAME
RANGE = timedelta(days=30)
ENDPOINTS = (("reports/usage", "/api/v1/reports/usage"), ("usage/summary", "/api/v1/usage/summary"))
# (label, group_by, time zone); the first is the target.
CASES = (
    ("team_id,model day UTC", ("team_id", "model"), "UTC"),
    ("team_id,model day New_York", ("team_id", "model"), "America/New_York"),
    ("user_id,model day UTC", ("user_id", "model"), "UTC"),
)
TABLES = (gen_ledger.LEDGER, *gen_ledger.ROLLUPS)
Groups = dict[tuple[Any, ...], int]  # (dimension values..., period instant) -> requests


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def verdict(ms: float) -> str:
    return "PASS" if ms < TARGET_MS else "FAIL"


# --- PostgreSQL-side counters ---------------------------------------------------------------------


class PgCounters:
    """Sessions opened on the bench database and blocks of the ledger and rollups read into
    shared_buffers / found there, between two snapshots. Other backends report their
    statistics when idle, at most once a second: snapshot() waits that out."""

    def __init__(self, stack: h.Stack):
        self.conn = stack.pg(autocommit=True)

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
            (list(TABLES),),
        ).fetchone()
        return int(sessions), int(read), int(hit)

    def end_sessions(self, app: str) -> int:
        """Terminate the sessions of application_name `app` (the fresh server's, opened by its
        health check: the server runs with PGAPPNAME=app), so its first request connects anew."""
        where = "datname = current_database() AND application_name = %s"
        ended = self.conn.execute(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}", (app,)
        ).fetchone()[0]
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and self.conn.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE {where}", (app,)
            ).fetchone()[0]
        ):
            time.sleep(0.05)
        return int(ended)

    def close(self) -> None:
        self.conn.close()


def delta(a: tuple[int, int, int], b: tuple[int, int, int]) -> str:
    return f"PG sessions opened {b[0] - a[0]}, blocks read {b[1] - a[1]:,} / hit {b[2] - a[2]:,}"


# --- HTTP ---------------------------------------------------------------------------------------


def get(conn: http.client.HTTPConnection, path: str, key: str) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, body, time.perf_counter() - t


def last_exception(log: str) -> str:
    """The last "SomeError: message" line of a traceback in a log."""
    found = re.findall(r"^\S*(?:Error|Exception)\b.*$", log, re.MULTILINE)
    return found[-1] if found else "(no exception line)"


def groups_of(body: Any, dims: tuple[str, ...]) -> Groups | None:
    """The answer's groups, if it has the shape both endpoints share (rows of dimension values,
    period and requests)."""
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        return None
    out: Groups = {}
    for row in rows:
        if not isinstance(row, dict) or "period" not in row or "requests" not in row:
            return None
        key = (*(row.get(d) for d in dims), datetime.fromisoformat(row["period"]))
        out[key] = out.get(key, 0) + int(row["requests"])
    return out


@dataclass
class Timed:
    name: str
    case: str
    status: int = 0
    cold_ms: float = 0.0
    warm_ms: list[float] = field(default_factory=list)
    cold_pg: str = ""
    warm_pg: str = ""
    source: str = "-"
    rows: int = 0
    size: int = 0
    truncated: bool = False
    groups: Groups | None = None
    error: str = ""
    stopped: bool = False  # warm requests cut short by --budget


def time_endpoint(
    stack: h.Stack,
    args: argparse.Namespace,
    counters: PgCounters,
    *,
    name: str,
    path: str,
    case: tuple[str, tuple[str, ...], str],
    window: tuple[datetime, datetime],
) -> Timed:
    label, dims, tz = case
    query = {
        "since": window[0].isoformat(),
        "until": window[1].isoformat(),
        "group_by": ",".join(dims),
        "interval": "day",
    }
    if tz != "UTC":
        query["tz"] = tz
    url = f"{path}?{urllib.parse.urlencode(query)}"
    out = Timed(name, label)
    port = stack.start_uvicorn(1)
    try:
        counters.end_sessions(stack.env["PGAPPNAME"])
        h.wait_quiet(args.quiet_wait)
        before = counters.snapshot()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        out.status, body, took = get(conn, url, stack.key)
        out.cold_ms = took * 1000
        after = counters.snapshot()
        out.cold_pg = delta(before, after)
        if out.status != 200:
            out.error = body[:300].decode(errors="replace")
            if out.status >= 500:  # the cause is in the server's log, gone with the run
                out.error += f" -- server log: {last_exception(stack.log_tail('uvicorn-w1', 60))}"
            return out
        data = json.loads(body)
        out.size = len(body)
        out.source = str(data.get("source", "-"))
        out.rows = len(data.get("rows") or [])
        out.truncated = bool(data.get("truncated"))
        out.groups = groups_of(data, dims)
        deadline = time.monotonic() + args.budget
        for i in range(args.repeat):
            if i >= 3 and time.monotonic() > deadline:
                out.stopped = True
                break
            status, _body, took = get(conn, url, stack.key)
            if status != 200:
                out.error = f"a warm request answered HTTP {status}"
                break
            out.warm_ms.append(took * 1000)
        out.warm_pg = delta(after, counters.snapshot())
        conn.close()
    finally:
        stack.stop("uvicorn-w1")
    return out


# --- the raw SQL reference ------------------------------------------------------------------------


@dataclass
class Raw:
    case: str
    cold_ms: float
    warm_ms: list[float]
    groups: Groups
    rows_in_window: int


def raw_sql(
    stack: h.Stack,
    case: tuple[str, tuple[str, ...], str],
    window: tuple[datetime, datetime],
    repeat: int,
    budget: float,
) -> Raw:
    """What the endpoints would run without rollups: one GROUP BY over the ledger's rows in the
    window (day buckets in the case's time zone), fetched to the client."""
    label, dims, tz = case
    cols = ", ".join(dims)
    sql = (
        f"SELECT {cols}, date_trunc('day', occurred_at, %(tz)s) AS period, count(*), "
        "SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), SUM(cost) "
        f"FROM {gen_ledger.LEDGER} WHERE occurred_at >= %(since)s AND occurred_at < %(until)s "
        f"GROUP BY {cols}, period ORDER BY {cols}, period"
    )
    params = {"tz": tz, "since": window[0], "until": window[1]}
    times: list[float] = []
    deadline = time.monotonic() + budget
    with stack.pg(autocommit=True) as conn:  # a new session: its first run is the cold one
        for i in range(repeat + 1):
            if i >= 2 and time.monotonic() > deadline:
                break
            t = time.perf_counter()
            rows = conn.execute(sql, params).fetchall()
            times.append((time.perf_counter() - t) * 1000)
    groups: Groups = {}
    for row in rows:
        groups[(*row[: len(dims)], row[len(dims)])] = int(row[len(dims) + 1])
    return Raw(label, times[0], times[1:], groups, sum(groups.values()))


def compare(got: Groups | None, want: Groups, timed: Timed) -> str:
    if timed.status != 200:
        return "not compared (no answer)"
    if got is None:
        return "not compared (rows without period/requests)"
    if timed.truncated:
        return f"not compared (truncated at {timed.rows:,} rows by the endpoint's limit)"
    if got == want:
        return f"match raw SQL ({len(want):,} groups, {sum(want.values()):,} requests)"
    differ = sum(1 for k in want.keys() | got.keys() if got.get(k) != want.get(k))
    return (
        f"MISMATCH: {differ:,} of {len(want):,} groups differ "
        f"({sum(got.values()):,} vs {sum(want.values()):,} requests)"
    )


# --- export -------------------------------------------------------------------------------------


def export_period_hours(stack: h.Stack, want_rows: int, now: datetime) -> int:
    """Whole hours back from now that hold about want_rows ledger rows (from the hourly rollup)."""
    with stack.pg() as conn:
        hours = conn.execute(
            "SELECT bucket, SUM(requests) FROM usage_modelrollup WHERE bucket <= %s "
            "GROUP BY bucket ORDER BY bucket DESC",
            (now,),
        ).fetchall()
    total = 0
    for i, (_bucket, n) in enumerate(hours, start=1):
        total += int(n)
        if total >= want_rows:
            return i
    return max(1, len(hours))


def token_command_exists(stack: h.Stack) -> bool:
    out = subprocess.run(
        [h.PY, "manage.py", "help", "token"],
        check=False,
        cwd=h.REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode == 0


def run_export(stack: h.Stack, hours: int, path: Path) -> dict[str, Any]:
    """`manage.py token export` timed, with its peak RSS."""
    argv = [h.PY, "manage.py", "token", "export", "--format", "csv", "--period", str(hours)]
    argv += ["--output", str(path)]
    timer = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    if timer:
        argv = [timer, "-v", *argv]
    t = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=h.REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    hwm_kib = 0
    if not timer:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                hwm_kib = max(hwm_kib, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))  # type: ignore[union-attr]
            except (OSError, AttributeError):
                pass
            time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if timer and (m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)):
        hwm_kib = int(m.group(1))
    out: dict[str, Any] = {"rc": proc.returncode, "wall": wall, "peak_kib": hwm_kib}
    out["timer"] = bool(timer)
    out["stderr"] = stderr if proc.returncode else ""
    out["stdout"] = stdout
    if path.exists():
        out["bytes"] = path.stat().st_size
        with path.open("rb") as f:
            out["lines"] = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return out


def export_bench(stack: h.Stack, args: argparse.Namespace, now: datetime) -> list[str]:
    if not token_command_exists(stack):
        return ["export: `manage.py token` is missing (not written yet) -- skipped"]
    hours = export_period_hours(stack, args.export_rows, now)
    path = Path(tempfile.mkdtemp(prefix="tokenmgr-export-")) / "export.csv"
    try:
        h.wait_quiet(args.quiet_wait)
        t0 = datetime.now(UTC)
        r = run_export(stack, hours, path)
        t1 = datetime.now(UTC)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    if r["rc"] != 0:
        return [f"export: FAILED (exit {r['rc']}): {r['stderr'][-500:]}"]
    # The period ends when the command reads the clock, somewhere in [t0, t1].
    with stack.pg() as conn:
        most, least = (
            conn.execute(
                f"SELECT count(*) FROM {gen_ledger.LEDGER} WHERE occurred_at >= %s",
                (t - timedelta(hours=hours),),
            ).fetchone()[0]
            for t in (t0, t1)
        )
    exported = max(0, r.get("lines", 0) - 1)  # minus the header line
    within = "yes" if least <= exported <= most else "NO"
    span = f"{least:,}" if least == most else f"{least:,}-{most:,}"
    return [
        f"export csv --period {hours}: {exported:,} CSV data lines; ledger rows in the period "
        f"{span}: {'match' if within == 'yes' else 'MISMATCH (FAILED)'}",
        f"export csv: {r['wall']:.1f} s -> {exported / r['wall']:,.0f} rows/s, peak RSS "
        f"{r['peak_kib'] / 1024:,.0f} MiB ({'/usr/bin/time -v' if r['timer'] else 'VmHWM'}), "
        f"file {r.get('bytes', 0) / 2**20:,.0f} MiB",
    ]


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--db", default=DEFAULT_DB, help=f"ledger database (default {DEFAULT_DB})")
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows the ledger must hold")
    ap.add_argument("--repeat", type=int, default=20, help="warm requests per case (default 20)")
    ap.add_argument("--raw-repeat", type=int, default=5, help="warm runs of the raw SQL")
    ap.add_argument(
        "--no-generate",
        action="store_true",
        help="do not run gen_ledger.py --reuse; only check the database",
    )
    ap.add_argument(
        "--cases",
        default="all",
        help="'all' or comma-separated case numbers 1-3 (1: the issue's target)",
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
    ap.add_argument(
        "--whole-hours",
        action="store_true",
        help="until = the current hour's start (since = 30 days before): rollups answer all of "
        "it, no sub-hour edges read from the ledger",
    )
    ap.add_argument("--export", action="store_true", help="also time `manage.py token export`")
    ap.add_argument("--export-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.repeat < 1 or args.raw_repeat < 1:
        ap.error("--repeat and --raw-repeat must be positive")
    if args.cases == "all":
        args.cases = list(range(1, len(CASES) + 1))
    else:
        try:
            args.cases = [int(c) for c in args.cases.split(",")]
        except ValueError:
            ap.error("--cases: numbers 1-3, comma-separated")
        if not all(1 <= c <= len(CASES) for c in args.cases):
            ap.error("--cases: numbers 1-3")
    return args


def ensure_ledger(args: argparse.Namespace) -> bool:
    if args.no_generate:
        return True
    gen = Path(__file__).resolve().parent / "gen_ledger.py"
    h.log(f"gen_ledger.py --reuse --db {args.db} --rows {args.rows}")
    done = subprocess.run(
        [h.PY, str(gen), "--reuse", "--db", args.db, "--rows", str(args.rows)], check=False
    )
    return done.returncode == 0


def main() -> int:
    args = parse_args()
    if not ensure_ledger(args):
        print(
            f"could not build the ledger; run: .venv/bin/python bench/gen_ledger.py --db {args.db}"
        )
        return 1
    run_id = secrets.token_hex(3)
    with h.Stack(redis_db=None, db_name=args.db, keep_db=True) as stack:
        have = gen_ledger.ledger_rows_from_rollup(stack)
        if have is None or have < args.rows:
            print(
                f"{args.db} holds {have or 0:,} rows (< {args.rows:,}); run: "
                f".venv/bin/python bench/gen_ledger.py --db {args.db} --rows {args.rows}"
            )
            return 1
        key_name = f"bench-reports-{run_id}"
        stack.env["PGAPPNAME"] = key_name  # names the server's PostgreSQL sessions
        stack.key = stack.manage("apikey", "create", "--name", key_name, "--quiet").split()[-1]
        counters = PgCounters(stack)
        try:
            return measure(stack, args, counters, have)
        finally:
            counters.close()
            with stack.pg() as conn:
                conn.execute("DELETE FROM usage_apikey WHERE name = %s", (key_name,))
                conn.commit()


def measure(stack: h.Stack, args: argparse.Namespace, counters: PgCounters, rows: int) -> int:
    now = datetime.now(UTC)
    until = now.replace(minute=0, second=0, microsecond=0) if args.whole_hours else now
    window = (until - RANGE, until)
    with stack.pg() as conn:
        last, db_size = conn.execute(
            f"SELECT max(occurred_at), pg_database_size(current_database()) "
            f"FROM {gen_ledger.LEDGER}"
        ).fetchone()
    rule = "=" * 76
    header = [
        rule,
        f"reports  db={args.db}  ledger {rows:,} rows, {db_size / 2**30:.1f} GiB, last row "
        f"{last:%Y-%m-%d %H:%M} UTC",
        h.machine_line(stack),
        f"window [{window[0].isoformat()}, {window[1].isoformat()})"
        f"{' (--whole-hours)' if args.whole_hours else ''}; interval=day; server: 1 uvicorn "
        "process, direct mode (no Redis)",
        f"target: < {TARGET_MS:.0f} ms cold and warm (warm: p95 of {args.repeat} requests)",
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
        label = case[0]
        results = []
        for name, path in ENDPOINTS:
            if name in missing:
                continue
            h.log(f"{name} [{label}]")
            r = time_endpoint(stack, args, counters, name=name, path=path, case=case, window=window)
            if r.status == 404:
                missing.add(name)
                print(f"{name:<14} HTTP 404: the endpoint is missing (being written?) -- skipped",
                      flush=True)  # fmt: skip
                continue
            results.append(r)
        h.log(f"raw SQL [{label}]")
        raw = raw_sql(stack, case, window, args.raw_repeat, args.budget)
        for r in results:
            tag = f"{r.name:<14} [{r.case}]"
            if r.status != 200 or r.error:
                failed = True
                out = [f"{tag} ERROR HTTP {r.status}: {r.error}"]
            else:
                p50, p95 = statistics.median(r.warm_ms), percentile(r.warm_ms, 95)
                answer = compare(r.groups, raw.groups, r)
                failed = failed or answer.startswith("MISMATCH")
                out = [
                    f"{tag} cold {r.cold_ms:8.1f} ms  target < {TARGET_MS:.0f} ms  "
                    f"{verdict(r.cold_ms)}  (source={r.source}, {r.rows:,} rows, "
                    f"{r.size / 1024:,.0f} KiB; {r.cold_pg})",
                    f"{tag} warm p50 {p50:6.1f} ms p95 {p95:6.1f} ms  target < "
                    f"{TARGET_MS:.0f} ms  {verdict(p95)}  ({len(r.warm_ms)} requests, keep-alive"
                    f"{', cut short by --budget' if r.stopped else ''}; {r.warm_pg})",
                    f"{tag} answer: {answer}",
                ]
            print("\n".join(out), flush=True)
        out_raw = (
            f"{'raw SQL':<14} [{label}] cold {raw.cold_ms:8.1f} ms  warm p50 "
            f"{statistics.median(raw.warm_ms):6.1f} ms p95 {percentile(raw.warm_ms, 95):6.1f} ms"
            f"  (reference, no target: GROUP BY over {raw.rows_in_window:,} ledger rows -> "
            f"{len(raw.groups):,} groups; {len(raw.warm_ms)} warm runs)"
        )
        print(out_raw, flush=True)
    if args.export:
        h.log("export")
        for line in export_bench(stack, args, now):
            failed = failed or "FAILED" in line
            print(line, flush=True)
    print(rule)
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
