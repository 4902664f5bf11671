#!/usr/bin/env python
"""Batch ingestion, end to end: HTTP accepted -> rows visible in PostgreSQL.

Target (issue): at least 20,000 events/s on this 2-core machine, reported next to the raw
PostgreSQL COPY rate measured in the same run.

    .venv/bin/python bench/ingest_batch.py                 # Redis buffer + celery worker/beat
    .venv/bin/python bench/ingest_batch.py --mode direct   # no REDIS_URL: rows inserted in-request
    .venv/bin/python bench/ingest_batch.py --live          # with the staff dashboard stream live
    .venv/bin/python bench/ingest_batch.py --provenance    # every event names a parent

Issue 10's condition on it: still >= 25 % of the same run's raw COPY rate with the dashboard
stream live (--live). The provenance issue's: still >= 25 % of the same run's raw COPY rate
with every event carrying provenance (--provenance).

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C):
  1. drops/creates database `tokenmgr_bench`, starts its own Redis (AOF on), migrates, creates
     an API key;
  2. starts uvicorn (--workers 2 by default) and, in redis mode, a celery worker (concurrency 1)
     and celery beat;
  3. warms every server process up with a few small batches, waits until they are in the ledger;
  4. raw COPY rate: the same number of rows, cloned from a row the app itself wrote, COPYed into
     a fresh `CREATE TABLE ... (LIKE usage_tokenusage INCLUDING ALL)` (same indexes, constraints
     and generated total_tokens column, which is left out of the column list) with psycopg's
     cursor.copy(): once with write_row() from Python tuples, once as pre-encoded COPY text;
  5. sends N events as batches of 1000 from a few keep-alive client threads (bodies encoded
     before the clock starts) and times first request sent -> last response (HTTP accept) and
     -> `SELECT count(*) FROM usage_tokenusage` showing all N rows (end to end);
  6. checks every batch answered created == batch size and the ledger holds exactly the N new
     request_ids, with nothing left in the Redis buffer.
With --live (redis mode only), before step 5 it also starts the live-status broadcaster
(`manage.py broadcast_status`) and connects 5 dashboard websockets (`ws/dashboard/`, a
superuser's session cookie) in a process of their own (bench/_live_clients.py), and reports the
dashboard updates they received while the events went in (per client: how many, how often, the
longest silence).
With --provenance every event carries `provenance` with a parent and a relationship: each batch
holds trees of 5-40 requests whose top names a request of an earlier batch (or a warm-up row,
for the first ones; at most 3 deep, so no chain grows past 8) and whose other requests name one
earlier in the same tree; relationships triggered_by / tool_call_of / part_of / retry_of /
derived_from (follow_up_of or part_of for a top), agent_type and workflow_step on most, an
input_hash on 40 %, a small system_context on 20 %. A top whose parent is not in the ledger
yet when its batch is accepted (still in the Redis buffer, or in a batch in flight) waits with
its tree (depth unknown) until the parent's flush resolves it, as in production, where a child
request often ends, and is reported, before its parent. The warm-up then also sends such
trees, the raw COPY clones a row that has a parent (the same layout, lineage columns filled in),
and the check also asks that every event got its tree edge and exactly the depth and root its
place in the trees gives it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import random
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
from _live_clients import LiveClients, dashboard_summary

TARGET_EVENTS_PER_S = 20_000
TARGET_COPY_SHARE_LIVE = 0.25  # issue 10: >= 25 % of raw COPY (write_row) with the stream live
TARGET_COPY_SHARE_PROVENANCE = 0.25  # provenance: >= 25 % of raw COPY with every event linked
LIVE_DASHBOARDS = 5
REDIS_DB = 5
DEPTH_KEY = "tokenmgr:usage:depth"
STREAM_KEY = "tokenmgr:usage:stream"
_COUNTS_RE = re.compile(rb'"created":(\d+),"duplicates":(\d+),"rejected":(\d+)')


def event(rid: str, i: int) -> dict[str, Any]:
    # The minimal event, with a little variety in tokens and attribution.
    return {
        "request_id": rid,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 120 + i % 50,
        "output_tokens": 30 + i % 7,
        "team_id": f"t{i % 5}",
        "project_id": f"p{i % 11}",
        "feature": "chat",
        "agent": f"a{i % 3}",
    }


def make_bodies(prefix: str, n_events: int, batch: int) -> list[tuple[bytes, int]]:
    bodies = []
    for start in range(0, n_events, batch):
        size = min(batch, n_events - start)
        events = [event(f"{prefix}-{i}", i) for i in range(start, start + size)]
        bodies.append((json.dumps({"events": events}, separators=(",", ":")).encode(), size))
    return bodies


# Relationship of a request to its parent inside a tree; a tree's top relates to an earlier one.
_TREE_RELATIONSHIPS = (
    ("triggered_by", 0.55), ("tool_call_of", 0.25), ("part_of", 0.1), ("retry_of", 0.05),
    ("derived_from", 0.05),
)  # fmt: skip
_AGENT_STEPS = (("orchestrator", "route"), ("planner", "plan"), ("tool", "retrieve"),
                ("tool", "execute"), ("worker", "answer"), ("reviewer", "review"))  # fmt: skip
MAX_TOP_DEPTH = 3  # a tree hangs from a request at most this deep
TREE_LEVELS = 5  # levels inside one tree below its top


def _pick(rng: random.Random, weighted: tuple[tuple[str, float], ...]) -> str:
    x = rng.random()
    for value, weight in weighted:
        x -= weight
        if x < 0:
            return value
    return weighted[-1][0]


class Trees:
    """Batches of provenance events (see --provenance), and the depth and root each request
    must end up with. `anchors`: requests already in the ledger (roots) the first trees hang
    from."""

    def __init__(self, anchors: list[str], seed: int = 1):
        self.rng = random.Random(seed)
        self.shallow: list[tuple[str, int]] = [(a, 0) for a in anchors]  # (id, depth)
        self.expected: dict[str, tuple[int, str]] = {a: (0, a) for a in anchors}

    def bodies(self, prefix: str, n_events: int, batch: int) -> list[tuple[bytes, int]]:
        rng, i = self.rng, 0
        out: list[tuple[bytes, int]] = []
        for start in range(0, n_events, batch):
            size = min(batch, n_events - start)
            events: list[dict[str, Any]] = []
            new_shallow: list[tuple[str, int]] = []
            while len(events) < size:
                top, top_depth = self.shallow[-1 - rng.randrange(min(len(self.shallow), 10_000))]
                root = self.expected[top][1]
                tree: list[tuple[str, int]] = []
                workflow = f"{prefix}-wf{i}"
                for k in range(min(rng.randint(5, 40), size - len(events))):
                    rid = f"{prefix}-{i}"
                    if k == 0:
                        parent, depth = top, top_depth + 1
                        rel = "follow_up_of" if top_depth == 0 else "part_of"
                    else:
                        parent, pdepth = rng.choice(
                            [n for n in tree if n[1] < top_depth + TREE_LEVELS]
                        )
                        depth, rel = pdepth + 1, _pick(rng, _TREE_RELATIONSHIPS)
                    ev = event(rid, i)
                    ev["workflow_id"] = workflow
                    prov: dict[str, Any] = {"parent_request_id": parent, "relationship": rel}
                    if rng.random() < 0.7:
                        agent_type, step = _AGENT_STEPS[rng.randrange(len(_AGENT_STEPS))]
                        prov.update(agent_type=agent_type, workflow_step=step)
                    if rng.random() < 0.4:
                        prov["input_hash"] = f"{rng.getrandbits(256):064x}"
                    if rng.random() < 0.2:
                        prov["system_context"] = {"env": "prod", "prompt_version": i % 7}
                    ev["provenance"] = prov
                    events.append(ev)
                    self.expected[rid] = (depth, root)
                    tree.append((rid, depth))
                    if depth <= MAX_TOP_DEPTH:
                        new_shallow.append((rid, depth))
                    i += 1
            self.shallow.extend(new_shallow)
            out.append((json.dumps({"events": events}, separators=(",", ":")).encode(), size))
        return out


# --- the HTTP load ------------------------------------------------------------------------------


class Sender:
    """`clients` threads, one keep-alive connection each, taking the next body until none left."""

    def __init__(self, port: int, key: str, bodies: list[tuple[bytes, int]], clients: int):
        self.port, self.bodies, self.clients = port, bodies, clients
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(clients + 1)
        self.statuses: dict[int, int] = {}
        self.created = self.duplicates = self.rejected = 0
        self.bad_batches: list[str] = []
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.t_start = self.t_last = 0.0

    def _send_all(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        self._barrier.wait()
        try:
            while (i := next(self._next)) < len(self.bodies):
                body, size = self.bodies[i]
                t = time.perf_counter()
                conn.request("POST", "/api/v1/usage/batch", body=body, headers=self.headers)
                resp = conn.getresponse()
                raw = resp.read()
                done = time.perf_counter()
                self._record(i, size, resp.status, raw, took=done - t, done=done)
        except Exception as exc:  # noqa: BLE001 - reported, fails the run
            with self._lock:
                self.errors.append(repr(exc))
        finally:
            conn.close()

    def _record(
        self, i: int, size: int, status: int, raw: bytes, *, took: float, done: float
    ) -> None:
        m = _COUNTS_RE.search(raw, 0, 200)  # the summary leads the body; skip parsing the rest
        if m:
            created, dups, rejected = (int(x) for x in m.groups())
        elif status == 200:
            data = json.loads(raw)
            created, dups, rejected = data["created"], data["duplicates"], data["rejected"]
        else:
            created = dups = rejected = 0
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.created += created
            self.duplicates += dups
            self.rejected += rejected
            self.latencies.append(took)
            self.t_last = max(self.t_last, done)
            if status != 200 or created != size:
                self.bad_batches.append(f"batch {i}: HTTP {status} created={created} {raw[:300]!r}")

    def start(self) -> threading.Thread:
        """Start the clients; returns a thread that ends when all responses are back."""
        threads = [
            threading.Thread(target=self._send_all, daemon=True) for _ in range(self.clients)
        ]
        for t in threads:
            t.start()
        self.t_start = time.perf_counter()
        self._barrier.wait()
        joiner = threading.Thread(target=lambda: [t.join() for t in threads], daemon=True)
        joiner.start()
        return joiner


# --- raw COPY -----------------------------------------------------------------------------------


def insertable_columns(conn: Any) -> list[str]:
    """The ledger's columns minus the identity id and the generated total_tokens."""
    rows = conn.execute(
        """SELECT column_name FROM information_schema.columns
           WHERE table_name = 'usage_tokenusage' AND is_generated = 'NEVER'
             AND is_identity = 'NO' AND coalesce(column_default, '') NOT LIKE 'nextval(%'
           ORDER BY ordinal_position"""
    ).fetchall()
    return [r[0] for r in rows]


