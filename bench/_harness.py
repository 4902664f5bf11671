"""Shared plumbing for the benchmarks: a throw-away database, Redis server (AOF on) and API key,
and the server processes (uvicorn, celery worker, celery beat, the bare reference endpoint), all
stopped again on exit, on error, on Ctrl-C and on SIGTERM.

Only loopback traffic. Every process is started in a session of its own, so it and its children
(uvicorn's workers, celery's pool process) are stopped through that one process-group id.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PY = str(VENV_BIN / "python")

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DB_NAME = "tokenmgr_bench"
REDIS_HOST = "127.0.0.1"
SECRET_KEY = "bench-secret-key-not-for-production-0123456789abcdef"


def ensure_venv() -> None:
    """Re-run under the project's virtualenv when started with another interpreter."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve() and Path(PY).exists():
        os.execv(PY, [PY, *sys.argv])


def run_main(main: Any) -> None:
    """Entry point of a benchmark script: the project's venv, and a clean exit on Ctrl-C."""
    ensure_venv()
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({exc!r}); everything started was stopped", file=sys.stderr)
        sys.exit(130)


def add_common_args(ap: Any) -> None:
    """Options every benchmark takes."""
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the server processes into DIR")
    ap.add_argument(
        "--settings",
        metavar="MODULE",
        default="tokenmgr_project.settings",
        help="DJANGO_SETTINGS_MODULE for every process (for what-if experiments)",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Interrupted(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP so the clean-up in Stack.__exit__ runs."""


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


class Stack:
    """Database + Redis + API key + server processes for one benchmark run.

    Redis is a server of the run's own (a free port, its data in the run's temporary folder) with
    AOF on and `appendfsync everysec`, as tokenmgr requires for the buffer (README): the shared
    Redis on 6379 keeps nothing on disk, and a benchmark must never flush a shared server."""

    def __init__(
        self,
        *,
        redis_db: int | None,
        extra_env: dict[str, str] | None = None,
        db_name: str = DB_NAME,
        keep_db: bool = False,
    ):
        self.db_name = db_name
        # A database that outlives the run (bench/gen_ledger.py's 10M-row ledger, reused by
        # bench/reports.py): never dropped on exit.
        self.keep_db = keep_db
        self.redis_db = redis_db
        self.tmp = Path(tempfile.mkdtemp(prefix="tokenmgr-bench-"))
        (self.tmp / "data").mkdir()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
        self.env.update(
            DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.db_name}",
            SECRET_KEY=SECRET_KEY,
            TOKENMGR_DATA_DIR=str(self.tmp / "data"),
            DEBUG="false",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
            DJANGO_SETTINGS_MODULE="tokenmgr_project.settings",
        )
        if redis_db is not None:
            self.env["REDIS_URL"] = f"redis://{REDIS_HOST}:{self.redis_port}/{redis_db}"
        self.env.update(extra_env or {})
        self.key = ""

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)
        atexit.register(self.stop_all)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not issubclass(
            exc_type, (KeyboardInterrupt, Interrupted, SystemExit)
        ):
            self.dump_logs()
        self.stop_all()
        self.drop_database()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- database / redis ------------------------------------------------------------------------

    def pg(self, dbname: str | None = None, **kw: Any) -> Any:
        import psycopg

        dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={dbname or self.db_name}"
        return psycopg.connect(dsn, **kw)

    def reset_database(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {self.db_name}")

    def drop_database(self) -> None:
        if self.keep_db or os.environ.get("BENCH_KEEP_DB"):
            return
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log(f"could not drop {self.db_name}: {exc}")

    def redis(self) -> Any:
        import redis

        assert self.redis_db is not None
        return redis.Redis(host=REDIS_HOST, port=self.redis_port, db=self.redis_db)

    def start_redis(self) -> None:
        """The run's own Redis, AOF on (appendfsync everysec), stopped with everything else."""
        (self.tmp / "redis").mkdir()
        self.start(
            "redis",
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port", str(self.redis_port), "--bind", REDIS_HOST, "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", str(self.tmp / "redis"), "--daemonize", "no",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                self.redis().ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis did not start:\n{self.log_tail('redis')}") from None
                time.sleep(0.05)

    def setup(self) -> None:
        """Fresh database, the run's own Redis, migrations, one global API key."""
        self.reset_database()
        if self.redis_db is not None:
            self.start_redis()
        self.manage("migrate", "--noinput", "-v", "0")
        out = self.manage("apikey", "create", "--name", "bench", "--quiet")
        self.key = out.strip().splitlines()[-1]

    def staff_session(self, username: str = "bench-staff") -> str:
        """A superuser and a logged-in Django session for it (as /admin/login/ would leave
        behind); returns the Cookie header value, e.g. "sessionid=...", for staff-only pages
        and the dashboard websocket."""
        code = (
            "from importlib import import_module\n"
            "from django.conf import settings\n"
            "from django.contrib import auth\n"
            "user = auth.get_user_model().objects.create_superuser(\n"
            f"    {username!r}, 'bench@example.invalid', None)\n"
            "store = import_module(settings.SESSION_ENGINE).SessionStore()\n"
            "store[auth.SESSION_KEY] = user._meta.pk.value_to_string(user)\n"
            "store[auth.BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]\n"
            "store[auth.HASH_SESSION_KEY] = user.get_session_auth_hash()\n"
            "store.create()\n"
            "print(f'{settings.SESSION_COOKIE_NAME}={store.session_key}')\n"
        )
        return self.python(code).strip().splitlines()[-1]

    def manage(self, *args: str) -> str:
        out = subprocess.run(
            [PY, "manage.py", *args],
            check=False,
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def python(self, code: str, timeout: float = 120) -> str:
        """Run a snippet in a fresh interpreter with Django set up and the benchmark's env."""
        out = subprocess.run(
            [PY, "-c", "import django; django.setup()\n" + code],
            check=False,
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"snippet failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    # --- processes -------------------------------------------------------------------------------

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as logf:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        return proc

    def start_uvicorn(self, workers: int, interface: str = "asgi") -> int:
        """uvicorn on tokenmgr_project.asgi; interface="wsgi" serves tokenmgr_project.wsgi through
        uvicorn's WSGI adapter instead (a what-if comparison, not the deployed setup)."""
        port = free_port()
        if interface == "asgi":
            # As `manage.py up` runs it: one tokenmgr_project.serve process per worker, each on
            # its own SO_REUSEPORT socket, all in one process group (one name for CPU accounting).
            one = f"{PY} -m tokenmgr_project.serve 127.0.0.1 {port} warning"
            self.start(f"uvicorn-w{workers}", ["sh", "-c", f"{' & '.join([one] * workers)} & wait"])
            self.wait_http(port)
            return port
        app, iface = "tokenmgr_project.wsgi:application", "wsgi"
        self.start(
            f"uvicorn-w{workers}",
            [
                str(VENV_BIN / "uvicorn"), app, "--interface", iface,
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--no-access-log", "--log-level", "warning",
            ],
        )  # fmt: skip
        self.wait_http(port)
        return port

    def start_bare(self, workers: int) -> int:
        """The reference: bench/_bare_app.py, a bare uvicorn JSON endpoint, one process per worker
        on its own SO_REUSEPORT socket like tokenmgr's servers (returns its port)."""
        port = free_port()
        one = f"{PY} {REPO / 'bench' / '_bare_app.py'} 127.0.0.1 {port}"
        self.start(f"bare-w{workers}", ["sh", "-c", f"{' & '.join([one] * workers)} & wait"])
        self.wait_http(port)
        return port

    def start_worker(self) -> None:
        self.start(
            "celery-worker",
            [
                str(VENV_BIN / "celery"), "-A", "tokenmgr_project", "worker",
                "--loglevel", "WARNING", "--concurrency", "1",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
        )  # fmt: skip

    def start_beat(self) -> None:
        self.start(
            "celery-beat",
            [
                str(VENV_BIN / "celery"), "-A", "tokenmgr_project", "beat", "--loglevel", "WARNING",
                "--schedule", str(self.tmp / "data" / "celerybeat-schedule"),
            ],
        )  # fmt: skip

    def start_broadcaster(self) -> None:
        """The live-status broadcaster process (`manage.py broadcast_status`, used with Redis)."""
        self.start("broadcaster", [PY, "manage.py", "broadcast_status"])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def wait_http(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/api/v1/health")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server on port {port} did not become healthy")

    def stop(self, name: str) -> None:
        for entry in list(self.procs):
            if entry[0] == name:
                self._stop_proc(entry[1])
                self.procs.remove(entry)

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        # proc.pid is also the id of the process group this script created for it
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # children left in the group after the leader exited (e.g. a pool process)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        while self.procs:
            name, proc = self.procs.pop()
            try:
                self._stop_proc(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {name}: {exc}")

    # --- logs ------------------------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def dump_logs(self) -> None:
        for path in sorted(self.tmp.glob("*.log")):
            tail = self.log_tail(path.stem)
            if tail.strip():
                print(f"----- {path.name} (tail) -----\n{tail}", file=sys.stderr)


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {"nproc": str(os.cpu_count())}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    info["python"] = platform.python_version()
    return info


def server_versions(stack: Stack) -> dict[str, str]:
    out = {}
    with contextlib.suppress(Exception), stack.pg("postgres") as conn:
        out["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
    with contextlib.suppress(Exception):
        import redis

        rds = redis.Redis(host=REDIS_HOST, port=stack.redis_port)
        out["redis"] = rds.info("server")["redis_version"]
        aof = rds.config_get("appendonly")["appendonly"]
        out["redis"] += (
            f" (appendonly {aof}, appendfsync {rds.config_get('appendfsync')['appendfsync']})"
        )
    return out


def machine_line(stack: Stack) -> str:
    info, versions = machine_info(), server_versions(stack)
    return (
        f"machine: {info.get('nproc')} cpu ({info.get('cpu', '?')}), {info.get('ram', '?')} RAM, "
        f"PostgreSQL {versions.get('postgresql', '?')}, Redis {versions.get('redis', '?')}, "
        f"Python {info['python']}"
    )


# --- CPU accounting -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: str) -> tuple[str, int, int] | None:
    """(comm, process group, CPU ticks incl. reaped children) of a process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # utime + stime + cutime + cstime: PostgreSQL backends that already exited are charged to
    # the postmaster this way
    return comm, int(fields[2]), sum(int(x) for x in fields[11:15])


# "postgres: 15/main: USER DB HOST(PORT) STATE"; background processes have no user/db/host
_PG_BACKEND = re.compile(r"^postgres: [^:]+: (\S+) (\S+) (?:[\w.:-]+\(\d+\)|\[local\]) ")
OTHER_PG = "postgres (other dbs)"
# Redis servers other than the run's own (e.g. the shared one on 6379, another agent's): not
# charged to the run once it started its own.
OTHER_REDIS = "redis (other servers)"


def _pg_group(pid: str, bench_db: str) -> str:
    """PostgreSQL server processes and sessions on the bench db are "postgresql"; sessions on
    other databases (another project's test run on the same server, creating and dropping its
    databases through `postgres`) are OTHER_PG, so they are not charged to the run. Backends
    that already exited are charged to the postmaster, whoever they served."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "postgresql"
    m = _PG_BACKEND.match(cmd)
    if m and m.group(2) != bench_db:
        return OTHER_PG
    return "postgresql"


def wait_quiet(max_wait: float, busy_below: float = 0.15, settle: int = 2) -> float:
    """Wait (at most max_wait seconds) until the machine is idle -- busy below `busy_below` for
    `settle` consecutive seconds -- so a timed phase does not start in the middle of someone
    else's burst. Returns the last second's busy fraction."""

    def busy_total() -> tuple[int, int]:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(vals) - vals[3] - vals[4], sum(vals)

    deadline, quiet, busy = time.monotonic() + max_wait, 0, 1.0
    b0, t0 = busy_total()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        b1, t1 = busy_total()
        busy = (b1 - b0) / max(1, t1 - t0)
        b0, t0 = b1, t1
        quiet = quiet + 1 if busy < busy_below else 0
        if quiet >= settle:
            return busy
    if max_wait > 0:
        log(f"machine still {busy:.0%} busy after waiting {max_wait:.0f} s; measuring anyway")
    return busy


def cpu_snapshot(stack: Stack, extra_groups: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds used so far by the processes this run started (per process group), by the
    PostgreSQL and Redis servers and by this script; plus the machine's busy and total time.
    `extra_groups`: more process groups (id -> name) started outside the stack, e.g. a load
    generator (still counted while it is an exited but not yet reaped child)."""
    groups = {proc.pid: name for name, proc in stack.procs}
    groups.update(extra_groups or {})
    out: dict[str, float] = collections.defaultdict(float)
    me = os.getpid()
    for pid in os.listdir("/proc"):
        st = _read_stat(pid) if pid.isdigit() else None
        if st is None:
            continue
        comm, pgrp, ticks = st
        if pgrp in groups:
            name = groups[pgrp]
        elif int(pid) == me:
            name = "bench client"
        elif comm == "postgres":
            name = _pg_group(pid, stack.db_name)
        elif comm.startswith("redis-server"):
            name = OTHER_REDIS if "redis" in groups.values() else "redis"
        else:
            continue
        out[name] += ticks / _TICK
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    out["_busy"] = (sum(vals) - vals[3] - vals[4]) / _TICK  # all but idle and iowait
    out["_total"] = sum(vals) / _TICK
    return dict(out)


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    ncpu = os.cpu_count() or 1
    lines = [
        f"CPU during the timed phase ({wall:.1f} s wall x {ncpu} cores "
        f"= {wall * ncpu:.1f} CPU-s available):"
    ]
    names = [k for k in after if not k.startswith("_") and k not in {OTHER_PG, OTHER_REDIS}]
    used = {k: after[k] - before.get(k, 0.0) for k in names}
    for name in sorted(names, key=lambda k: -used[k]):
        if used[name] >= 0.05:
            lines.append(
                f"  {name:<16} {used[name]:7.1f} CPU-s  {used[name] / wall:6.0%} of a core"
            )
    busy = after["_busy"] - before["_busy"]
    total = after["_total"] - before["_total"]
    other = max(0.0, busy - sum(used.values()))
    other_pg = after.get(OTHER_PG, 0.0) - before.get(OTHER_PG, 0.0)
    note = f"; {other_pg:.1f} of it PostgreSQL on other dbs" if other_pg >= 0.05 else ""
    lines.append(f"  other processes  {other:7.1f} CPU-s  (not started by this benchmark{note})")
    lines.append(f"  machine busy     {busy / total if total else 0:7.0%}")
    return "\n".join(lines)


# --- optional sampling profiles (py-spy, if installed: .venv/bin/pip install py-spy) ------------


class Profiler:
    """`py-spy record --gil` on every Python process of the named groups, start() to stop()."""

    def __init__(self, stack: Stack, outdir: str | None, groups: tuple[str, ...]):
        self.stack, self.groups = stack, groups
        self.outdir = Path(outdir) if outdir else None
        self.spies: list[tuple[str, subprocess.Popen[bytes]]] = []
        exe = VENV_BIN / "py-spy"
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")
        if self.outdir and not self.exe:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")

    def start(self) -> None:
        if not self.outdir or not self.exe:
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        targets = {p.pid: name for name, p in self.stack.procs if name.startswith(self.groups)}
        for pid in os.listdir("/proc"):
            st = _read_stat(pid) if pid.isdigit() else None
            if st is None or st[1] not in targets:
                continue
            try:
                if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
            out = self.outdir / f"{targets[st[1]]}-{pid}.txt"
            argv = [self.exe, "record", "--pid", pid, "--format", "raw", "--rate", "100"]
            argv += ["--nonblocking", "--gil", "-o", str(out)]
            spy = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            self.spies.append((str(out), spy))
        time.sleep(0.5)  # let py-spy attach

    def stop(self) -> list[str]:
        paths = []
        for out, spy in self.spies:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                spy.wait(15)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            if Path(out).exists():
                paths.append(out)
        self.spies.clear()
        return paths


def pyspy_summary(
    path: str, top: int = 18, packages: tuple[str, ...] = ("usage", "budgets", "tokenmgr_project")
) -> str:
    """Share of samples per function (line numbers dropped) in a py-spy raw file; "app frames"
    are those of `packages` (folders of the repository or site-packages)."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    strip = re.compile(
        r"\((?:/[^()]*?/site-packages/|" + re.escape(str(REPO)) + r"/|/usr/[^()]*?/python3\.\d+/)"
    )
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        frames = [re.sub(r":\d+\)$", ")", strip.sub("(", f)) for f in stack.split(";")]
        for f in set(frames):
            incl[f] += int(n)
        self_[frames[-1]] += int(n)
    if not total:
        return f"{path}: no samples"
    app = [(f, c) for f, c in incl.most_common() if any(f"({pkg}/" in f for pkg in packages)]
    lines = [f"{Path(path).name}: {total} samples holding the GIL (100 Hz)", "  app frames:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in app[:top]]
    lines.append("  hottest functions (self):")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_.most_common(12)]
    return "\n".join(lines)


# --- PostgreSQL sessions --------------------------------------------------------------------------


class PgConnMonitor:
    """Samples the number of PostgreSQL sessions on the benchmark database every 0.25 s."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.samples: list[int] = []
        self.max_connections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def __enter__(self) -> PgConnMonitor:
        self._conn = self.stack.pg("postgres", autocommit=True)
        self.max_connections = int(self._conn.execute("SHOW max_connections").fetchone()[0])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self._conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                    (self.stack.db_name,),
                ).fetchone()[0]
            except Exception:  # noqa: BLE001 - monitoring only
                return
            self.samples.append(n)
            self._stop.wait(0.25)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self._conn.close()

    def summary(self) -> str:
        if not self.samples:
            return "PostgreSQL sessions on the bench db: no samples"
        mean = sum(self.samples) / len(self.samples)
        return (
            f"PostgreSQL sessions on the bench db: peak {max(self.samples)}, mean {mean:.0f} "
            f"(server max_connections {self.max_connections})"
        )
