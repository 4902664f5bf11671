#!/usr/bin/env python
"""Live status under load: POST /api/v1/status -> broadcaster -> websocket clients.

Target (issue 10): 5,000 status messages/s published across 100 conversations, with 100
websocket clients connected (each to one conversation) plus 5 dashboard clients: p99
publish-to-client latency under 300 ms, zero drops while the queue stays under its bound.
Report the broadcaster's CPU.

    .venv/bin/python bench/live_status.py --per-request 10   # the target: 10 per request
    .venv/bin/python bench/live_status.py                    # one message per POST /status
    .venv/bin/python bench/live_status.py --rate 2000 --duration 10    # a lighter what-if

--per-request N (N > 1) publishes through POST /api/v1/status/batch, N messages per request,
still paced in messages/s; 1 (the default) through POST /api/v1/status, one per request. On
this 2-core machine one message per request tops out near 2,600-3,100 messages/s (HTTP costs
~0.3 ms of server CPU per request; BENCHMARKS.md §0).

What it does (127.0.0.1 only; everything it starts is stopped again, also on error/Ctrl-C):
  1. drops/creates database `tokenmgr_bench_live`, starts its own Redis (AOF on), migrates,
     creates a global API key, a superuser and a logged-in session for it;
  2. starts uvicorn (2 processes, as `manage.py up`), the broadcaster (`manage.py
     broadcast_status`), a celery worker and celery beat;
  3. measures the reference: channels_redis alone (bench/_channels_ref.py, no Django), a
     sender and a receiver process, group_send -> receive at the batch rate the run will
     produce, once with each batch awaited in turn (as the broadcaster sends) and once with up
     to 16 in flight; then waits (at most --quiet-wait s) for the machine to be idle;
  4. connects 100 status websockets (conv-0 .. conv-99, Bearer key) and 5 dashboard websockets
     (the staff session's cookie) in a process of their own (bench/_live_clients.py), so the
     load generator never holds them up, and warms up at 1,000 messages/s for a few seconds;
  5. publishes at a paced --rate for --duration seconds through POST /api/v1/status with wrk
     (C, keep-alive connections, 2 threads; bench/live_status.lua embeds each message's send
     time), while a light usage feed (POST /api/v1/usage/batch, --usage-rate events/s) gives
     the dashboard stream something to coalesce; every 10 ms it samples the status queue's
     depth and each server process's channel-layer inbox;
  6. waits until the broadcaster has sent everything and no frame arrived for 2 s, then
     reports: publish rate, messages received vs sent per conversation, publish -> client
     latency percentiles (and where it goes: HTTP + queueing, the broadcaster's batching,
     channel layer + websocket), drops (/health `dropped` delta, and messages acknowledged
     with a 202 but never received: what got lost without being counted; requests wrk wrote
     but had no answer to when it stopped were never acknowledged), batches per second,
     dashboard updates per client per second, the websockets the server dropped, and the CPU
     of every process.
With --timed-broadcaster the broadcaster runs with timers around each step of its tick
(bench/_broadcaster_timed.py); --profile DIR py-spy records the broadcaster and uvicorn.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
from _live_clients import LiveClients, dashboard_summary

TARGET_RATE = 5000
TARGET_P99_MS = 300.0
RATE_TOLERANCE = 0.99  # the published rate counts as reached at 99 % of the target
REDIS_DB = 10
DB_NAME = "tokenmgr_bench_live"
QUEUE_KEY = "tokenmgr:status:queue"
METRICS_KEY = "tokenmgr:status:metrics"
ASGI_PREFIX = "tokenmgr:asgi"  # settings.CHANNEL_LAYERS prefix
CHANNEL_CAPACITY = 100  # channels_redis's default `capacity`, per channel key
LUA = Path(__file__).resolve().parent / "live_status.lua"
REF = Path(__file__).resolve().parent / "_channels_ref.py"
TIMED = Path(__file__).resolve().parent / "_broadcaster_timed.py"
PROFILE_PACKAGES = ("reporting", "tokenmgr_project", "channels", "channels_redis", "uvicorn")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def wrk_exe() -> str:
    exe = shutil.which("wrk") or "/usr/bin/wrk"
    if not Path(exe).exists():
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return exe


def health(port: int, key: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/api/v1/health", headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    return body["status_messages"]


# --- load ---------------------------------------------------------------------------------------


class Wrk:
    """wrk with bench/live_status.lua, started outside the stack's processes so it may exit: its
    CPU is read from /proc while it is an exited, not yet reaped child (`wait_exited`)."""

    def __init__(
        self,
        stack: h.Stack,
        port: int,
        args: argparse.Namespace,
        *,
        tag: str,
        rate: int,
        seconds: int,
    ):
        self.stack, self.tag, self.seconds = stack, tag, seconds
        self.out_path = stack.tmp / f"wrk-{tag}.out"
        self.argv = [
            wrk_exe(), f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s",
            "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--",
            stack.key, tag, str(rate), str(args.conversations), str(args.threads),
            str(args.per_request),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_exited(self, timeout: float) -> None:
        """Until wrk has exited, leaving it unreaped (its /proc entry keeps its CPU time)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            if info is not None:
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("wrk did not finish in time")

    def reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait(30)
        if rc != 0:
            raise RuntimeError(f"wrk failed ({rc}):\n{self.out_path.read_text(errors='replace')}")
        return rc

    def results(self) -> dict[str, Any]:
        """What wrk printed (readable once it exited)."""
        text = self.out_path.read_text(errors="replace")
        m = re.search(r"^BENCH (.*)$", text, re.M)
        s = re.search(r"^SENT (.*)$", text, re.M)
        if not m or not s:
            raise RuntimeError(f"no BENCH/SENT line in wrk output:\n{text}")
        res: dict[str, Any] = {k: int(v) for k, v in (p.split("=") for p in m.group(1).split())}
        res["sent_per_conv"] = [int(x) for x in s.group(1).split(",")]
        f = re.search(r"^FIRST_OTHER (.*)$", text, re.M)
        res["first_other"] = f.group(1)[:160] if f else ""
        return res

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            h.Stack._stop_proc(self.proc)


