"""A small process manager: what `manage.py up` runs its server, worker and beat under.

Each child that exits or crashes is started again after a backoff (1 s, doubling to 30 s per crash
in a row; back to 1 s once it has run for a minute), and each restart is logged. Only SIGINT or
SIGTERM stops everything: the children get SIGTERM, then STOP_GRACE seconds, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# A crashed child waits BACKOFF_FIRST seconds, doubling per crash in a row up to BACKOFF_MAX;
# one that ran STEADY_AFTER seconds before it died counts as a first crash again.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STEADY_AFTER = 60.0
STOP_GRACE = 15.0  # seconds children get to exit after SIGTERM before they are killed
TICK = 0.2  # seconds between two looks at the children


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


class Supervisor:
    """Runs `commands` (name → argv) until SIGINT/SIGTERM; logs as `[time] up: ...` to `write`."""

    def __init__(self, commands: dict[str, list[str]], write: Callable[[str], Any]) -> None:
        self.children = [Child(name, command) for name, command in commands.items()]
        self._write = write
        # A plain flag: the handler runs on this thread, where taking a lock could deadlock.
        self._stopping = False

    def run(self) -> None:
        """Start every child, keep them running, and return once all have stopped."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for child in self.children:
            self._start(child)
        while not self._stopping:
            self._look()
            time.sleep(TICK)
        self._log("stopping everything")
        self._stop_all()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def _look(self) -> None:
        """One look at every child: note who exited, start again who is due."""
        now = time.monotonic()
        for child in self.children:
            if self._stopping:
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

    def _stop_all(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def _log(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        self._write(f"[{stamp}] up: {message}")
