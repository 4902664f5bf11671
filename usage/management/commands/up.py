"""manage.py up — the whole system in one command (README, first command).

Creates or migrates the schema, then starts and supervises the ASGI server (HTTP + websockets),
a Celery worker, Celery beat and the live-status broadcaster (its own process with Redis; inside
the server without). Uses PostgreSQL / Redis when DATABASE_URL / REDIS_URL are set,
otherwise SQLite and a filesystem broker (no services needed). If any process dies, all stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from tokenmgr_project import redis as tm_redis
from usage.models import ApiKey


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
        if not _port_free(options["host"], options["port"]):
            # SO_REUSEPORT would let a second server share the port and split the traffic.
            self.stderr.write(f"{options['host']}:{options['port']} is already in use.")
            sys.exit(1)
        self._banner(options["host"], options["port"])
        children = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
        stopping = False

        def stop(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exit_code = 0
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    self.stderr.write(
                        f"{name} exited with code {child.returncode}; stopping everything."
                    )
                    exit_code = child.returncode or 1
                    stopping = True
                    break
            time.sleep(0.5)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(exit_code)

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