def run_wrk(
    stack: h.Stack, port: int, args: argparse.Namespace, *, tag: str, rate: int, seconds: int
) -> dict[str, Any]:
    wrk = Wrk(stack, port, args, tag=tag, rate=rate, seconds=seconds)
    wrk.start()
    try:
        wrk.wait_exited(seconds + 60)
        wrk.reap()
        return wrk.results()
    finally:
        wrk.kill()


class UsageFeed:
    """A light, paced usage load (POST /api/v1/usage/batch) on a thread, for the dashboard
    stream to coalesce; events carry no conversation, so they add no status messages."""

    BATCH = 50

    def __init__(self, port: int, key: str, events_per_s: float, seconds: float):
        self.port, self.key = port, key
        self.interval = self.BATCH / events_per_s if events_per_s > 0 else 0.0
        n = int(events_per_s * seconds / self.BATCH) + 1 if events_per_s > 0 else 0
        prefix = "live-" + secrets.token_hex(3)
        self.bodies = [
            json.dumps(
                {
                    "events": [
                        {
                            "request_id": f"{prefix}-{b}-{i}",
                            "provider": "openai",
                            "model": "gpt-4o-mini",
                            "input_tokens": 100 + i,
                            "output_tokens": 20 + i % 7,
                            "team_id": f"t{i % 3}",
                            "project_id": f"p{i % 4}",
                            "feature": "chat",
                        }
                        for i in range(self.BATCH)
                    ]
                },
                separators=(",", ":"),
            ).encode()
            for b in range(n)
        ]
        self.statuses: dict[int, int] = {}
        self.events = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            for i, body in enumerate(self.bodies):
                if self._stop.wait(max(0.0, t0 + i * self.interval - time.perf_counter())):
                    break
                conn.request("POST", "/api/v1/usage/batch", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    self.events += self.BATCH
        except Exception as exc:  # noqa: BLE001 - reported
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def start(self) -> None:
        if self.bodies:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)


