"""Websocket receivers for the live-status benchmarks, in a process of their own (so whatever
generates the load never delays them on the GIL): status clients, one per conversation
(`ws/status/<id>/`, Bearer key), and dashboard clients (`ws/dashboard/`, a staff session cookie).

    python bench/_live_clients.py CONFIG.json     # LiveClients below starts it

It connects every client, writes the config's "ready" file, then keeps every frame with its
arrival time (time.time() as soon as the websocket library hands the frame over; nothing is
parsed while frames arrive) until SIGTERM; a socket the server drops is connected again at once
and the drop noted (when, why). Then it closes the sockets, parses what arrived and
writes the results (JSON) to the config's "out" file.

Status messages sent by bench/live_status.lua carry "bench TAG SEND_US TID-SEQ" as their text:
per message it reports send -> received, send -> queued (the message's server `timestamp`) and
batch sent (the frame's `timestamp`) -> received, all on this machine's wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any


def _epoch(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else float("nan")


def parse_status(frames: list[tuple[float, str]]) -> dict[str, Any]:
    """Per tag ("m", "w", ...): arrays over messages, in arrival order."""
    tags: dict[str, dict[str, list[Any]]] = {}
    ids: dict[str, set[str]] = {}
    other = batches = 0
    sizes: list[int] = []
    dropped_seen: list[int] = []
    timeline: list[tuple[float, float, str]] = []  # per frame: received, batch sent, first tag
    for t_recv, text in frames:
        data = json.loads(text)
        if data.get("type") != "status.batch":
            other += 1
            continue
        batches += 1
        sizes.append(len(data["messages"]))
        if data.get("dropped") is not None:
            dropped_seen.append(int(data["dropped"]))
        t_batch = _epoch(data.get("timestamp"))
        first = str(data["messages"][0].get("message", "")).split() if data["messages"] else []
        timeline.append((round(t_recv, 4), round(t_batch, 4), first[1] if len(first) > 1 else ""))
        for msg in data["messages"]:
            parts = str(msg.get("message", "")).split()
            if len(parts) != 4 or parts[0] != "bench":
                other += 1
                continue
            tag, send_us, sid = parts[1], int(parts[2]), parts[3]
            arr = tags.setdefault(
                tag, {"send_us": [], "lat_ms": [], "queued_ms": [], "hop_ms": [], "dup": [0]}
            )
            seen = ids.setdefault(tag, set())
            if sid in seen:
                arr["dup"][0] += 1
                continue
            seen.add(sid)
            send = send_us / 1e6
            arr["send_us"].append(send_us)
            arr["lat_ms"].append(round((t_recv - send) * 1000, 3))
            arr["queued_ms"].append(round((_epoch(msg.get("timestamp")) - send) * 1000, 3))
            arr["hop_ms"].append(round((t_recv - t_batch) * 1000, 3))
    return {
        "tags": tags,
        "frames": batches,
        "other": other,
        "batch_sizes": sizes,
        "timeline": timeline,
        "dropped_seen": max(dropped_seen) if dropped_seen else None,
    }


def parse_dashboard(frames: list[tuple[float, str]]) -> dict[str, Any]:
    updates, other = [], 0
    for t_recv, text in frames:
        data = json.loads(text)
        if data.get("type") != "dashboard.update":
            other += 1
            continue
        minutes = data.get("usage", {}).get("minutes", {})
        updates.append(
            {
                "t": t_recv,
                "seq": data.get("seq"),
                "events": len(data.get("events", [])),
                "usage_requests": sum(int(n) for n in minutes.values()),
                "state": data.get("state") is not None,
                "bytes": len(text),
            }
        )
    return {"updates": updates, "other": other}


class Client:
    """One websocket; if the server drops it, it connects again at once (as a browser's page
    would) and notes when and why, so a lost socket costs what it missed, not the rest of the
    run."""

    def __init__(self, kind: str, name: str, url: str, headers: dict[str, str], origin: str):
        self.kind, self.name, self.url, self.headers = kind, name, url, headers
        self.origin = origin
        self.frames: list[tuple[float, str]] = []
        self.ws: Any = None
        self.closes: list[tuple[float, str]] = []  # (time.time(), why) per drop by the server
        self.extensions: list[str] = []

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(
            self.url,
            origin=self.origin,  # type: ignore[arg-type]
            additional_headers=self.headers,
            max_size=None,
            max_queue=4096,
            ping_interval=None,
            open_timeout=60,
        )
        self.extensions = [type(e).__name__ for e in self.ws.protocol.extensions]

    async def read(self) -> None:
        frames = self.frames
        while True:
            try:
                async for text in self.ws:
                    frames.append((time.time(), text))
                why = f"closed by the server: {self.ws.close_code} {self.ws.close_reason}"
            except asyncio.CancelledError:
                return  # stopped
            except Exception as exc:  # noqa: BLE001 - reported
                why = repr(exc)[:300]
            self.closes.append((time.time(), why))
            try:
                await self.connect()
            except asyncio.CancelledError:
                return
            except Exception as exc:  # noqa: BLE001 - reported, this client is done
                self.closes.append((time.time(), f"could not reconnect: {exc!r}"[:300]))
                return


async def run(cfg: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    base, origin = cfg["base"], cfg["origin"]
    bearer = {"Authorization": f"Bearer {cfg['key']}"}
    cookie = {"Cookie": cfg["cookie"]}
    clients = [
        Client("status", conv, f"{base}/ws/status/{conv}/", bearer, origin)
        for conv in cfg["conversations"]
    ] + [
        Client("dashboard", f"dashboard-{i}", f"{base}/ws/dashboard/", cookie, origin)
        for i in range(cfg["dashboards"])
    ]
    for start in range(0, len(clients), 20):
        await asyncio.gather(*(c.connect() for c in clients[start : start + 20]))
    readers = [asyncio.create_task(c.read()) for c in clients]
    t_ready = time.time()
    Path(cfg["ready"]).write_text(str(t_ready))
    progress = Path(cfg["progress"])
    while not stop.is_set():
        # frames so far, for LiveClients.frames() (written beside, then renamed)
        frames = sum(len(c.frames) for c in clients if c.kind == "status")
        dashboard = sum(1 for c in clients if c.kind == "dashboard" and c.frames)
        progress.with_suffix(".tmp").write_text(f"{frames} {dashboard} {time.time()}")
        os.replace(progress.with_suffix(".tmp"), progress)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    t_stop = time.time()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*(c.ws.close() for c in clients)), 10)
    out: dict[str, Any] = {
        "t_ready": t_ready,
        "t_stop": t_stop,
        "closes": {c.name: c.closes for c in clients if c.closes},
        "extensions": sorted({e for c in clients for e in c.extensions}),
        "status": {},
        "dashboard": {},
    }
    for c in clients:
        if c.kind == "status":
            out["status"][c.name] = parse_status(c.frames)
        else:
            out["dashboard"][c.name] = parse_dashboard(c.frames)
    tmp = Path(cfg["out"] + ".tmp")
    tmp.write_text(json.dumps(out, separators=(",", ":")))
    os.replace(tmp, cfg["out"])


class LiveClients:
    """Starts this module as a process of the stack (CPU accounted as `name`), waits until every
    socket is open; stop() ends it and returns its results."""

    def __init__(
        self,
        stack: Any,
        port: int,
        *,
        key: str,
        conversations: list[str],
        dashboards: int,
        cookie: str,
        name: str = "ws-clients",
    ):
        self.stack, self.name = stack, name
        tmp = Path(stack.tmp)
        self.cfg = {
            "base": f"ws://127.0.0.1:{port}",
            "origin": f"http://127.0.0.1:{port}",
            "key": key,
            "conversations": conversations,
            "dashboards": dashboards,
            "cookie": cookie,
            "ready": str(tmp / f"{name}.ready"),
            "progress": str(tmp / f"{name}.progress"),
            "out": str(tmp / f"{name}.json"),
        }
        self.config_path = tmp / f"{name}.config.json"
        self.t_ready = 0.0

    def start(self, timeout: float = 90) -> None:
        import _harness as h

        self.config_path.write_text(json.dumps(self.cfg))
        self.stack.start(self.name, [h.PY, str(Path(__file__).resolve()), str(self.config_path)])
        deadline = time.monotonic() + timeout
        ready = Path(self.cfg["ready"])
        while not ready.exists():
            self.stack.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"websocket clients not connected after {timeout:.0f} s")
            time.sleep(0.1)
        self.t_ready = float(ready.read_text())

    def frames(self) -> int:
        """Status frames received so far by all clients (updated every 0.2 s)."""
        try:
            return int(Path(self.cfg["progress"]).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def dashboard_frames(self) -> int:
        """Dashboard clients that have received at least one frame so far."""
        try:
            return int(Path(self.cfg["progress"]).read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    def wait_settled(self, quiet: float, timeout: float) -> float:
        """Until no frame arrived for `quiet` seconds (or `timeout`); returns the time.time()
        at which the last frame count change was seen."""
        deadline = time.monotonic() + timeout
        last, changed_at = self.frames(), time.time()
        while time.monotonic() < deadline:
            self.stack.check_alive()
            time.sleep(0.1)
            n = self.frames()
            if n != last:
                last, changed_at = n, time.time()
            elif time.time() - changed_at >= quiet:
                break
        return changed_at

    def stop(self) -> dict[str, Any]:
        self.stack.stop(self.name)
        out = Path(self.cfg["out"])
        if not out.exists():
            raise RuntimeError(
                f"websocket clients wrote no results:\n{self.stack.log_tail(self.name)}"
            )
        return json.loads(out.read_text())


def dashboard_summary(results: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """Per dashboard client, the updates that arrived in [t0, t1] (wall clock): rate, gaps."""
    per: list[dict[str, Any]] = []
    for name, res in sorted(results["dashboard"].items()):
        times = [u["t"] for u in res["updates"] if t0 <= u["t"] <= t1]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        inside = [u for u in res["updates"] if t0 <= u["t"] <= t1]
        per.append(
            {
                "name": name,
                "n": len(times),
                "rate": len(times) / (t1 - t0) if t1 > t0 else 0.0,
                "min_gap": min(gaps) if gaps else float("nan"),
                "max_gap": max(gaps) if gaps else float("nan"),
                # the longest silence, counting from t0 and up to t1
                "longest_silence": max(
                    [b - a for a, b in zip([t0, *times], [*times, t1], strict=False)]
                ),
                "with_usage": sum(1 for u in inside if u["usage_requests"]),
                "with_state": sum(1 for u in inside if u["state"]),
                "usage_requests": sum(u["usage_requests"] for u in inside),
            }
        )
    return {"clients": per}


if __name__ == "__main__":
    asyncio.run(run(json.loads(Path(sys.argv[1]).read_text())))
