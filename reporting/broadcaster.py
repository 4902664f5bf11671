"""The live-status broadcaster (SPEC §8): drains the status queue and pushes batches, per
publisher scope, conversation and category, to the Channels groups of the conversation's viewers
whose scope covers the publisher's.

A batch leaves when it holds TOKENMGR_STATUS_BATCH_SIZE messages or its oldest message has waited
TOKENMGR_STATUS_BATCH_WINDOW_MS. Each sent batch is also announced to the `status.broadcasted`
group. Dashboard events (usage figures, alerts, overrides, flushes) are coalesced into the staff
dashboard stream's updates (DashboardStream).
With Redis it runs as its own process (`manage.py broadcast_status`); in the embedded default it
runs inside the one server process, where the in-process channel layer lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from django.utils import timezone

from reporting import services
from reporting.publisher import publisher
from reporting.selectors import dashboard_state
from tokenmgr_project.core import redis as tm_redis

logger = logging.getLogger(__name__)
_TAKE = 500  # messages taken from the queue per poll
_FALLBACK_EVERY = 1.0  # seconds between looks at the database queue when Redis is the queue
_STATS_EVERY = 0.25  # seconds between reads of the drop count and writes of the metrics
_LISTENERS_EVERY = 1.0  # seconds between looks at whether status.broadcasted has members
# Wait after a failed tick: doubling from _BACKOFF_FIRST, at most _BACKOFF_MAX seconds, so an
# outage costs a log line every few seconds and live status resumes soon after Redis does.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


def _poll(include_fallback: bool, with_stats: bool) -> tuple[list[dict[str, Any]], int | None]:
    """One tick's work on the database thread: take what is queued, and with `with_stats` save
    the metrics (what the previous ticks counted) and read the drop count."""
    taken = services.status_take(_TAKE, include_fallback=include_fallback)
    if not with_stats:
        return taken, None
    services.metrics_flush()
    return taken, services.status_dropped()


def _publish_all(serialize: Any, named: list[tuple[str, dict[str, Any]]]) -> None:
    """PUBLISH each message to its group's pub/sub channel, in one pipelined round trip (on
    the database thread: the client is the synchronous one)."""
    with tm_redis.client().pipeline(transaction=False) as pipe:
        for channel, message in named:
            pipe.publish(channel, serialize(message))
        pipe.execute()


def _client_message(item: dict[str, Any]) -> dict[str, Any]:
    """A queued message as the seed's client reads it (queued by an older version: "data" and
    "at" instead of "metadata" and "timestamp")."""
    message_id = item.get("id") or uuid.uuid4().hex
    return {
        "id": message_id,
        "message": item["message"],
        "metadata": item.get("metadata", item.get("data", {})),
        "timestamp": item.get("timestamp", item.get("at")),
        "agent_id": item.get("agent_id", ""),
        "correlation_id": item.get("correlation_id") or message_id,
    }


_ZERO_DAY = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": "0", "errors": 0}


class DashboardStream:
    """The staff dashboard's stream: the events taken in each tick are added up and sent as one
    coalesced update at most `TOKENMGR_LIVE_DASHBOARD_RATE` times a second, however many
    arrived. The budget bars, pending overrides and buffer (`dashboard_state`) are re-read with
    an update when something that moves them happened, at most once a second, and every
    HEARTBEAT seconds anyway (the buffer drains without events)."""

    STATE_EVERY = 1.0
    HEARTBEAT = 5.0
    MAX_EVENTS = 50  # per update; older ones of a burst are left out (and counted)

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.seq = 0
        self.days: dict[str, dict[str, Any]] = {}
        self.minutes: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.events_left_out = 0
        self.dirty = False
        self.state_wanted = True
        self.sent_at = 0.0
        self.state_at = -self.HEARTBEAT
        self.state: dict[str, Any] | None = None
        self._reading: asyncio.Future[dict[str, Any] | None] | None = None

    def add(self, item: dict[str, Any]) -> None:
        self.dirty = True
        if item.get("kind") == "usage":
            for day, delta in item.get("days", {}).items():
                into = self.days.setdefault(day, {**_ZERO_DAY})
                for name in ("requests", "input_tokens", "output_tokens", "errors"):
                    into[name] += int(delta.get(name, 0))
                into["cost"] = str(Decimal(into["cost"]) + Decimal(delta.get("cost", "0")))
            for minute, n in item.get("minutes", {}).items():
                self.minutes[minute] = self.minutes.get(minute, 0) + int(n)
            self.state_wanted = True  # budget bars move with spend
            return
        self.events.append(item)
        if item.get("kind") in ("alert", "override", "flush"):
            self.state_wanted = True
        if len(self.events) > self.MAX_EVENTS:
            self.events_left_out += len(self.events) - self.MAX_EVENTS
            del self.events[: -self.MAX_EVENTS]

    def _refresh_state(self, now: float) -> None:
        """Re-read the state on a thread of its own when due: budget_status for many budgets
        takes a while, and the status batches must not wait for it."""
        if self._reading is not None:
            if not self._reading.done():
                return
            reading, self._reading = self._reading, None
            try:
                self.state = reading.result()
            except Exception:  # the next heartbeat tries again
                logger.warning("could not read the dashboard's state", exc_info=True)
            self.dirty = self.dirty or self.state is not None
            return
        due = now - self.state_at >= self.HEARTBEAT or (
            self.state_wanted and now - self.state_at >= self.STATE_EVERY
        )
        if due:
            self.state_at, self.state_wanted = now, False
            read = database_sync_to_async(_state_if_watched, thread_sensitive=False)
            self._reading = asyncio.ensure_future(read())

    async def maybe_send(self, now: float, *, force: bool = False) -> bool:
        self._refresh_state(now)
        if force and self._reading is not None:
            await asyncio.wait([self._reading])
            self._refresh_state(now)
        if not self.dirty:
            return False
        if not force and now - self.sent_at < 1.0 / settings.TOKENMGR_LIVE_DASHBOARD_RATE:
            return False
        update: dict[str, Any] = {
            "type": "dashboard.update",
            "seq": self.seq + 1,
            "at": timezone.now().isoformat(),
            "usage": {"days": self.days, "minutes": self.minutes},
            "events": self.events,
            "events_left_out": self.events_left_out,
            "state": None,
        }
        if self.state is not None:
            update["state"], self.state = self.state, None
        await self.layer.group_send(services.DASHBOARD_GROUP, update)
        services.metrics.add("dashboard_updates")
        self.seq += 1
        self.sent_at = now
        self.days, self.minutes, self.events = {}, {}, []
        self.events_left_out = 0
        self.dirty = False
        return True


def _state_if_watched() -> dict[str, Any] | None:
    """dashboard_state, unless no dashboard socket is open anywhere (nobody would see it)."""
    connected = services.clients.total()
    if connected is not None and not connected.get("dashboard"):
        return None
    return dashboard_state()


async def group_has_members(layer: Any, group: str) -> bool:
    """Whether any channel, in any process, is in `group`: the in-memory layer's own table, or
    PUBSUB NUMSUB of the group's channel on the Redis pub/sub layer. True when it cannot tell
    (another layer, or an error): then the message is sent anyway."""
    try:
        if isinstance(layer, InMemoryChannelLayer):
            return bool(layer.groups.get(group))
        if isinstance(layer, RedisPubSubChannelLayer):
            loop_layer = layer._get_layer()
            name = loop_layer._get_group_channel_name(group)
            shard = loop_layer._get_shard(name)
            shard._ensure_redis()
            counts = await shard._redis.pubsub_numsub(name)
            return any(int(n) for _name, n in counts)
    except Exception:  # not knowing means sending, as before this check
        logger.debug("could not tell whether %s has members", group, exc_info=True)
    return True


class StatusBroadcaster:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        # (team_id, project_id, conversation_id, category) → (oldest message's time, messages):
        # two scopes' messages for one conversation id never share a batch.
        self.pending: dict[tuple[str, str, str, str], tuple[float, list[dict[str, Any]]]] = {}
        self.sent_batches = 0
        self.fallback_checked = 0.0
        self.metrics_saved = 0.0
        self.dropped: int | None = 0
        self.dashboard = DashboardStream(self.layer)
        self._listeners_checked = -_LISTENERS_EVERY
        self._listened = True
        self.outbox: list[tuple[str, dict[str, Any]]] = []

    async def _send(
        self,
        team_id: str,
        project_id: str,
        conversation_id: str,
        category: str,
        messages: list[dict[str, Any]],
    ) -> None:
        batch = {
            "type": "status.batch",
            "conversation_id": conversation_id,
            "team_id": team_id,
            "project_id": project_id,
            "category": category,
            "messages": messages,
            "count": len(messages),
            "timestamp": timezone.now().isoformat(),
            "batch_id": secrets.token_urlsafe(8),
            "dropped": self.dropped,  # by the server so far (queue overflow), all feeds
        }
        groups = services.status_viewer_groups(
            conversation_id, team_id=team_id, project_id=project_id
        )
        outbox: list[tuple[str, dict[str, Any]]] = [(group, batch) for group in groups]
        # Then for code inside the project that listens (the seed's status.broadcasted); not
        # sent while nothing listens (a fifth of the broadcaster's time went to that).
        if await self._announcements_heard():
            announcement: dict[str, Any] = {
                "type": "status.broadcasted",
                "conversation_id": conversation_id,
                "category": category,
                "team_id": team_id,
                "project_id": project_id,
                "payload": batch,
            }
            outbox.append((services.BROADCASTED_GROUP, announcement))
        self.outbox.extend(outbox)
        self.sent_batches += 1
        services.metrics.add("batches_sent")
        services.metrics.add("broadcasts", len(outbox))

    async def _deliver(self) -> None:
        """Send what this tick's batches put in the outbox, in order. On Redis pub/sub: every
        PUBLISH in one pipelined round trip (a group_send each cost ~0.4 ms of the
        broadcaster's CPU, mostly redis-py's per-command overhead); else group_send each."""
        if not self.outbox:
            return
        if isinstance(self.layer, RedisPubSubChannelLayer):
            loop_layer = self.layer._get_layer()
            named = [(loop_layer._get_group_channel_name(g), m) for g, m in self.outbox]
            # On a Redis error the outbox stays, and the next tick (after its backoff) sends
            # it again: a feed may see a batch twice then, never miss one.
            await database_sync_to_async(_publish_all)(self.layer.serialize, named)
            self.outbox = []
            return
        while self.outbox:
            group, message = self.outbox[0]
            await self.layer.group_send(group, message)
            self.outbox.pop(0)

    async def _announcements_heard(self) -> bool:
        """Whether anything is in the status.broadcasted group (asked at most once a second)."""
        now = time.monotonic()
        if now - self._listeners_checked >= _LISTENERS_EVERY:
            self._listeners_checked = now
            self._listened = await group_has_members(self.layer, services.BROADCASTED_GROUP)
        return self._listened

    async def tick(self, *, flush_all: bool = False) -> int:
        """Take what is queued, send every full or due batch and a due dashboard update;
        returns messages and events taken."""
        now = time.monotonic()
        fallback = flush_all or now - self.fallback_checked >= _FALLBACK_EVERY
        if fallback:
            self.fallback_checked = now
        local, dropped_here = publisher.take() if publisher.taken_locally else ([], 0)
        services.local_drops.add(dropped_here)
        # The drop count and the metrics go with the take, a few times a second: one hop to
        # the database thread per tick, not three (they were a third of the broadcaster's time).
        stats_due = flush_all or self.dropped is None or now - self.metrics_saved >= _STATS_EVERY
        if stats_due:
            self.metrics_saved = now
        queued, dropped = await database_sync_to_async(_poll)(fallback, stats_due)
        taken = local + queued
        if stats_due:
            self.dropped = dropped
        size, window = services.batch_size(), services.batch_window()
        processed = 0
        for item in taken:
            if item.get("stream") == services.DASHBOARD:
                self.dashboard.add(item)
                continue
            processed += 1
            # Messages queued before they carried a scope count as organisation-wide.
            scope = (item.get("team_id", ""), item.get("project_id", ""))
            key = (*scope, item["conversation_id"], item["category"])
            started, messages = self.pending.get(key, (now, []))
            messages.append(_client_message(item))
            self.pending[key] = (started, messages)
        services.metrics.add("processed", processed)
        due: list[tuple[tuple[str, str, str, str], list[list[dict[str, Any]]]]] = []
        for key, (started, messages) in list(self.pending.items()):
            oldest = started
            batches = []
            while len(messages) >= size:
                batches.append(messages[:size])
                del messages[:size]
                oldest = now  # what is left arrived in this tick
            if messages and (flush_all or now - oldest >= window):
                batches.append(list(messages))
                messages.clear()
            if batches:
                due.append((key, batches))
            if messages:
                self.pending[key] = (oldest, messages)
            else:
                del self.pending[key]
        for key, batches in due:
            for messages in batches:  # in order: one feed's batches never overtake each other
                await self._send(*key, messages)
        await self._deliver()
        await self.dashboard.maybe_send(now, force=flush_all)
        if flush_all:
            await database_sync_to_async(services.metrics_flush)()
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
                await _wait(stop, services.batch_window() / 4)
        try:
            await self.tick(flush_all=True)
        except Exception:  # stopping anyway: what could not be sent is lost with the process
            logger.exception("status broadcaster could not send its last batches")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