class QueueMonitor:
    """Every 10 ms: the status queue's depth and the channel layer's inbox of each server
    process (channels_redis keeps all of a process's sockets' messages in one sorted set,
    `<prefix>specific.<process>!`, and group_send silently skips a socket whose process inbox
    holds `capacity` (100) messages); every 0.5 s the broadcaster's counters."""

    def __init__(self, stack: h.Stack):
        self.rds = stack.redis()
        self.depths: list[int] = []
        self.inbox_peak: dict[str, int] = {}
        self.inbox_full = 0  # samples in which some process inbox was at capacity
        self.processed: list[tuple[float, int, int]] = []  # (time, processed, batches_sent)
        # each group's members are channel names "specific.<process>!<socket>"
        members = {
            m.decode()
            for g in self.rds.scan_iter(match=f"{ASGI_PREFIX}:group:*", count=1000)
            for m in self.rds.zrange(g, 0, -1)
        }
        self.inboxes = sorted({ASGI_PREFIX + m.split("!")[0] + "!" for m in members if "!" in m})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            with self.rds.pipeline(transaction=False) as pipe:
                pipe.llen(QUEUE_KEY)
                for key in self.inboxes:
                    pipe.zcard(key)
                depth, *cards = pipe.execute()
            self.depths.append(int(depth))
            for key, n in zip(self.inboxes, cards, strict=True):
                self.inbox_peak[key] = max(self.inbox_peak.get(key, 0), int(n))
            self.inbox_full += any(int(n) >= CHANNEL_CAPACITY for n in cards)
            now = time.time()
            if now - last >= 0.5:
                last = now
                got = self.rds.hmget(METRICS_KEY, ["processed", "batches_sent"])
                self.processed.append((now, int(got[0] or 0), int(got[1] or 0)))
            self._stop.wait(0.01)

    def __enter__(self) -> QueueMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_broadcast(stack: h.Stack, processed_goal: int, window_s: float, timeout: float) -> None:
    """Until the queue is empty and the broadcaster processed `processed_goal` (or stopped
    making progress for a second: dropped messages never arrive), plus one batch window."""
    rds = stack.redis()
    deadline = time.monotonic() + timeout
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        stack.check_alive()
        depth = int(rds.llen(QUEUE_KEY))
        processed = int(rds.hget(METRICS_KEY, "processed") or 0)
        if processed != last:
            last, still_since = processed, time.monotonic()
        if depth == 0 and (processed >= processed_goal or time.monotonic() - still_since > 1.0):
            break
        time.sleep(0.02)
    time.sleep(window_s + 0.3)  # the last pending batches leave after one window


def channels_reference(
    stack: h.Stack,
    batches_per_s: float,
    groups: int,
    msgs: int,
    *,
    seconds: float,
    concurrency: int,
) -> dict[str, Any]:
    out = stack.tmp / f"channels-ref-{concurrency}.json"
    argv = [h.PY, str(REF), stack.env["REDIS_URL"], f"{batches_per_s:.1f}", str(groups)]
    argv += [str(msgs), f"{seconds:.1f}", str(out), str(concurrency)]
    res = subprocess.run(
        argv,
        check=False,
        cwd=h.REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"channels reference failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(out.read_text())


def log_summary(path: Path, keep: int = 12) -> str:
    """Errors in a server's log: how many tracebacks, each distinct last line counted, and the
    last traceback's final `keep` lines (start-up warnings about the static folder left out)."""
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    blocks = text.split("Traceback (most recent call last):")[1:]
    if not blocks:
        return ""
    # an exception's own line: "package.module.SomeError: message" at the start of a line
    raised = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout)\b.*)$", text, re.M)
    counts: dict[str, int] = {}
    for line in raised:
        counts[line[:160]] = counts.get(line[:160], 0) + 1
    out = [f"{len(blocks)} tracebacks; exceptions raised:"]
    out += [f"  {n:>5} x {line}" for line, n in sorted(counts.items(), key=lambda x: -x[1])]
    out.append("the last traceback ends:")
    out += ["  " + line for line in blocks[-1].strip().splitlines()[-keep:]]
    return "\n".join(out)


def signal_broadcaster(stack: h.Stack, args: argparse.Namespace, sig: int) -> None:
    if args.timed_broadcaster:
        for name, proc in stack.procs:
            if name == "broadcaster":
                os.kill(proc.pid, sig)


def read_timed(path: Path, timeout: float = 10) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    return None


