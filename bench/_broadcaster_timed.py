"""Diagnosis for bench/live_status.py --timed-broadcaster: the broadcaster process
(`manage.py broadcast_status`) with wall-clock timers around each awaited step of its tick,
patched in from here (reporting/broadcaster.py itself is unchanged).

    python bench/_broadcaster_timed.py OUT.json      # DJANGO_SETTINGS_MODULE etc. from the env

Timed: the whole tick; every thread hop (database_sync_to_async: status_take, status_dropped,
metrics_flush, the dashboard's state); each batch's _send and, inside it, the channel layer's
group_send per kind of group (a conversation's viewers, `status.broadcasted`, the dashboard);
the idle waits between ticks. A probe task sleeping 10 ms at a time measures how late the event
loop wakes it (loop lag: CPU contention or long steps). SIGUSR1 starts the measured window
(totals reset), SIGUSR2 writes the totals since (count, seconds, max per step) and the process's
CPU time to OUT.json; SIGTERM stops it as it stops broadcast_status.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import django

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for Django
django.setup()

from reporting import broadcaster, services  # noqa: E402

TIMERS: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
TICKS: list[tuple[float, int]] = []  # (seconds, items taken) per tick that took something


def _note(name: str, seconds: float) -> None:
    t = TIMERS[name]
    t[0] += 1
    t[1] += seconds
    t[2] = max(t[2], seconds)


def _timed_thread_hop(fn: Any, **kwargs: Any) -> Any:
    wrapped = _original_db_async(fn, **kwargs)

    @functools.wraps(fn)
    async def call(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return await wrapped(*a, **kw)
        finally:
            _note(f"thread hop: {getattr(fn, '__name__', repr(fn))}", time.perf_counter() - t)

    return call


_original_db_async = broadcaster.database_sync_to_async
broadcaster.database_sync_to_async = _timed_thread_hop  # type: ignore[assignment]


def _group_kind(group: str) -> str:
    if group == services.BROADCASTED_GROUP:
        return "group_send: status.broadcasted"
    if group == services.DASHBOARD_GROUP:
        return "group_send: dashboard"
    return "group_send: a conversation's viewers"


def _patch(b: broadcaster.StatusBroadcaster) -> None:
    layer = b.layer
    group_send = layer.group_send

    async def timed_group_send(group: str, message: dict[str, Any]) -> None:
        t = time.perf_counter()
        try:
            await group_send(group, message)
        finally:
            _note(_group_kind(group), time.perf_counter() - t)

    layer.group_send = timed_group_send
    send, tick = b._send, b.tick

    async def timed_send(*a: Any, **kw: Any) -> None:
        t = time.perf_counter()
        try:
            await send(*a, **kw)
        finally:
            _note("_send (one batch, all its group_sends)", time.perf_counter() - t)

    async def timed_tick(**kw: Any) -> int:
        t = time.perf_counter()
        n = await tick(**kw)
        took = time.perf_counter() - t
        _note("tick (whole)", took)
        if n:
            TICKS.append((took, n))
        return n

    b._send = timed_send  # type: ignore[method-assign]
    b.tick = timed_tick  # type: ignore[method-assign]


_original_wait = broadcaster._wait


async def _timed_wait(stop: asyncio.Event, seconds: float) -> None:
    t = time.perf_counter()
    try:
        await _original_wait(stop, seconds)
    finally:
        _note("idle wait between ticks", time.perf_counter() - t)


broadcaster._wait = _timed_wait  # type: ignore[assignment]


async def _lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)


class Window:
    """SIGUSR1 starts the measured window (totals reset), SIGUSR2 writes the totals so far."""

    def __init__(self, out_path: str) -> None:
        self.out_path = out_path
        self.lags: list[float] = []
        self.reset()

    def reset(self) -> None:
        TIMERS.clear()
        TICKS.clear()
        self.lags.clear()
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    def write(self) -> None:
        lags = sorted(self.lags)
        out = {
            "wall": time.perf_counter() - self.t0,
            "cpu": time.process_time() - self.cpu0,
            "timers": {k: {"n": v[0], "s": v[1], "max": v[2]} for k, v in TIMERS.items()},
            "ticks_with_work": len(TICKS),
            "items_per_tick": sum(n for _t, n in TICKS) / max(1, len(TICKS)),
            "lag_ms": {
                "p50": 1000 * lags[len(lags) // 2] if lags else None,
                "p99": 1000 * lags[int(len(lags) * 0.99)] if lags else None,
                "max": 1000 * lags[-1] if lags else None,
                "n": len(lags),
            },
        }
        with open(self.out_path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(self.out_path + ".tmp", self.out_path)


async def main(out_path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    window = Window(out_path)
    loop.add_signal_handler(signal.SIGUSR1, window.reset)
    loop.add_signal_handler(signal.SIGUSR2, window.write)
    b = broadcaster.StatusBroadcaster()
    _patch(b)
    probe = asyncio.create_task(_lag_probe(stop, window.lags))
    await b.run(stop)
    await probe


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
