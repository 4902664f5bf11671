"""manage.py up — the whole system in one command (README, first command).

Creates or migrates the schema, then starts the ASGI server (HTTP + websockets), a Celery worker,
Celery beat and the live-status broadcaster (its own process with Redis; inside the server
without) under the supervisor (tokenmgr_project.core.supervisor). Uses PostgreSQL / Redis when
DATABASE_URL / REDIS_URL are set, otherwise SQLite and a filesystem broker (no services needed).
Saves the variables it was started with in `<data dir>/effective.env`, where the management
commands of other terminals find them (tokenmgr_project.core.envfile).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.envfile import DEFAULT_DATA_DIR, FILENAME, envfile_write, redacted
from tokenmgr_project.core.supervisor import Supervisor
from usage.models import ApiKey


class Command(BaseCommand):
    help = "Migrate, then run the server, Celery worker and beat and the status broadcaster."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("TOKENMGR_HOST") or "127.0.0.1")
        parser.add_argument("--port", type=int, default=None, help="default: TOKENMGR_PORT, 8000")
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="ASGI worker processes (default: 2 with Redis, 1 embedded: the in-process "
            "channel layer cannot span processes).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host = options["host"]
        port = _env_port() if options["port"] is None else options["port"]
        if settings.REDIS_URL and not tm_redis.ping():
            url = redacted(settings.REDIS_URL)
            self.stderr.write(f"REDIS_URL={url} is set but Redis does not answer.")
            sys.exit(1)
        if settings.REDIS_URL:
            self.stderr.write(_persistence_line())
        if not _port_free(host, port):
            # SO_REUSEPORT would let a second server share the port and split the traffic.
            self.stderr.write(f"{host}:{port} is already in use.")
            sys.exit(1)
        workers = options["workers"] or (2 if settings.REDIS_URL else 1)
        if not settings.REDIS_URL and workers > 1:
            self.stderr.write("Without Redis, live status reaches only one server process: use 1.")
            sys.exit(2)
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        saved = {n: os.environ[n] for n in sorted(settings.TOKENMGR_ENV_NAMES) if n in os.environ}
        envfile_write(settings.DATA_DIR / FILENAME, saved)
        self._banner(host, port, saved)
        Supervisor(_commands(host, port, workers), self.stderr.write).run()
        sys.exit(0)

    def _banner(self, host: str, port: int, saved: dict[str, str]) -> None:
        base = f"http://{host}:{port}"
        db = settings.DATABASES["default"]
        mode = "PostgreSQL" if db["ENGINE"].endswith("postgresql") else f"SQLite ({db['NAME']})"
        redis_url = redacted(settings.REDIS_URL)
        redis_mode = f"Redis {redis_url}" if redis_url else "no Redis (embedded)"
        manage = _manage_py()
        envfile = _shown(settings.DATA_DIR / FILENAME)
        names = ", ".join(n for n in saved if n != "TOKENMGR_DATA_DIR")
        effect = (
            f"takes {names} from {envfile} (saved now), so it acts on this system"
            if names
            else f"uses the defaults too ({envfile}, saved now, sets no variable)"
        )
        commands = textwrap.fill(
            f"{effect}; a variable set in its own environment wins.",
            width=100,
            initial_indent=" " * 12,
            subsequent_indent=" " * 12,
        )
        lines = [
            "",
            f"tokenmgr is starting on {mode}, {redis_mode}.",
            f"  Admin:    {base}/admin/",
            f"  API docs: {base}/api/docs/   (schema: {base}/api/schema/)",
            f"  Health:   {base}/api/v1/health",
            f"  Commands: {manage} <command>   (in {settings.BASE_DIR})",
            commands,
        ]
        if not get_user_model().objects.filter(is_superuser=True).exists():
            lines.append(f"  Login:    {manage} createsuperuser   (no admin user exists yet)")
        if not ApiKey.objects.filter(revoked_at__isnull=True).exists():
            lines.append(f"  API key:  {manage} apikey create --name me   (or Admin → API keys)")
        lines.append("")
        self.stdout.write("\n".join(lines))


def _env_port() -> int:
    raw = os.environ.get("TOKENMGR_PORT") or "8000"
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise CommandError(f"TOKENMGR_PORT={raw!r} is not a port number (1..65535)")
    return int(raw)


def _commands(host: str, port: int, workers: int) -> dict[str, list[str]]:
    """What runs under the supervisor, by name (the names appear in its log)."""
    bindir = os.path.dirname(sys.executable)
    celery = [os.path.join(bindir, "celery"), "-A", "tokenmgr_project"]
    # One server process per worker, each on its own SO_REUSEPORT socket (see serve.py).
    commands = {
        f"server-{n}": [sys.executable, "-m", "tokenmgr_project.serve", host, str(port)]
        for n in range(1, workers + 1)
    }
    commands["worker"] = [*celery, "worker", "--loglevel", "WARNING", "--concurrency", "2"]
    commands["beat"] = [*celery, "beat", "--loglevel", "WARNING"]
    if settings.REDIS_URL:
        # Embedded, the broadcaster runs inside the server (the channel layer is in-process).
        commands["broadcaster"] = [sys.executable, "manage.py", "broadcast_status"]
    return commands


def _shown(path: Path) -> str:
    """A path as short as it can be said from the checkout (where bin/up runs)."""
    return (
        str(path.relative_to(settings.BASE_DIR))
        if path.is_relative_to(settings.BASE_DIR)
        else str(path)
    )


def _manage_py() -> str:
    """How to run manage.py with this interpreter (the venv's, outside of which it fails) so it
    finds effective.env: a data directory of its own must be named."""
    command = f"{_shown(Path(sys.executable))} manage.py"
    if settings.DATA_DIR != DEFAULT_DATA_DIR:
        command = f"TOKENMGR_DATA_DIR={shlex.quote(str(settings.DATA_DIR))} {command}"
    return command


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