def timed_report(t: dict[str, Any]) -> str:
    wall = t["wall"]
    lines = [
        f"broadcaster, timed (wall clock over {wall:.1f} s; CPU {t['cpu']:.1f} s = "
        f"{t['cpu'] / wall:.0%} of a core; {t['ticks_with_work']:,} ticks with work, "
        f"{t['items_per_tick']:.0f} items each; loop lag p50/p99/max "
        f"{t['lag_ms']['p50']:.1f} / {t['lag_ms']['p99']:.1f} / {t['lag_ms']['max']:.1f} ms):"
    ]
    for name, v in sorted(t["timers"].items(), key=lambda kv: -kv[1]["s"]):
        lines.append(
            f"  {name:<42} {v['s']:6.2f} s {v['s'] / wall:5.0%}  n={v['n']:>7,}  "
            f"mean {v['s'] / max(1, v['n']) * 1000:6.2f} ms  max {v['max'] * 1000:7.1f} ms"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=int, default=TARGET_RATE, help="messages/s published")
    ap.add_argument("--duration", type=int, default=20, help="seconds of publishing")
    ap.add_argument("--conversations", type=int, default=100, help="status websockets, one each")
    ap.add_argument("--dashboards", type=int, default=5, help="dashboard websockets")
    ap.add_argument(
        "--clients",
        type=int,
        default=None,
        help="status websockets (default: one per conversation; fewer for what-ifs)",
    )
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (keep-alive)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument(
        "--per-request",
        type=int,
        default=1,
        help="messages per request: 1 = POST /status, more = POST /status/batch",
    )
    ap.add_argument("--warmup", type=int, default=4, help="seconds at 1,000 messages/s first")
    ap.add_argument(
        "--usage-rate",
        type=float,
        default=500.0,
        help="usage events/s fed through POST /usage/batch for the dashboard (0: none)",
    )
    ap.add_argument("--ref-seconds", type=float, default=10.0, help="channels_redis reference")
    ap.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        help="max s to wait, after the broadcaster is done, for frames still on their way",
    )
    ap.add_argument(
        "--timed-broadcaster",
        action="store_true",
        help="diagnosis: run the broadcaster with timers around each step (_broadcaster_timed)",
    )
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max s to wait for an idle box")
    h.add_common_args(ap)
    args = ap.parse_args()
    if args.clients is None:
        args.clients = args.conversations
    return args


