#!/usr/bin/env python
"""Single-event POST /api/v1/usage under wrk.

Target (issue): at least 800 requests/s with p99 under 25 ms at concurrency 16, server and load
generator on this machine.

    .venv/bin/python bench/ingest_single.py                 # uvicorn --workers 1, then 2
    .venv/bin/python bench/ingest_single.py --workers 2 --duration 30

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C):
  1. drops/creates database `tokenmgr_bench`, starts its own Redis (AOF, appendfsync everysec),
     migrates, creates an API key;
  2. starts a celery worker (concurrency 1) and celery beat, so the Redis buffer drains;
  3. for each --workers value: starts uvicorn (Redis configured), warms it up with a short wrk
     run, then runs `wrk -t2 -c16 -d20s --latency -s bench/ingest_single.lua` (a unique
     request_id per request) and reads requests/s and the latency distribution; waits for the
     buffer to drain, runs a final in-process usage_flush() and checks that every 201 response
     has its row in PostgreSQL and nothing else does (requests still in flight when wrk stopped
     -- sent, response never read -- are committed too: at most -c of them);
  4. the same wrk runs (saturation, paced) against a bare uvicorn JSON endpoint
     (bench/_bare_app.py) with as many processes: the reference this run is judged beside.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

TARGET_RPS = 800
TARGET_P99_MS = 25.0
REDIS_DB = 5
DEPTH_KEY = "tokenmgr:usage:depth"
LUA = Path(__file__).resolve().parent / "ingest_single.lua"
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_exe() -> str:
    exe = shutil.which("wrk") or "/usr/bin/wrk"
    if not Path(exe).exists():
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return exe


def run_wrk(
    *,
    port: int,
    key: str,
    prefix: str,
    args: argparse.Namespace,
    seconds: int,
    pause_ms: float = 0,
) -> dict:
    argv = [
        wrk_exe(), f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency",
        "--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--", prefix, key,
        f"{pause_ms:.3f}",
    ]  # fmt: skip
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    res = parse_wrk(out.stdout)
    res["raw"] = out.stdout
    return res


def parse_wrk(text: str) -> dict[str, Any]:
    m = re.search(r"^BENCH (.*)$", text, re.M)
    if not m:
        raise RuntimeError(f"no BENCH line in wrk output:\n{text}")
    res: dict[str, Any] = {k: int(v) for k, v in (p.split("=") for p in m.group(1).split())}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    res["wrk_rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    res["non_2xx"] = int(m.group(1)) if m else 0
    # wrk --latency's own table ("  99%   12.34ms"), reported next to the exact percentiles
    block = text.split("Latency Distribution", 1)[-1]
    res["dist_ms"] = {
        int(pct): float(val) * _UNIT_MS[unit]
        for pct, val, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", block, re.M)
    }
    m = re.search(r"^FIRST_OTHER (.*)$", text, re.M)
    res["first_other"] = m.group(1)[:160] if m else ""
    return res


def wait_drained(stack: h.Stack, timeout: float = 60) -> int:
    rds = stack.redis()
    deadline = time.monotonic() + timeout
    while (depth := int(rds.get(DEPTH_KEY) or 0)) and time.monotonic() < deadline:
        stack.check_alive()
        time.sleep(0.1)
    return depth


def final_flush(stack: h.Stack) -> str:
    """usage_flush() in a fresh process. Retried: right after a run PostgreSQL may still refuse
    new sessions (per-request connections that leaked under ASGI are closed only when collected)."""
    code = (
        "from usage import services\n"
        "r = services.usage_flush()\n"
        "print(f'entries={r.entries} events={r.events} inserted={r.inserted}')\n"
    )
    for attempt in range(10):
        try:
            return stack.python(code).strip()
        except RuntimeError as exc:
            if "too many clients" not in str(exc) or attempt == 9:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def count_prefix(stack: h.Stack, prefix: str) -> int:
    with stack.pg() as conn:
        return conn.execute(
            "SELECT count(*) FROM usage_tokenusage WHERE request_id LIKE %s", (prefix + "-%",)
        ).fetchone()[0]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2", help="uvicorn --workers values, comma-separated")
    ap.add_argument("--duration", type=int, default=20, help="wrk -d seconds")
    ap.add_argument("--connections", type=int, default=16, help="wrk -c")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured wrk load first")
    ap.add_argument(
        "--rate",
        type=int,
        default=TARGET_RPS,
        help="offered req/s of the paced run (0: skip it); the target is judged on this run",
    )
    ap.add_argument("--show-wrk", action="store_true", help="also print wrk's own output")
    h.add_common_args(ap)
    ap.add_argument(
        "--interface",
        choices=("asgi", "wsgi"),
        default="asgi",
        help="asgi: tokenmgr_project.asgi (default); wsgi: what-if via uvicorn's WSGI adapter",
    )
    return ap.parse_args()


def measure(stack: h.Stack, args: argparse.Namespace, workers: int, run_id: str) -> dict:
    port = stack.start_uvicorn(workers, interface=args.interface)
    h.log(f"uvicorn ({args.interface}) --workers {workers} on 127.0.0.1:{port}; warm-up")
    if args.warmup:
        prefix = f"warm{workers}-{run_id}"
        run_wrk(port=port, key=stack.key, prefix=prefix, args=args, seconds=args.warmup)
    wait_drained(stack, timeout=30)
    time.sleep(1.0)
    prefix = f"s{workers}-{run_id}"
    h.log(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency")
    profile_dir = f"{args.profile}/w{workers}" if args.profile else None
    profiler = h.Profiler(stack, profile_dir, ("uvicorn", "celery-worker"))
    profiler.start()
    with h.PgConnMonitor(stack) as pgmon:
        cpu0 = h.cpu_snapshot(stack)
        t0 = time.perf_counter()
        res = run_wrk(port=port, key=stack.key, prefix=prefix, args=args, seconds=args.duration)
        wall = time.perf_counter() - t0
        cpu1 = h.cpu_snapshot(stack)
    res["profiles"] = profiler.stop()
    if args.show_wrk:
        print(res["raw"])
    h.log(f"wrk done ({res['requests']} responses); draining the buffer, final flush")
    res["buffer_left"] = wait_drained(stack)
    res["final_flush"] = final_flush(stack)
    res["rows"] = count_prefix(stack, prefix)
    if args.rate:
        res["paced"] = measure_paced(stack, args, port, f"p{workers}-{run_id}")
    stack.stop(f"uvicorn-w{workers}")
    res.update(workers=workers, cpu=h.cpu_report(cpu0, cpu1, wall), pg_sessions=pgmon.summary())
    return res


def calibrate(
    port: int, key: str, prefix: str, args: argparse.Namespace
) -> tuple[float, float, float]:
    """(offered rate aimed at, interval per connection in ms, pause in ms) for --rate."""
    aim = args.rate * 1.05  # a little over, so the achieved rate does not fall just short
    interval_ms = args.connections * 1000 / aim
    pause = max(1.0, interval_ms - 2)
    for _ in range(3):
        calib = run_wrk(
            port=port, key=key, prefix=f"{prefix}c", args=args, seconds=5, pause_ms=pause
        )
        achieved = calib["requests"] / (calib["duration_us"] / 1e6)
        rest_ms = args.connections * 1000 / achieved - pause
        pause = max(1.0, interval_ms - rest_ms)
    return aim, interval_ms, pause


def measure_reference(stack: h.Stack, args: argparse.Namespace, workers: int, run_id: str) -> dict:
    """The same wrk runs against a bare uvicorn JSON endpoint (bench/_bare_app.py) in this run."""
    port = stack.start_bare(workers)
    h.log(f"reference: bare uvicorn JSON endpoint, {workers} process(es), on 127.0.0.1:{port}")
    prefix = f"ref{workers}-{run_id}"
    if args.warmup:
        run_wrk(port=port, key="-", prefix=prefix, args=args, seconds=args.warmup)
    res = {"sat": run_wrk(port=port, key="-", prefix=prefix, args=args, seconds=args.duration)}
    if args.rate:
        _aim, _interval, pause = calibrate(port, "-", prefix, args)
        res["paced"] = run_wrk(
            port=port, key="-", prefix=prefix, args=args, seconds=args.duration, pause_ms=pause
        )
    stack.stop(f"bare-w{workers}")
    return res


def report_reference(ref: dict, r: dict, args: argparse.Namespace) -> None:
    def line(label: str, x: dict, ours: dict | None) -> None:
        rps = x["created"] / (x["duration_us"] / 1e6)
        p99 = x["p99_us"] / 1000
        text = f"  reference {label}: {rps:>9,.0f} req/s, p99 {p99:.2f} ms"
        if ours is not None:
            ours_rps = ours["created"] / (ours["duration_us"] / 1e6)
            text += (
                f"  | tokenmgr {ours_rps:,.0f} req/s = {ours_rps / rps:.0%} of it, "
                f"p99 {ours['p99_us'] / 1000:.2f} ms = +{ours['p99_us'] / 1000 - p99:.2f} ms"
            )
        print(text)

    print("  bare uvicorn JSON endpoint (bench/_bare_app.py), same processes, same wrk, same run:")
    line("saturation", ref["sat"], r)
    if "paced" in ref:
        line("paced     ", ref["paced"], r.get("paced"))


def measure_paced(stack: h.Stack, args: argparse.Namespace, port: int, prefix: str) -> dict:
    """Latency at a fixed offered load: each connection pauses so that all of them together send
    about --rate requests/s. The pause is calibrated from short runs' achieved rates: a cycle
    per connection is pause + everything else, and "everything else" is measured, not guessed."""
    aim, interval_ms, pause = calibrate(port, stack.key, prefix, args)
    for attempt in range(3):
        wait_drained(stack, timeout=30)
        h.log(f"paced run: -c{args.connections}, pause {pause:.2f} ms, aim {aim:.0f} req/s")
        res = run_wrk(
            port=port,
            key=stack.key,
            prefix=f"{prefix}{attempt}",
            args=args,
            seconds=args.duration,
            pause_ms=pause,
        )
        achieved = res["created"] / (res["duration_us"] / 1e6)
        if achieved >= args.rate:
            break
        # Short calibration runs start with a burst and overstate the rate: recalibrate from
        # this run (and repeat it) so the judged run really offers the target load.
        pause = max(1.0, interval_ms - (args.connections * 1000 / achieved - pause))
    prefix = f"{prefix}{attempt}"
    res["buffer_left"] = wait_drained(stack)
    final_flush(stack)
    res["rows"] = count_prefix(stack, prefix)
    res["pause_ms"] = pause
    return res


def report_paced(p: dict, args: argparse.Namespace) -> tuple[bool, bool]:
    """Print the paced run; returns (target met, ledger consistent)."""
    secs = p["duration_us"] / 1e6
    ok_rps = p["created"] / secs
    p99 = p["p99_us"] / 1000
    errors = p["err_connect"] + p["err_read"] + p["err_write"] + p["err_timeout"]
    in_flight = p["rows"] - p["created"]
    consistent = p["buffer_left"] == 0 and 0 <= in_flight <= args.connections
    print(
        f"  paced at ~{args.rate} req/s offered (-c{args.connections}, "
        f"{p['pause_ms']:.2f} ms mean pause)"
    )
    print(f"    201 Created per second {ok_rps:>9,.1f}")
    print(
        f"    latency p50/p90/p99/p99.9  {p['p50_us'] / 1000:.2f} / {p['p90_us'] / 1000:.2f} / "
        f"{p99:.2f} / {p['p999_us'] / 1000:.2f} ms (max {p['max_us'] / 1000:.2f})"
    )
    print(
        f"    responses other than 201: {p['other'] + p['duplicate']}, socket errors: {errors}; "
        f"ledger rows {p['rows']:,} = 201s + {in_flight} in flight"
        f" -> {'OK' if consistent else 'MISMATCH'}"
    )
    met = ok_rps >= TARGET_RPS and p99 < TARGET_P99_MS and p["other"] == 0 and errors == 0
    print(
        f"  target: >= {TARGET_RPS} req/s with p99 < {TARGET_P99_MS:.0f} ms at c{args.connections}"
        f"  -> {'PASS' if met else 'FAIL'} ({ok_rps:,.0f} req/s, p99 {p99:.1f} ms)"
    )
    return met, consistent


def report_one(r: dict, args: argparse.Namespace) -> bool:
    """Print one configuration's figures; returns whether the ledger check passed."""
    secs = r["duration_us"] / 1e6
    ok_rps = r["created"] / secs
    p99 = r["p99_us"] / 1000
    dist = [f"{r['dist_ms'].get(p, float('nan')):.2f}" for p in (50, 75, 90, 99)]
    errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    # wrk stops at the deadline with up to -c requests sent and their responses unread; the
    # server still commits those, so rows = 201 responses + requests in flight at the stop.
    in_flight = r["rows"] - r["created"]
    consistent = (
        r["buffer_left"] == 0 and 0 <= in_flight <= args.connections and r["rows"] <= r["sent"]
    )
    print("-" * 76)
    print(
        f"uvicorn --workers {r['workers']} ({args.interface})  + celery worker (concurrency 1) "
        "+ beat, Redis buffer"
    )
    print(f"  requests/s (wrk)         {r['wrk_rps']:>9,.1f}  ({r['requests']:,} in {secs:.1f} s)")
    print(f"  201 Created per second   {ok_rps:>9,.1f}")
    print(f"  latency 50/75/90/99%     {' / '.join(dist)} ms  (wrk --latency)")
    print(
        f"  p99 / p99.9 / max        {p99:.2f} / {r['p999_us'] / 1000:.2f} / "
        f"{r['max_us'] / 1000:.2f} ms  (wrk latency:percentile)"
    )
    print(
        f"  responses                201: {r['created']:,}  200 (duplicate): {r['duplicate']}  "
        f"other: {r['other']}  (wrk non-2xx: {r['non_2xx']}, socket errors: {errors})"
    )
    if r["first_other"]:
        print(f"  first non-2xx response   {r['first_other']}")
    print(
        f"  ledger rows for the run  {r['rows']:,} = {r['created']:,} (201s) + {in_flight} in "
        f"flight when wrk stopped (max {args.connections})"
    )
    verdict = "OK: every 201 is in the ledger, nothing extra" if consistent else "MISMATCH"
    print(
        f"  final flush              {r['final_flush']}; buffer left {r['buffer_left']}: {verdict}"
    )
    print(f"  {r['pg_sessions']}")
    for line in r["cpu"].splitlines():
        print(f"  {line}")
    for path in r["profiles"]:
        print(h.pyspy_summary(path))
    print(
        f"  saturation (as fast as wrk can, closed loop): {ok_rps:,.0f} req/s, p99 {p99:.1f} ms"
        f" -> throughput {'>=' if ok_rps >= TARGET_RPS else '<'} {TARGET_RPS} req/s"
    )
    if "paced" in r:
        _met, paced_consistent = report_paced(r["paced"], args)
        consistent = consistent and paced_consistent
    return consistent


def main() -> int:
    args = parse_args()
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    wrk_exe()
    run_id = secrets.token_hex(3)
    results = []
    env = {"DJANGO_SETTINGS_MODULE": args.settings}
    with h.Stack(redis_db=REDIS_DB, extra_env=env) as stack:
        stack.setup()
        stack.start_worker()
        stack.start_beat()
        machine = h.machine_line(stack)
        results = [measure(stack, args, workers, run_id) for workers in workers_list]
        refs = [measure_reference(stack, args, workers, run_id) for workers in workers_list]

    rule = "=" * 76
    print(f"\n{rule}")
    print(
        f"ingest_single  wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency"
        f"  run={run_id}"
    )
    if args.settings != "tokenmgr_project.settings" or args.interface != "asgi":
        print(f"WHAT-IF: settings {args.settings}, interface {args.interface}")
    print(machine)
    consistent = []
    for r, ref in zip(results, refs, strict=True):
        consistent.append(report_one(r, args))
        report_reference(ref, r, args)
    print(rule)
    return 0 if all(consistent) else 1


if __name__ == "__main__":
    h.run_main(main)