def copy_bench(stack: h.Stack, n_rows: int, *, linked: bool = False) -> dict[str, float]:
    """COPY n_rows rows shaped like a row the app wrote into fresh LIKE-copies of the ledger
    (`linked`: a row with a parent, its lineage columns filled in)."""
    with stack.pg() as conn:
        cols = insertable_columns(conn)
        col_sql = ", ".join(cols)
        where = "WHERE parent_request_id <> '' AND depth IS NOT NULL" if linked else ""
        template = list(
            conn.execute(f"SELECT {col_sql} FROM usage_tokenusage {where} LIMIT 1").fetchone()
        )
        for i, v in enumerate(template):
            if isinstance(v, (dict, list)):  # jsonb: the app sends JSON text, so do we
                template[i] = json.dumps(v, separators=(",", ":"))
        rid = cols.index("request_id")
        salt = secrets.token_hex(4)
        rows = []
        for i in range(n_rows):
            row = list(template)
            row[rid] = f"copy-{salt}-{i:09d}"
            rows.append(tuple(row))
        for table in ("usage_copybench", "usage_copybench_text"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (LIKE usage_tokenusage INCLUDING ALL)")
        conn.commit()
        conn.execute("CHECKPOINT")
        conn.commit()
        out: dict[str, float] = {}

        # 1. write_row() from Python tuples: psycopg adapts datetime/Decimal/bool/None per value
        cur = conn.cursor()
        t = time.perf_counter()
        with cur.copy(f"COPY usage_copybench ({col_sql}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
        conn.commit()
        out["write_row_s"] = time.perf_counter() - t

        # 2. the same rows as pre-encoded COPY text: what the server alone needs
        buf = io.BytesIO()
        with cur.copy(f"COPY usage_copybench ({col_sql}) TO STDOUT") as cp:
            for chunk in cp:
                buf.write(chunk)
        data = buf.getvalue()
        conn.commit()
        conn.execute("CHECKPOINT")
        conn.commit()
        t = time.perf_counter()
        with cur.copy(f"COPY usage_copybench_text ({col_sql}) FROM STDIN") as cp:
            for start in range(0, len(data), 1 << 20):
                cp.write(data[start : start + (1 << 20)])
        conn.commit()
        out["text_s"] = time.perf_counter() - t

        for table in ("usage_copybench", "usage_copybench_text"):
            n = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if n != n_rows:
                raise RuntimeError(f"COPY bench: {table} has {n} rows, expected {n_rows}")
            conn.execute(f"DROP TABLE {table}")
        conn.commit()
        conn.execute("CHECKPOINT")
        conn.commit()
    return out


# --- helpers ------------------------------------------------------------------------------------


def ledger_count(conn: Any, prefix: str | None = None) -> int:
    if prefix is None:
        return conn.execute("SELECT count(*) FROM usage_tokenusage").fetchone()[0]
    return conn.execute(
        "SELECT count(*) FROM usage_tokenusage WHERE request_id LIKE %s", (prefix + "-%",)
    ).fetchone()[0]


def wait_count(stack: h.Stack, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    with stack.pg(autocommit=True) as conn:
        while True:
            n = ledger_count(conn)
            if n >= expected or time.monotonic() > deadline:
                return n
            stack.check_alive()
            time.sleep(0.1)


def warm_up(stack: h.Stack, port: int, workers: int, trees: bool = False) -> tuple[int, Any]:
    """Concurrent small batches so every uvicorn worker has loaded prices, the key, etc.
    `trees`: then provenance batches hanging from those; returns (events, Trees or None)."""
    n_req, size = max(4, workers * 4), 200
    prefix = "warm-" + secrets.token_hex(3)
    rounds = [make_bodies(prefix, n_req * size, size)]
    gen = Trees([f"{prefix}-{i}" for i in range(n_req * size)]) if trees else None
    if gen is not None:
        rounds.append(gen.bodies(prefix + "-tree", n_req * size, size))
    total = 0
    for bodies in rounds:
        sender = Sender(port, stack.key, bodies, 8)
        sender.start().join()
        if sender.errors or sender.bad_batches:
            raise RuntimeError(f"warm-up failed: {(sender.errors + sender.bad_batches)[:3]}")
        total += n_req * size
        if wait_count(stack, total, 60) != total:  # the trees' tops name these rows
            raise RuntimeError("warm-up events did not reach the ledger")
    return total, gen


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def wait_visible(
    stack: h.Stack, conn: Any, rds: Any, expected: int, timeout: float
) -> float | None:
    """Time at which count(*) first showed `expected` rows. While the Redis buffer still holds
    events, poll its depth (cheap) instead of counting; t is taken when the final query starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rds is not None and int(rds.get(DEPTH_KEY) or 0) > 0:
            time.sleep(0.01)
            continue
        t_query = time.perf_counter()
        if ledger_count(conn) >= expected:
            return t_query
        stack.check_alive()
        time.sleep(0.05)
    return None


def lineage_check(conn: Any, prefix: str, expected: dict[str, tuple[int, str]]) -> dict[str, int]:
    """This run's tree edges, rows still waiting for a parent, and rows whose depth or root is
    not what their place in the trees gives (after waiting up to 10 s for the waiting ones)."""
    deadline = time.monotonic() + 10
    while True:
        rows = conn.execute(
            "SELECT request_id, depth, root_request_id FROM usage_tokenusage "
            "WHERE request_id LIKE %s",
            (prefix + "-%",),
        ).fetchall()
        waiting = sum(1 for _rid, depth, _root in rows if depth is None)
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    edges = conn.execute(
        "SELECT count(*) FROM provenance_provenancerelationship "
        "WHERE is_tree AND from_request_id LIKE %s",
        (prefix + "-%",),
    ).fetchone()[0]
    wrong = sum(1 for rid, depth, root in rows if expected.get(rid) != (depth, root))
    return {"edges": edges, "waiting": waiting, "wrong": wrong - waiting}


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=("redis", "direct"), default="redis")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000, help="events per request, 1..1000")
    ap.add_argument("--clients", type=int, default=4, help="concurrent keep-alive client threads")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn --workers")
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to wait for rows (default 120; 1800 with --provenance)",
    )
    ap.add_argument("--skip-copy", action="store_true", help="do not measure the raw COPY rate")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to pause before the timed run (e.g. to let the COPY's writes settle)",
    )
    ap.add_argument(
        "--live",
        action="store_true",
        help=f"with the broadcaster and {LIVE_DASHBOARDS} dashboard websockets live (issue 10)",
    )
    ap.add_argument(
        "--provenance",
        action="store_true",
        help="every event carries provenance: trees per batch, parents earlier (see above)",
    )
    h.add_common_args(ap)
    args = ap.parse_args()
    if not 1 <= args.batch <= 1000:
        ap.error("--batch must be 1..1000")
    if args.live and args.mode != "redis":
        ap.error("--live needs --mode redis (the broadcaster process runs with Redis)")
    if args.drain_timeout is None:
        args.drain_timeout = 1800.0 if args.provenance else 120.0
    return args


def start_live(stack: h.Stack, port: int) -> LiveClients:
    """The broadcaster and the dashboard websockets; returns once each has had an update."""
    cookie = stack.staff_session()
    stack.start_broadcaster()
    clients = LiveClients(
        stack, port, key=stack.key, conversations=[], dashboards=LIVE_DASHBOARDS, cookie=cookie
    )
    clients.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stack.check_alive()
        if clients.dashboard_frames() >= LIVE_DASHBOARDS:
            return clients
        time.sleep(0.1)
    raise RuntimeError("the dashboard websockets got no update within 30 s")


def main() -> int:
    args = parse_args()
    run_id = secrets.token_hex(4)
    prefix = f"bb-{run_id}"
    redis_db = REDIS_DB if args.mode == "redis" else None
    h.log(
        f"mode={args.mode} events={args.events} batch={args.batch} clients={args.clients} "
        f"uvicorn --workers {args.workers} settings={args.settings}"
        + (f" live: broadcaster + {LIVE_DASHBOARDS} dashboard websockets" if args.live else "")
        + (" provenance: every event names a parent" if args.provenance else "")
    )
    r: dict[str, Any] = {}
    env = {"DJANGO_SETTINGS_MODULE": args.settings}
    with h.Stack(redis_db=redis_db, extra_env=env) as stack:
        stack.setup()
        port = stack.start_uvicorn(args.workers)
        if args.mode == "redis":
            stack.start_worker()
            stack.start_beat()
        h.log(f"servers up (uvicorn on 127.0.0.1:{port}); warming up")
        warm, trees = warm_up(stack, port, args.workers, trees=args.provenance)
        if wait_count(stack, warm, 60) != warm:
            raise RuntimeError("warm-up events did not reach the ledger")
        r["machine"] = h.machine_line(stack)
        if not args.skip_copy:
            h.log(f"raw COPY of {args.events} rows")
            r["copy"] = copy_bench(stack, args.events, linked=args.provenance)

        live = start_live(stack, port) if args.live else None
        if args.settle:
            time.sleep(args.settle)
        if trees is not None:
            bodies = trees.bodies(prefix, args.events, args.batch)
        else:
            bodies = make_bodies(prefix, args.events, args.batch)
        kib = sum(len(b) for b, _ in bodies) / len(bodies) / 1024
        h.log(f"sending {args.events} events as {len(bodies)} batches ({kib:.0f} KiB each)")
        rds = stack.redis() if redis_db is not None else None
        peak_depth = 0
        profiler = h.Profiler(stack, args.profile, ("uvicorn", "celery-worker"))
        profiler.start()
        with stack.pg(autocommit=True) as conn, h.PgConnMonitor(stack) as pgmon:
            sender = Sender(port, stack.key, bodies, args.clients)
            cpu0 = h.cpu_snapshot(stack)
            joiner = sender.start()
            while joiner.is_alive():
                if rds is not None:
                    peak_depth = max(peak_depth, int(rds.get(DEPTH_KEY) or 0))
                joiner.join(0.05)
            stack.check_alive()
            t_end = wait_visible(stack, conn, rds, warm + args.events, args.drain_timeout)
            cpu1 = h.cpu_snapshot(stack)
            t_end_wall = time.time()
            r["profiles"] = profiler.stop()
            r["total"] = ledger_count(conn)
            r["ours"] = ledger_count(conn, prefix)
            r["distinct"] = conn.execute(
                "SELECT count(DISTINCT request_id) FROM usage_tokenusage WHERE request_id LIKE %s",
                (prefix + "-%",),
            ).fetchone()[0]
            if trees is not None:
                r["lineage"] = lineage_check(conn, prefix, trees.expected)
        if live is not None:
            time.sleep(0.5)  # updates still on their way
            wall_start = t_end_wall - ((t_end or time.perf_counter()) - sender.t_start)
            live_results = live.stop()
            r["live"] = dashboard_summary(live_results, wall_start, t_end_wall)
            r["live"]["closes"] = sum(len(v) for v in live_results["closes"].values())
            r["live"]["wall"] = t_end_wall - wall_start
        r["buffer_left"] = int(rds.get(DEPTH_KEY) or 0) if rds is not None else 0
        r["pending"] = int(rds.xpending(STREAM_KEY, "flushers")["pending"]) if rds else 0

    wall = (t_end or time.perf_counter()) - sender.t_start
    r.update(
        warm=warm,
        t_end=t_end,
        peak_depth=peak_depth,
        cpu=h.cpu_report(cpu0, cpu1, wall),
        pg_sessions=pgmon.summary(),
    )
    return report(args, run_id, len(bodies), sender, r)


def report(args: argparse.Namespace, run_id: str, n_bodies: int, sender: Sender, r: dict) -> int:
    n = args.events
    accept_s = sender.t_last - sender.t_start
    e2e_s = (r["t_end"] - sender.t_start) if r["t_end"] is not None else float("nan")
    e2e_rate = n / e2e_s if r["t_end"] is not None else 0.0
    ok = (
        not sender.errors
        and not sender.bad_batches
        and sender.created == n
        and r["ours"] == n
        and r["distinct"] == n
        and r["total"] == r["warm"] + n
        and r["buffer_left"] == 0
        and r["pending"] == 0
    )
    if "lineage" in r:
        lin = r["lineage"]
        ok = ok and lin["edges"] == n and lin["waiting"] == 0 and lin["wrong"] == 0
    lat = sender.latencies
    rule = "=" * 76
    print(f"\n{rule}")
    print(
        f"ingest_batch  mode={args.mode}  uvicorn --workers {args.workers}  "
        f"clients={args.clients}  run={run_id}"
    )
    if args.settings != "tokenmgr_project.settings":
        print(f"WHAT-IF settings: {args.settings}")
    if args.provenance:
        print("provenance: every event names a parent (trees per batch; see --help)")
    print(r["machine"])
    print("-" * 76)
    print(f"events                   {n:>12,}  ({n_bodies} batches of {args.batch})")
    print(f"HTTP accept  seconds     {accept_s:>12.2f}  -> {n / accept_s:>9,.0f} events/s")
    print(
        f"  batch latency p50/p99/max  {percentile(lat, 50) * 1000:.0f} / "
        f"{percentile(lat, 99) * 1000:.0f} / {max(lat) * 1000:.0f} ms"
    )
    if args.mode == "redis":
        print(f"  peak Redis buffer depth    {r['peak_depth']:,} events")
    print(
        f"end to end   seconds     {e2e_s:>12.2f}  -> {e2e_rate:>9,.0f} events/s"
        "  (first send -> count(*) = N)"
    )
    if "copy" in r:
        wr = n / r["copy"]["write_row_s"]
        tx = n / r["copy"]["text_s"]
        print(
            f"raw COPY     write_row() {r['copy']['write_row_s']:>12.2f}  -> {wr:>9,.0f} rows/s"
            "  (psycopg cursor.copy, Python tuples, 1 txn)"
        )
        print(
            f"raw COPY     text        {r['copy']['text_s']:>12.2f}  -> {tx:>9,.0f} rows/s"
            "  (pre-encoded COPY text)"
        )
        print(
            f"end to end / raw COPY   {e2e_rate / wr:>12.1%}  (write_row) {e2e_rate / tx:.1%} text"
        )
    if "live" in r:
        print(
            f"live         broadcaster + {LIVE_DASHBOARDS} dashboard websockets during the "
            f"{r['live']['wall']:.1f} s timed run:"
        )
        if r["live"]["closes"]:
            print(f"  ! dashboard sockets dropped by the server: {r['live']['closes']}")
        for c in r["live"]["clients"]:
            print(
                f"  {c['name']}: {c['n']} updates = {c['rate']:.2f}/s, gaps min "
                f"{c['min_gap']:.3f} max {c['max_gap']:.3f} s, longest silence "
                f"{c['longest_silence']:.2f} s; {c['with_usage']} with usage "
                f"({c['usage_requests']:,} requests), {c['with_state']} with state"
            )
    print(
        f"responses    created={sender.created:,} duplicates={sender.duplicates} "
        f"rejected={sender.rejected} HTTP statuses={sender.statuses}"
    )
    print(
        f"ledger       rows with this run's ids={r['ours']:,} distinct={r['distinct']:,} "
        f"lost={n - r['ours']} buffer left={r['buffer_left']} pending={r['pending']}"
    )
    if "lineage" in r:
        lin = r["lineage"]
        print(
            f"lineage      tree edges={lin['edges']:,} (of {n:,}) still waiting for a parent="
            f"{lin['waiting']} wrong depth/root={lin['wrong']}"
        )
    for line in (sender.errors + sender.bad_batches)[:5]:
        print(f"  ! {line}")
    print("-" * 76)
    print(r["cpu"])
    print(r["pg_sessions"])
    for path in r["profiles"]:
        print(h.pyspy_summary(path))
    print("-" * 76)
    lineage_ok = " and every link recorded" if "lineage" in r else ""
    print(f"integrity: {'OK (no event lost or duplicated' + lineage_ok + ')' if ok else 'FAILED'}")
    verdict = "PASS" if ok and e2e_rate >= TARGET_EVENTS_PER_S else "FAIL"
    print(f"target: >= {TARGET_EVENTS_PER_S} events/s  -> {verdict} ({e2e_rate:,.0f} events/s)")
    if "live" in r and "copy" in r:
        share = e2e_rate / (n / r["copy"]["write_row_s"])
        streamed = all(c["n"] > 0 for c in r["live"]["clients"])
        verdict = "PASS" if ok and streamed and share >= TARGET_COPY_SHARE_LIVE else "FAIL"
        print(
            f"target (issue 10): >= {TARGET_COPY_SHARE_LIVE:.0%} of raw COPY with the dashboard "
            f"stream live -> {verdict} ({share:.1%}; updates received by every client: "
            f"{'yes' if streamed else 'no'})"
        )
    if "lineage" in r and "copy" in r:
        share = e2e_rate / (n / r["copy"]["write_row_s"])
        verdict = "PASS" if ok and share >= TARGET_COPY_SHARE_PROVENANCE else "FAIL"
        print(
            f"target (provenance): >= {TARGET_COPY_SHARE_PROVENANCE:.0%} of raw COPY with every "
            f"event carrying provenance -> {verdict} ({share:.1%} of write_row(), "
            f"{e2e_rate / (n / r['copy']['text_s']):.1%} of text)"
        )
    print(rule)
    return 0 if ok else 1


if __name__ == "__main__":
    h.run_main(main)