def main() -> int:
    args = parse_args()
    run_id = secrets.token_hex(4)
    h.log(
        f"rate={args.rate}/s for {args.duration} s, {args.conversations} conversations, "
        f"{args.dashboards} dashboards, wrk -t{args.threads} -c{args.connections}, "
        f"usage feed {args.usage_rate:.0f} events/s, settings={args.settings}"
    )
    env = {"DJANGO_SETTINGS_MODULE": args.settings}
    r: dict[str, Any] = {"run_id": run_id}
    with h.Stack(redis_db=REDIS_DB, extra_env=env, db_name=DB_NAME) as stack:
        stack.setup()
        cookie = stack.staff_session()
        port = stack.start_uvicorn(2)
        stack.start_worker()
        stack.start_beat()
        timed_out = stack.tmp / "broadcaster-timed.json"
        if args.timed_broadcaster:
            stack.start("broadcaster", [h.PY, str(TIMED), str(timed_out)])
        else:
            stack.start_broadcaster()
        r["machine"] = h.machine_line(stack)
        base = health(port, stack.key)
        window_s = base["batch_window_ms"] / 1000
        batch_size = base["batch_size"]
        r["queue_limit"] = base["queue_limit"]

        # The reference first, and the quiet wait: the websockets connect just before the load
        # (an idle socket is exposed to the channel layer's receive timeout, see the report).
        per_conv = args.rate / args.conversations * window_s
        msgs_per_batch = max(1, min(batch_size, round(per_conv)))
        batches_per_s = args.rate / msgs_per_batch
        h.log(
            f"reference: channels_redis group_send -> receive, {batches_per_s:,.0f} batches/s "
            f"of {msgs_per_batch} messages to {args.conversations} groups, {args.ref_seconds} s"
        )
        r["ref"], r["ref_concurrent"] = (
            channels_reference(
                stack,
                batches_per_s,
                args.conversations,
                msgs_per_batch,
                seconds=args.ref_seconds,
                concurrency=concurrency,
            )
            for concurrency in (1, 16)
        )
        h.log("waiting for a quiet machine")
        r["busy_before"] = h.wait_quiet(args.quiet_wait)

        conversations = [f"conv-{i}" for i in range(args.conversations)][: args.clients]
        clients = LiveClients(
            stack,
            port,
            key=stack.key,
            conversations=conversations,
            dashboards=args.dashboards,
            cookie=cookie,
        )
        h.log("connecting websockets")
        clients.start()
        time.sleep(0.5)
        r["connected"] = health(port, stack.key)["connected_clients"]
        h.log(f"connected: {r['connected']}; warming up")
        warm = run_wrk(stack, port, args, tag="w", rate=1000, seconds=args.warmup)
        wait_broadcast(stack, health(port, stack.key)["processed"], window_s, 30)
        clients.wait_settled(quiet=1.0, timeout=args.settle_timeout)
        feed = UsageFeed(port, stack.key, args.usage_rate, args.duration + 5)
        h0 = health(port, stack.key)
        profiler = h.Profiler(stack, args.profile, ("broadcaster", "uvicorn"))
        wrk = Wrk(stack, port, args, tag="m", rate=args.rate, seconds=args.duration)
        h.log(f"publishing {args.rate:,}/s for {args.duration} s")
        feed.start()
        time.sleep(1.0)  # the dashboard stream is already busy when the clock starts
        profiler.start()
        signal_broadcaster(stack, args, signal.SIGUSR1)  # timed: the window starts
        with QueueMonitor(stack) as qmon:
            cpu0 = h.cpu_snapshot(stack)
            t_start = time.time()
            wrk.start()
            try:
                wrk.wait_exited(args.duration + 60)
                t_wrk_end = time.time()
                feed.stop()
                r["wrk"] = wrk.results()
                wait_broadcast(stack, h0["processed"] + r["wrk"]["sent"], window_s, 60)
                t_broadcast_done = time.time()
                # what the broadcaster sent may still be on its way to the sockets
                t_last_frame = clients.wait_settled(quiet=2.0, timeout=args.settle_timeout)
                signal_broadcaster(stack, args, signal.SIGUSR2)  # timed: write the totals
                t_end = time.time()
                cpu1 = h.cpu_snapshot(stack, {wrk.proc.pid: "wrk (load)"} if wrk.proc else {})
                wrk.reap()
            finally:
                wrk.kill()
                feed.stop()
        r["profiles"] = profiler.stop()
        r["timed"] = read_timed(timed_out) if args.timed_broadcaster else None
        h1 = health(port, stack.key)
        results = clients.stop()
        r["logs"] = {
            name: log_summary(stack.tmp / f"{name}.log")
            for name, _proc in stack.procs
            if name in ("uvicorn-w2", "broadcaster")
        }

    r.update(
        warm=warm,
        h0=h0,
        h1=h1,
        t_start=t_start,
        t_wrk_end=t_wrk_end,
        t_end=t_end,
        t_broadcast_done=t_broadcast_done,
        t_last_frame=t_last_frame,
        cpu=h.cpu_report(cpu0, cpu1, t_end - t_start),
        cpu_raw=(cpu0, cpu1),
        qmon=qmon,
        results=results,
        feed=feed,
        window_s=window_s,
        batch_size=batch_size,
    )
    return report(args, r)


# --- report -------------------------------------------------------------------------------------


def ms(v: float) -> str:
    return f"{v:,.1f}"


