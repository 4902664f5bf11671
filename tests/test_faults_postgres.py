"""Fault test (issue 8, "Tests that stay"): PostgreSQL stopped and restarted while a client
streams usage to the real system (`manage.py up`: servers, worker, beat, broadcaster).

The test starts its own throw-away PostgreSQL cluster (initdb + pg_ctl on a spare port) and its
own Redis with AOF, never the shared servers. While the database is down a known key's usage is
still accepted (201) into the Redis buffer; nothing answers 500; what cannot be decided answers
503 with Retry-After and the JSON error shape; /health shows the backlog. After the database
returns every acknowledged event is in the ledger exactly once.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest

from tests.conftest import CI

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.services

# How long the stream runs before, during and after the outage (seconds).
BEFORE, DURING, AFTER = 3.0, 5.0, 2.0
DRAIN_DEADLINE = 45.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        _missing("PostgreSQL server binaries (initdb, pg_ctl)")
    return Path(candidates[-1]).parent


def _missing(what: str) -> NoReturn:
    message = f"{what} not installed: this fault test runs its own servers"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


class Cluster:
    """A throw-away PostgreSQL cluster; as root its commands run as user postgres."""

    def __init__(self, base: Path) -> None:
        self.bindir = _pg_bindir()
        self.data = base / "pgdata"
        self.log = base / "postgres.log"
        self.port = _free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(base, user="postgres")

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, *args], check=True, capture_output=True, timeout=60, cwd="/tmp"
        )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.log), "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, name: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"


@dataclass
class Answer:
    at: float
    path: str
    status: int
    headers: dict[str, str]
    body: Any
    request_id: str = ""


@dataclass
class Recorder:
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)


class Client:
    """One keep-alive HTTP connection; reconnects if the server closed it."""

    def __init__(self, port: int, key: str) -> None:
        self.port, self.key = port, key
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                if attempt:
                    raise
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw[:500].decode("utf-8", "replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed


def _wait_for_health(port: int, up: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            pytest.fail(f"`up` exited with {up.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/v1/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail("the server never answered /api/v1/health")


@contextlib.contextmanager
def _system(tmp: Path) -> Iterator[tuple[Cluster, str, int, str]]:
    """Own PostgreSQL + own AOF Redis + `manage.py up`; everything stopped afterwards."""
    if shutil.which("redis-server") is None:
        _missing("redis-server")
    cluster = Cluster(tmp)
    cluster.init()
    cluster.start()
    procs: list[subprocess.Popen[Any]] = []
    try:
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tm_fault")
        redis_port = _free_port()
        redis_dir = tmp / "redis"
        redis_dir.mkdir()
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir",
                 str(redis_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                 "--save", ""],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": cluster.url("tm_fault"),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SECRET_KEY": "fault-test",
            "TOKENMGR_DATA_DIR": str(tmp / "data"),
            "TOKENMGR_FLUSH_INTERVAL": "1",
        }
        env.pop("TOKENMGR_BUFFER_VOLATILE_OK", None)  # this Redis persists (AOF)
        key = _prepare(env)
        log = (tmp / "up.log").open("w")
        up = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--port", str(port), "--workers", "2"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.insert(0, up)
        _wait_for_health(port, up, 90)
        yield cluster, cluster.url("tm_fault"), port, key
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop("immediate")


def _stream(client: Client, prefix: str, stop: threading.Event, rec: Recorder) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        request_id = f"{prefix}-{n}"
        body = {"request_id": request_id, "model": "gpt-4o-mini", "input_tokens": 10,
                "output_tokens": 2, "feature": "fault"}  # fmt: skip
        status, headers, answer = client.call("POST", "/api/v1/usage", body)
        rec.add(Answer(time.monotonic(), "/api/v1/usage", status, headers, answer, request_id))
        if n % 10 == 0:  # a batch, and a repeat of an id already acknowledged
            batch = [{**body, "request_id": f"{request_id}-b{j}"} for j in range(3)]
            status, headers, answer = client.call("POST", "/api/v1/usage/batch", {"events": batch})
            rec.add(Answer(time.monotonic(), "/api/v1/usage/batch", status, headers, answer))
            status, headers, answer = client.call("POST", "/api/v1/usage", body)
            rec.add(Answer(time.monotonic(), "repeat", status, headers, answer, request_id))
        if n % 5 == 0:  # a read, which needs the database, and a pre-flight check
            for method, path, payload in (
                ("GET", "/api/v1/usage?limit=5", None),
                ("POST", "/api/v1/budgets/check",
                 {"model": "gpt-4o-mini", "input_tokens": 10, "max_output_tokens": 5}),
            ):  # fmt: skip
                status, headers, answer = client.call(method, path, payload)
                rec.add(Answer(time.monotonic(), path, status, headers, answer))


def _watch_health(port: int, stop: threading.Event, rec: Recorder) -> None:
    conn = Client(port, "")
    while not stop.is_set():
        status, headers, body = conn.call("GET", "/api/v1/health")
        rec.add(Answer(time.monotonic(), "/api/v1/health", status, headers, body))
        time.sleep(0.25)


# Migrate and make the key in one process: each Django start-up costs seconds on a busy machine.
_PREPARE = """
from django.core.management import call_command
from budgets.services import budget_create
from usage import services
call_command("migrate", interactive=False, verbosity=0)
_key, raw = services.api_key_create(
    name="fault", scope="project", team_id="search", project_id="ranker"
)
# A budget the usage counts against, so counters and alert requests are on the path too.
budget_create(principal=None, name="team", scope="team", scope_id="search", cost_limit="1000")
print(raw)
"""


def _prepare(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", _PREPARE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def test_it_keeps_accepting_usage_while_postgresql_is_down_and_lands_it_exactly_once() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tm-pgfault-", dir="/tmp"))
    try:
        with _system(tmp) as (cluster, db_url, port, key):
            rec, health = Recorder(), Recorder()
            stop = threading.Event()
            threads = [
                threading.Thread(target=_stream, args=(Client(port, key), f"c{i}", stop, rec))
                for i in range(2)
            ]
            threads.append(threading.Thread(target=_watch_health, args=(port, stop, health)))
            for thread in threads:
                thread.start()
            try:
                time.sleep(BEFORE)
                down_at = time.monotonic()
                cluster.stop("fast")
                time.sleep(DURING)
                up_at = time.monotonic()
                cluster.start()
                time.sleep(AFTER)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
            log_tail = (tmp / "up.log").read_text()[-4000:]

            everything = rec.answers + health.answers
            server_errors = [a for a in everything if a.status >= 500 and a.status != 503]
            assert not server_errors, (server_errors[:3], log_tail)
            for answer in rec.answers:  # /health answers 503 with its own body, by design
                if answer.status == 503:
                    assert answer.headers.get("retry-after", "").isdigit(), answer
                    assert answer.body["error"]["code"] == "unavailable", answer
                    assert set(answer.body["error"]) == {"code", "message", "fields"}

            usage = [a for a in rec.answers if a.path == "/api/v1/usage"]
            outage = [a for a in usage if down_at + 0.5 < a.at < up_at]
            assert len(outage) > 50, len(outage)
            # A known key's usage is accepted into the buffer while the database is down.
            assert {a.status for a in outage} == {201}, [a for a in outage if a.status != 201][:3]
            reads = [
                a for a in rec.answers
                if a.path.startswith("/api/v1/usage?") and down_at + 0.5 < a.at < up_at
            ]  # fmt: skip
            assert reads
            assert {a.status for a in reads} == {503}
            checks = [a for a in rec.answers if a.path == "/api/v1/budgets/check"]
            during = [a for a in checks if down_at + 0.5 < a.at < up_at]
            # Rules and counters are at hand (cached, in Redis): checks need no database.
            assert during
            assert {a.status for a in during} == {200}, during[:3]
            assert all(a.body["budgets"] for a in during)

            down = [h.body for h in health.answers if down_at + 0.5 < h.at < up_at]
            assert down
            assert all(h["database"]["status"] == "down" for h in down)
            assert max(h["buffer"]["depth"] for h in down) > 0
            assert any(h["buffer"]["oldest_age_seconds"] for h in down)

            batches = [a for a in rec.answers if a.path == "/api/v1/usage/batch"]
            assert any(down_at + 0.5 < a.at < up_at for a in batches)
            assert {a.status for a in batches} == {200}
            repeats = [a for a in rec.answers if a.path == "repeat"]
            assert any(down_at + 0.5 < a.at < up_at for a in repeats)
            assert all((a.status, a.body["duplicate"]) == (200, True) for a in repeats), repeats
            acknowledged = {a.request_id for a in usage if a.status == 201} | {
                item["request_id"]
                for a in batches
                for item in a.body["results"]
                if item["status"] == "created"
            }
            watcher = Client(port, "")
            deadline = time.monotonic() + DRAIN_DEADLINE
            while True:
                with psycopg.connect(db_url) as conn:
                    ledger = [
                        row[0]
                        for row in conn.execute(
                            "SELECT request_id FROM usage_tokenusage WHERE feature = 'fault'"
                        )
                    ]
                after = watcher.call("GET", "/api/v1/health")[2]
                drained = after["database"]["status"] == "up" and after["buffer"]["depth"] == 0
                if (acknowledged <= set(ledger) and drained) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            log_tail = (tmp / "up.log").read_text()[-4000:]
            missing = acknowledged - set(ledger)
            assert not missing, (len(missing), sorted(missing)[:5], after, log_tail)
            assert len(ledger) == len(set(ledger))  # exactly once
            assert set(ledger) == acknowledged  # nothing unacknowledged slipped in
            assert drained, after
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
