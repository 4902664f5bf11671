"""Real processes for tests: a redis-server of a test's own (for tests that kill or reconfigure
Redis: never the shared one), and the whole system under `manage.py up`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Runs with the AOF on (as tokenmgr requires) in its own directory, so a SIGKILL followed by
    `start()` on the same port and directory replays what it acknowledged."""

    def __init__(self, directory: Path, *extra: str, appendonly: bool = True) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.directory = directory
        self.port = free_port()
        self.args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 15.0) -> None:
        """Start (again, on the same port and directory) and wait until it has replayed its AOF
        and serves."""
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = client.info()
                # Ours, not another process's that holds the port (ours then failed to bind).
                if int(info["process_id"]) != self.process.pid:
                    raise RuntimeError(f"port {self.port} is taken by another redis-server")
                if not int(info["loading"]):
                    return
                time.sleep(0.05)
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def call(
    url: str, body: Any = None, key: str = "", method: str = "", timeout: float = 10
) -> tuple[int, Any]:
    """One HTTP request: (status, decoded JSON body). Raises OSError when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"null")
        except ValueError:
            return err.code, raw.decode(errors="replace")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Up:
    """`python manage.py up` on a free port, its output collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--port", str(self.port), *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def api(self, path: str, body: Any = None, key: str = "", method: str = "") -> tuple[int, Any]:
        return call(f"{self.base}/api/v1/{path}", body, key, method)

    def wait_healthy(self, timeout: float = 60) -> dict[str, Any]:
        """Poll /health until it says ok (the whole system answers), or fail with the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status, health = self.api("health")
                if status == 200 and health["status"] == "ok":
                    return dict(health)
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the system never became healthy:\n{self.output()[-4000:]}")

    def child(self, word: str) -> int:
        """The pid of up's direct child whose command line contains `word`."""
        for pid in descendants(self.process.pid):
            line = cmdline(pid)
            if word in line and self._is_direct_child(pid):
                return pid
        raise AssertionError(f"no child of up runs {word!r}")

    def _is_direct_child(self, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return int(stat[1]) == self.process.pid

    def stop(self) -> int:
        """SIGTERM, as an operator would; returns up's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(40)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(self.process.pid), self.process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = self.process.wait(10)
        self._reader.join(5)
        return code