def report(args: argparse.Namespace, r: dict[str, Any]) -> int:
    res, wrk = r["results"], r["wrk"]
    t_start, t_pub_end = r["t_start"], r["t_wrk_end"]
    wall_pub = t_pub_end - t_start
    pub_rate = wrk["accepted"] / (wrk["duration_us"] / 1e6)
    lat: list[float] = []
    queued: list[float] = []
    hop: list[float] = []
    send_us: list[int] = []
    received_per_conv: dict[str, int] = {}
    dups = frames = warm_received = 0
    sizes: list[int] = []
    for conv, st in res["status"].items():
        frames += st["frames"]
        sizes += st["batch_sizes"]
        warm_received += len(st["tags"].get("w", {}).get("lat_ms", []))
        m = st["tags"].get("m")
        received_per_conv[conv] = len(m["lat_ms"]) if m else 0
        if m:
            lat += m["lat_ms"]
            queued += m["queued_ms"]
            hop += m["hop_ms"]
            send_us += m["send_us"]
            dups += m["dup"][0]
    received = len(lat)
    watched = [(f"conv-{i}", n) for i, n in enumerate(wrk["sent_per_conv"])]
    watched = [(conv, n) for conv, n in watched if conv in received_per_conv]
    sent_watched = sum(n for _conv, n in watched)
    lost_per_conv = [max(0, n - received_per_conv[conv]) for conv, n in watched]
    lost = sum(lost_per_conv)
    # wrk stops with requests written but not yet answered: those messages were never
    # acknowledged (no 202), so only acknowledged ones can be lost.
    unanswered = max(0, wrk["sent"] - wrk["accepted"] - wrk["other"] * args.per_request)
    lost_acked = max(0, wrk["accepted"] - received) if len(watched) == args.conversations else lost
    h0, h1 = r["h0"], r["h1"]
    names = ("processed", "dropped", "batches_sent", "broadcasts", "dashboard_updates")
    delta = {k: (h1[k] or 0) - (h0[k] or 0) for k in names}
    depths = r["qmon"].depths
    peak = max(depths, default=0)
    limit = r["queue_limit"]
    at_bound = sum(1 for d in depths if d >= limit)
    p99 = percentile(lat, 99)
    in_broadcaster = [a - b - c for a, b, c in zip(lat, queued, hop, strict=True)]
    errors = sum(wrk[k] for k in ("err_connect", "err_read", "err_write", "err_timeout"))
    closes = [(t, why) for per in res["closes"].values() for t, why in per]
    closes_in_run = [c for c in closes if t_start <= c[0] <= r["t_end"]]
    wall = r["t_end"] - t_start

    def pcts(values: list[float], ps: tuple[float, ...] = (50, 99)) -> str:
        return " / ".join(ms(percentile(values, p)) for p in ps)

    rule = "=" * 78
    print(f"\n{rule}")
    print(
        f"live_status  {args.rate:,}/s x {args.duration} s  {args.conversations} conversations, "
        f"{args.clients} status + {args.dashboards} dashboard websockets  run={r['run_id']}"
    )
    if args.settings != "tokenmgr_project.settings":
        print(f"WHAT-IF settings: {args.settings}")
    print(r["machine"])
    print(
        f"servers: uvicorn 2 processes (manage.py up's serve), manage.py broadcast_status, celery "
        f"worker + beat; load: wrk -t{args.threads} -c{args.connections} (C, keep-alive, paced), "
        + (
            "POST /status (1 message per request)"
            if args.per_request == 1
            else f"POST /status/batch ({args.per_request} messages per request)"
        )
    )
    print(
        f"receivers: 1 asyncio + websockets process of their own, extensions "
        f"{', '.join(res['extensions']) or 'none'}; broadcaster batch {r['batch_size']} / "
        f"window {r['window_s'] * 1000:.0f} ms, queue bound {limit:,}"
    )
    print(
        f"connected at start {r['connected']}; machine busy just before the start "
        f"{r['busy_before']:.0%}"
    )
    w = r["warm"]
    print(
        f"warm-up: {w['accepted']:,} of {w['sent']:,} accepted at 1,000/s, {warm_received:,} "
        f"received; dropped by the queue before the timed phase: {h0['dropped'] or 0:,}"
    )
    print("-" * 78)
    print(
        f"published    {wrk['accepted']:>9,} accepted (202) of {wrk['sent']:,} sent in "
        f"{wrk['duration_us'] / 1e6:.2f} s -> {pub_rate:,.0f} messages/s "
        f"(non-202 {wrk['other']}, socket errors {errors})"
    )
    if wrk["first_other"]:
        print(f"  ! first non-202: {wrk['first_other']}")
    print(
        f"  HTTP latency p50/p90/p99/max {wrk['p50_us'] / 1000:.1f} / {wrk['p90_us'] / 1000:.1f}"
        f" / {wrk['p99_us'] / 1000:.1f} / {wrk['max_us'] / 1000:.1f} ms (request written -> 202)"
    )
    print(
        f"received     {received:>9,} distinct of {sent_watched:,} sent to the {len(watched)} "
        f"watched conversations (duplicates {dups}); sent - received = {lost:,} "
        f"({sum(1 for n in lost_per_conv if n)} conversations short)"
    )
    print(
        f"  broadcaster done {r['t_broadcast_done'] - t_pub_end:.1f} s after the last publish, "
        f"last frame {r['t_last_frame'] - t_pub_end:.1f} s after it"
    )
    print(
        f"publish -> client  p50 {ms(percentile(lat, 50))}  p90 {ms(percentile(lat, 90))}  "
        f"p95 {ms(percentile(lat, 95))}  p99 {ms(p99)}  p99.9 {ms(percentile(lat, 99.9))}  "
        f"max {ms(max(lat, default=float('nan')))} ms"
    )
    print(
        f"  where it goes, p50 / p99 ms: send -> queued {pcts(queued)}; queued -> batch sent "
        f"{pcts(in_broadcaster)}; batch sent -> client {pcts(hop)}"
    )
    if send_us:
        by_sec: dict[int, list[float]] = {}
        for s_us, v in zip(send_us, lat, strict=True):
            by_sec.setdefault(int(s_us / 1e6 - t_start), []).append(v)
        line = " ".join(f"{percentile(v, 99):.0f}" for _s, v in sorted(by_sec.items()))
        print(f"  p99 by second of sending (ms): {line}")
    print(
        f"queue        peak depth {peak:,} of its bound {limit:,} ({at_bound} of {len(depths)} "
        f"10 ms samples at the bound), mean {sum(depths) / max(1, len(depths)):,.0f}"
    )
    q = r["qmon"]
    peaks = ", ".join(str(n) for _k, n in sorted(q.inbox_peak.items()))
    print(
        f"channel layer inboxes of the {len(q.inboxes)} server processes: peak {peaks or '-'} "
        f"messages of capacity {CHANNEL_CAPACITY} (group_send skips a full one silently); "
        f"{q.inbox_full} of {len(depths)} samples with one full"
    )
    print(
        f"drops        /health dropped +{delta['dropped']:,} during the run; processed "
        f"+{delta['processed']:,}; sent but never received {lost:,} (of which never answered "
        f"by a 202 when wrk stopped: {unanswered:,}); acknowledged but never received "
        f"{lost_acked:,}"
    )
    mean_size = sum(sizes) / len(sizes) if sizes else 0.0
    print(
        f"batches      {delta['batches_sent']:,} sent (/health) = "
        f"{delta['batches_sent'] / wall:,.0f}/s over {wall:.1f} s; {frames:,} frames received, "
        f"mean {mean_size:.1f} messages, max {max(sizes, default=0)}; group_sends "
        f"+{delta['broadcasts']:,}"
    )
    timeline = r["qmon"].processed
    rates = [
        (b[1] - a[1]) / (b[0] - a[0])
        for a, b in itertools.pairwise(timeline)
        if b[0] > a[0] and a[0] < t_pub_end
    ]
    if rates:
        print(
            "  broadcaster processed/s (0.5 s samples): "
            + " ".join(f"{x / 1000:.1f}k" for x in rates[: 2 * args.duration + 4])
        )
    frames_m = [f for st in res["status"].values() for f in st["timeline"] if f[2] == "m"]
    if frames_m:
        end = int(max(f[0] for f in frames_m) - t_start) + 1
        recv = [0] * (end + 1)
        sent_at = [0] * (end + 1)
        for t_recv, t_batch, _tag in frames_m:
            recv[max(0, int(t_recv - t_start))] += 1
            sent_at[min(end, max(0, int(t_batch - t_start)))] += 1
        print(
            f"  frames of the timed phase: {len(frames_m):,} received; per second since the "
            f"start, received: {' '.join(map(str, recv))}"
        )
        print(f"    by the second their batch was sent: {' '.join(map(str, sent_at))}")
    dash = dashboard_summary(res, t_start, t_pub_end)
    rate_limit = float(os.environ.get("TOKENMGR_LIVE_DASHBOARD_RATE", "4"))
    worst = max((c["rate"] for c in dash["clients"]), default=0.0)
    for c in dash["clients"]:
        print(
            f"dashboard    {c['name']}: {c['n']} updates in {wall_pub:.1f} s = {c['rate']:.2f}/s,"
            f" gaps min {c['min_gap']:.3f} max {c['max_gap']:.3f} s, longest silence "
            f"{c['longest_silence']:.1f} s; {c['with_usage']} with usage "
            f"({c['usage_requests']:,} requests), {c['with_state']} with state"
        )
    feed = r["feed"]
    feed_errors = f", errors {feed.errors[:2]}" if feed.errors else ""
    print(
        f"  usage feed: {feed.events:,} events accepted, HTTP {feed.statuses}{feed_errors}; "
        f"/health dashboard_updates +{delta['dashboard_updates']}"
    )
    if closes:
        whys: dict[str, int] = {}
        for _t, why in closes:
            whys[why[:90]] = whys.get(why[:90], 0) + 1
        print(
            f"websockets   dropped by the server {len(closes)} times ({len(closes_in_run)} during "
            f"the timed phase; each reconnected at once): "
            + "; ".join(f"{n} x {why}" for why, n in sorted(whys.items(), key=lambda x: -x[1]))
        )
    print("-" * 78)
    rl = r["ref"]["lat_ms"]
    for ref in (r["ref"], r["ref_concurrent"]):
        how = (
            "each batch's 2 group_sends awaited before the next, as the broadcaster does"
            if ref["concurrency"] == 1
            else f"up to {ref['concurrency']} batches in flight"
        )
        print(
            f"reference    channels_redis alone (no Django, uvicorn or websocket), same Redis, "
            f"a sender and a receiver process, {how}:"
        )
        lr = ref["lat_ms"]
        print(
            f"  {ref['rate']:,.0f} batches/s reached of {ref['asked']:,.0f} asked, "
            f"{ref['received']:,} of {ref['sent']:,} received; group_send -> receive p50 "
            f"{ms(percentile(lr, 50))}  p99 {ms(percentile(lr, 99))}  "
            f"max {ms(max(lr, default=float('nan')))} ms"
        )
    print(
        f"  (this run: {delta['batches_sent'] / wall:,.0f} batches/s; batch sent -> client p50 "
        f"{ms(percentile(hop, 50))}, p99 {ms(percentile(hop, 99))} ms)"
    )
    print("-" * 78)
    print(r["cpu"])
    cpu0, cpu1 = r["cpu_raw"]
    b_cpu = cpu1.get("broadcaster", 0.0) - cpu0.get("broadcaster", 0.0)
    if delta["processed"]:
        print(
            f"  broadcaster: {b_cpu / wall:.0%} of a core, {b_cpu / delta['processed'] * 1e6:.0f}"
            f" us CPU per message, {b_cpu / max(1, delta['batches_sent']) * 1e6:.0f} us per batch"
        )
    if r["timed"]:
        print(timed_report(r["timed"]))
    for path in r["profiles"]:
        print(h.pyspy_summary(path, packages=PROFILE_PACKAGES))
    for name, tail in r["logs"].items():
        if tail.strip():
            print(f"----- {name} log (tail) -----\n{tail}")
    print("-" * 78)
    rate_ok = pub_rate >= RATE_TOLERANCE * args.rate
    lat_ok = received > 0 and p99 < TARGET_P99_MS
    drop_ok = delta["dropped"] + lost_acked == 0
    dash_ok = worst <= rate_limit and all(c["n"] > 0 for c in dash["clients"])
    why = "" if peak < limit else "; the queue reached its bound: the broadcaster fell behind"
    print(
        f"publish rate >= {args.rate:,}/s         -> {'PASS' if rate_ok else 'FAIL'} "
        f"({pub_rate:,.0f}/s accepted)"
    )
    print(
        f"p99 publish->client < {TARGET_P99_MS:.0f} ms  -> {'PASS' if lat_ok else 'FAIL'} "
        f"({ms(p99)} ms; reference hop p99 {ms(percentile(rl, 99))} ms)"
    )
    print(
        f"zero drops (queue < bound)   -> {'PASS' if drop_ok else 'FAIL'} "
        f"({delta['dropped']:,} dropped by the queue, {lost_acked:,} acknowledged but never "
        f"received; peak "
        f"depth {peak:,}/{limit:,}{why})"
    )
    print(
        f"dashboard <= {rate_limit:g} updates/s     -> {'PASS' if dash_ok else 'FAIL'} "
        f"(busiest client {worst:.2f}/s)"
    )
    ok = rate_ok and lat_ok and drop_ok and dash_ok
    target = "" if args.rate == TARGET_RATE else f" (at --rate {args.rate:,}, not the target's)"
    print(f"target: {'PASS' if ok else 'FAIL'}{target}")
    print(rule)
    return 0 if ok else 1


if __name__ == "__main__":
    h.run_main(main)
