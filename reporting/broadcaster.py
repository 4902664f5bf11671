"""The live-status broadcaster (SPEC §8): drains the status queue and pushes batches, per
conversation and category, to the conversation's Channels group.

A batch leaves when it holds BATCH_SIZE messages or its oldest message has waited BATCH_WINDOW.
With Redis it runs as its own process (`manage.py broadcast_status`); in the embedded default it
runs inside the one server process, where the in-process channel layer lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from reporting.services import BATCH_SIZE, BATCH_WINDOW, status_group, status_take

logger = logging.getLogger(__name__)
_TAKE = 500  # messages taken from the queue per poll
_FALLBACK_EVERY = 1.0  # seconds between looks at the database queue when Redis is the queue


class StatusBroadcaster:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.pending: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}
        self.sent_batches = 0
        self.fallback_checked = 0.0

    async def _send(
        self, conversation_id: str, category: str, messages: list[dict[str, Any]]
    ) -> None:
        await self.layer.group_send(
            status_group(conversation_id),
            {
                "type": "status.batch",
                "conversation_id": conversation_id,
                "category": category,
                "messages": messages,
            },
        )
        self.sent_batches += 1

    async def tick(self, *, flush_all: bool = False) -> int:
        """Take what is queued, send every full or due batch; returns messages taken."""
        now = time.monotonic()
        fallback = flush_all or now - self.fallback_checked >= _FALLBACK_EVERY
        if fallback:
            self.fallback_checked = now
        taken = await database_sync_to_async(status_take)(_TAKE, include_fallback=fallback)
        for item in taken:
            key = (item["conversation_id"], item["category"])
            started, messages = self.pending.get(key, (now, []))
            messages.append({"message": item["message"], "data": item["data"], "at": item["at"]})
            self.pending[key] = (started, messages)
        for key, (started, messages) in list(self.pending.items()):
            oldest = started
            while len(messages) >= BATCH_SIZE:
                await self._send(*key, messages[:BATCH_SIZE])
                del messages[:BATCH_SIZE]
                oldest = now  # what is left arrived in this tick
            if messages and (flush_all or now - oldest >= BATCH_WINDOW):
                await self._send(*key, list(messages))
                messages.clear()
            if messages:
                self.pending[key] = (oldest, messages)
            else:
                del self.pending[key]
        return len(taken)

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("status broadcaster running")
        while not stop.is_set():
            try:
                taken = await self.tick()
            except Exception:  # keep broadcasting: one bad tick must not end live status
                logger.exception("status broadcaster tick failed")
                taken = 0
            if not taken:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=BATCH_WINDOW / 4)
        await self.tick(flush_all=True)
