"""manage.py up — the whole system in one command (README, first command).

Creates or migrates the schema, then starts and supervises the ASGI server (HTTP + websockets),
a Celery worker, Celery beat and the live-status broadcaster (its own process with Redis; inside
the server without). Uses PostgreSQL / Redis when DATABASE_URL / REDIS_URL are set,
otherwise SQLite and a filesystem broker (no services needed).

It supervises like a process manager: a child that exits is started again after a backoff
(1 s, doubling to 30 s; back to 1 s once it has run for a minute), and each restart is logged.
Only SIGINT or SIGTERM stops everything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from tokenmgr_project import redis as tm_redis
from usage.models import ApiKey

# A crashed child waits BACKOFF_FIRST seconds, doubling per crash in a row up to BACKOFF_MAX;
# one that ran STEADY_AFTER seconds before it died counts as a first crash again.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STEADY_AFTER = 60.0
STOP_GRACE = 15.0  # seconds children get to exit after SIGTERM before they are killed


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0  # in a row, without a steady run in between
    restart_at: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)
        self.started_at = time.monotonic()

    def backoff(self) -> float:
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.crashes - 1))


class Command(BaseCommand):
    help = "Migrate, then run the server, Celery worker and beat and the status broadcaster."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("TOKENMGR_HOST", "127.0.0.1"))
        parser.add_argument(
            "--port", type=int, default=int(os.environ.get("TOKENMGR_PORT", "8000"))
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="ASGI worker processes (default: 2 with Redis, 1 embedded: the in-process "
            "channel layer cannot span processes).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        if settings.REDIS_URL and not tm_redis.ping():
            self.stderr.write(f"REDIS_URL={settings.REDIS_URL} is set but Redis does not answer.")
            sys.exit(1)
        if settings.REDIS_URL:
            self.stderr.write(_persistence_line())
        if not _port_free(options["host"], options["port"]):
            # SO_REUSEPORT would let a second server share the port and split the traffic.
            self.stderr.write(f"{options['host']}:{options['port']} is already in use.")
            sys.exit(1)
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        workers = options["workers"] or (2 if settings.REDIS_URL else 1)
        bindir = os.path.dirname(sys.executable)
        celery = [os.path.join(bindir, "celery"), "-A", "tokenmgr_project"]
        # One server process per worker, each on its own SO_REUSEPORT socket (see serve.py).
        commands = {
            f"server-{n}": [
                sys.executable,
                "-m",
                "tokenmgr_project.serve",
                options["host"],
                str(options["port"]),
            ]
            for n in range(1, workers + 1)
        }
        commands.update(
            {
                "worker": [*celery, "worker", "--loglevel", "WARNING", "--concurrency", "2"],
                "beat": [*celery, "beat", "--loglevel", "WARNING"],
            }
        )
        if settings.REDIS_URL:
            # Embedded, the broadcaster runs inside the server (the channel layer is in-process).
            commands["broadcaster"] = [sys.executable, "manage.py", "broadcast_status"]
        elif workers > 1:
            self.stderr.write("Without Redis, live status reaches only one server process: use 1.")
            sys.exit(2)
        self._banner(options["host"], options["port"])
        children = [Child(name, command) for name, command in commands.items()]
        # A plain flag: the handler runs on this thread, where taking a lock could deadlock.
        stopping = [False]

        def on_signal(signum: int, _frame: Any) -> None:
            stopping[0] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        for child in children:
            self._start(child)
        while not stopping[0]:
            self._supervise(children, stopping)
            time.sleep(0.2)
        self._log("stopping everything")
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        sys.exit(0)

    def _supervise(self, children: list[Child], stopping: list[bool]) -> None:
        """One look at every child: note who exited, start again who is due."""
        now = time.monotonic()
        for child in children:
            if stopping[0]:
                return  # a Ctrl-C also reaches the children: their exit is no crash
            if child.process is None:
                if now >= child.restart_at and self._start(child):
                    child.restarts += 1
                    pid = child.process.pid if child.process else None
                    self._log(f"restarted {child.name} (pid {pid}, restart {child.restarts})")
                continue
            code = child.process.poll()
            if code is None:
                if child.crashes and now - child.started_at >= STEADY_AFTER:
                    child.crashes = 0
                continue
            ran = now - child.started_at
            child.crashes = 1 if ran >= STEADY_AFTER else child.crashes + 1
            child.process = None
            child.restart_at = now + child.backoff()
            self._log(
                f"{child.name} exited with code {code} after {ran:.1f} s; "
                f"restarting it in {child.backoff():.0f} s"
            )

    def _start(self, child: Child) -> bool:
        try:
            child.start()
        except OSError as exc:  # e.g. out of processes: try again later, like after a crash
            child.crashes += 1
            child.restart_at = time.monotonic() + child.backoff()
            self._log(
                f"could not start {child.name} ({exc}); trying again in {child.backoff():.0f} s"
            )
            return False
        return True

    def _log(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        self.stderr.write(f"[{stamp}] up: {message}")

    def _banner(self, host: str, port: int) -> None:
        base = f"http://{host}:{port}"
        db = settings.DATABASES["default"]
        mode = "PostgreSQL" if db["ENGINE"].endswith("postgresql") else f"SQLite ({db['NAME']})"
        redis_mode = f"Redis {settings.REDIS_URL}" if settings.REDIS_URL else "no Redis (embedded)"
        lines = [
            "",
            f"tokenmgr is starting on {mode}, {redis_mode}.",
            f"  Admin:    {base}/admin/",
            f"  API docs: {base}/api/docs/   (schema: {base}/api/schema/)",
            f"  Health:   {base}/api/v1/health",
        ]
        if not get_user_model().objects.filter(is_superuser=True).exists():
            lines.append(
                "  Login:    python manage.py createsuperuser   (no admin user exists yet)"
            )
        if not ApiKey.objects.filter(revoked_at__isnull=True).exists():
            lines.append(
                "  API key:  python manage.py apikey create --name me   (or Admin → API keys)"
            )
        lines.append("")
        self.stdout.write("\n".join(lines))


def _persistence_line() -> str:
    """Say whether acknowledged usage survives a Redis crash, and what ingestion does about it."""
    try:
        report = tm_redis.persistence_report()
    except tm_redis.REDIS_ERRORS as exc:
        return f"WARNING: could not read Redis's persistence ({exc}); it is checked again later."
    appendonly = {True: "yes", False: "no", None: "unknown"}[report["appendonly"]]
    state = f"appendonly {appendonly}, appendfsync {report['appendfsync'] or 'unknown'}"
    if report["durable"]:
        return (
            f"Redis persistence: {state} (read from {report['source']}): usage is buffered in "
            "Redis and survives a Redis crash."
        )
    if report["volatile_ok"]:
        return (
            f"WARNING: Redis does not persist ({state}) and TOKENMGR_BUFFER_VOLATILE_OK=true "
            "accepts the risk: usage is buffered in Redis anyway, and what was acknowledged but "
            "not yet flushed is LOST if Redis crashes."
        )
    return (
        f"WARNING: Redis does not persist ({state}): usage is NOT buffered, every event is "
        "written straight to the database (slower). Start Redis with --appendonly yes, or set "
        "TOKENMGR_BUFFER_VOLATILE_OK=true to buffer anyway and accept losing unflushed usage."
    )


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a previous run's TIME_WAIT connections do not count, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
