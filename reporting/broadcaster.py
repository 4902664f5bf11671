"""The live-status broadcaster (SPEC §8): drains the status queue and pushes batches, per
publisher scope, conversation and category, to the Channels groups of the conversation's viewers
whose scope covers the publisher's.

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

from reporting.services import BATCH_SIZE, BATCH_WINDOW, status_take, status_viewer_groups

logger = logging.getLogger(__name__)
_TAKE = 500  # messages taken from the queue per poll
_FALLBACK_EVERY = 1.0  # seconds between looks at the database queue when Redis is the queue
# Wait after a failed tick: doubling from _BACKOFF_FIRST, at most _BACKOFF_MAX seconds, so an
# outage costs a log line every few seconds and live status resumes soon after Redis does.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


class StatusBroadcaster:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        # (team_id, project_id, conversation_id, category) → (oldest message's time, messages):
        # two scopes' messages for one conversation id never share a batch.
        self.pending: dict[tuple[str, str, str, str], tuple[float, list[dict[str, Any]]]] = {}
        self.sent_batches = 0
        self.fallback_checked = 0.0

    async def _send(
        self,
        team_id: str,
        project_id: str,
        conversation_id: str,
        category: str,
        messages: list[dict[str, Any]],
    ) -> None:
        event = {
            "type": "status.batch",
            "conversation_id": conversation_id,
            "team_id": team_id,
            "project_id": project_id,
            "category": category,
            "messages": messages,
        }
        for group in status_viewer_groups(conversation_id, team_id=team_id, project_id=project_id):
            await self.layer.group_send(group, event)
        self.sent_batches += 1

    async def tick(self, *, flush_all: bool = False) -> int:
        """Take what is queued, send every full or due batch; returns messages taken."""
        now = time.monotonic()
        fallback = flush_all or now - self.fallback_checked >= _FALLBACK_EVERY
        if fallback:
            self.fallback_checked = now
        taken = await database_sync_to_async(status_take)(_TAKE, include_fallback=fallback)
        for item in taken:
            # Messages queued before they carried a scope count as organisation-wide.
            scope = (item.get("team_id", ""), item.get("project_id", ""))
            key = (*scope, item["conversation_id"], item["category"])
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
        """Broadcast until `stop` is set. Never ends on an error: while Redis (the queue or the
        channel layer) is down, each failed tick waits longer, up to _BACKOFF_MAX seconds, and
        the batches not yet sent stay pending for the next try."""
        logger.info("status broadcaster running")
        failures = 0
        while not stop.is_set():
            try:
                taken = await self.tick()
            except Exception as exc:  # keep broadcasting: Redis comes back, live status must too
                failures += 1
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (failures - 1))
                if failures == 1:
                    logger.exception("status broadcaster tick failed; retrying with backoff")
                else:
                    logger.warning(
                        "status broadcaster still failing (%d in a row: %r); next try in %.1f s",
                        failures,
                        exc,
                        delay,
                    )
                await _wait(stop, delay)
                continue
            if failures:
                logger.warning("status broadcaster recovered after %d failed ticks", failures)
                failures = 0
            if not taken:
                await _wait(stop, BATCH_WINDOW / 4)
        try:
            await self.tick(flush_all=True)
        except Exception:  # stopping anyway: what could not be sent is lost with the process
            logger.exception("status broadcaster could not send its last batches")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
