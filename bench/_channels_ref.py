"""The reference bench/live_status.py is judged beside: channels_redis alone (no Django, no
uvicorn, no websocket), the hop from the broadcaster to a server process, on the same Redis.

    python bench/_channels_ref.py REDIS_URL BATCHES_PER_S GROUPS MSGS_PER_BATCH SECONDS OUT.json [C]

A receiver process adds one channel to each of GROUPS groups (as each websocket consumer does)
and awaits layer.receive() on all of them; this process group_sends batch-shaped payloads
(MSGS_PER_BATCH messages shaped like the broadcaster's) at BATCHES_PER_S, paced, to the groups
in turn, each followed by a group_send to a group nobody is in (the broadcaster's
`status.broadcasted`). C (default 1) batches may be in flight at once: 1 is the broadcaster's
way (each batch's group_sends awaited before the next), more shows what concurrent sends would
reach. Latency per batch: the payload's send time -> received. Writes {"sent", "received",
"rate", "lat_ms": [...]} to OUT.json.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import secrets
import sys
import time
from typing import Any

PREFIX = "benchref"


def _layer(url: str) -> Any:
    # The layer tokenmgr runs on (settings.CHANNEL_LAYERS): Redis pub/sub.
    from channels_redis.pubsub import RedisPubSubChannelLayer

    return RedisPubSubChannelLayer(hosts=[url], prefix=PREFIX)


def _payload(i: int, group: str, msgs: int) -> dict[str, Any]:
    now = time.time()
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + "+00:00"
    return {
        "type": "status.batch",
        "conversation_id": group,
        "team_id": "",
        "project_id": "",
        "category": "progress",
        "messages": [
            {
                "id": secrets.token_hex(16),
                "message": f"bench r {int(now * 1e6)} 1-{i}-{k}",
                "metadata": {"step": i},
                "timestamp": iso,
                "agent_id": "",
                "correlation_id": secrets.token_hex(16),
            }
            for k in range(msgs)
        ],
        "count": msgs,
        "timestamp": iso,
        "batch_id": secrets.token_urlsafe(8),
        "dropped": 0,
        "sent_at": now,
    }


def _receiver(url: str, groups: int, ready: Any, stop: Any, out: Any) -> None:
    async def main() -> None:
        layer = _layer(url)
        lat: list[float] = []

        async def one(channel: str) -> None:
            while True:
                msg = await layer.receive(channel)
                lat.append((time.time() - msg["sent_at"]) * 1000)

        channels = [await layer.new_channel() for _ in range(groups)]
        for i, channel in enumerate(channels):
            await layer.group_add(f"ref{i}", channel)
        tasks = [asyncio.create_task(one(c)) for c in channels]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last ones in flight
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put(lat)

    asyncio.run(main())


async def _send(
    url: str, rate: float, groups: int, msgs: int, *, seconds: float, concurrency: int
) -> tuple[int, float]:
    layer = _layer(url)
    n = int(rate * seconds)
    in_flight = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            group = f"ref{i % groups}"
            payload = _payload(i, group, msgs)
            await layer.group_send(group, payload)
            await layer.group_send("ref.nobody", {"type": "status.broadcasted", "payload": payload})
        finally:
            in_flight.release()

    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await in_flight.acquire()
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return n, time.perf_counter() - t0


def main(argv: list[str]) -> None:
    url, rate, groups, msgs, seconds, out_path = (
        argv[0],
        float(argv[1]),
        int(argv[2]),
        int(argv[3]),
        float(argv[4]),
        argv[5],
    )
    concurrency = int(argv[6]) if len(argv) > 6 else 1
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(url, groups, ready, stop, out), daemon=True)
    proc.start()
    if not ready.wait(60):
        raise SystemExit("reference receiver did not start")
    sent, wall = asyncio.run(
        _send(url, rate, groups, msgs, seconds=seconds, concurrency=concurrency)
    )
    stop.set()
    lat = out.get(timeout=60)
    proc.join(10)
    with open(out_path, "w") as f:
        json.dump(
            {
                "sent": sent,
                "asked": rate,
                "concurrency": concurrency,
                "received": len(lat),
                "rate": sent / wall,
                "lat_ms": lat,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
