"""Writes of the reporting app: publishing live status messages (SPEC §8)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from budgets import deliveries
from budgets.models import AlertChannel
from reporting.models import QueuedStatus, StatusCategory
from tokenmgr_project.core import redis as tm_redis

logger = logging.getLogger(__name__)

# Bounds of a status message (POST /status and the project's own events).
MESSAGE_MAX_BYTES = 4096
METADATA_MAX_BYTES = 16 * 1024
# The dashboard stream's events have a list of their own, so a flood of status messages never
# pushes out the figures the dashboard adds up.
STATUS, DASHBOARD = "status", "dashboard"
BROADCASTED_GROUP = "status.broadcasted"  # every sent batch, for listeners inside the project
DASHBOARD_GROUP = "live.dashboard"  # the staff dashboard stream's sockets

# LPUSH each message, then trim from the old end and count what fell off (plus what the
# publishing process already dropped, ARGV[2]), in one step.
_PUSH = r"""
local limit = tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('LPUSH', KEYS[1], ARGV[i]) end
local over = redis.call('LLEN', KEYS[1]) - limit
if over > 0 then
  redis.call('LTRIM', KEYS[1], 0, limit - 1)
else
  over = 0
end
local dropped = over + tonumber(ARGV[2])
if dropped > 0 then redis.call('INCRBY', KEYS[2], dropped) end
return over
"""
_PUSH_CHUNK = 500


def batch_size() -> int:
    return int(settings.TOKENMGR_STATUS_BATCH_SIZE)


def batch_window() -> float:
    """Seconds a message may wait for its batch to fill."""
    return float(settings.TOKENMGR_STATUS_BATCH_WINDOW_MS) / 1000


def queue_limit() -> int:
    return int(settings.TOKENMGR_STATUS_QUEUE_LIMIT)


def queue_key(stream: str = STATUS) -> str:
    return tm_redis.key("status", "queue") if stream == STATUS else tm_redis.key("live", "queue")


def dropped_key() -> str:
    return tm_redis.key("status", "dropped")


def metrics_key() -> str:
    return tm_redis.key("status", "metrics")


def clients_key() -> str:
    return tm_redis.key("status", "clients")


def status_group(conversation_id: str, *, team_id: str, project_id: str) -> str:
    """The Channels group of a conversation's viewers whose scope is this team/project ("" for
    none: global keys and staff are ("", "")). Group names allow only a few ASCII characters."""
    raw = "\x1f".join((team_id, project_id, conversation_id))
    return "status." + hashlib.sha1(raw.encode()).hexdigest()


def status_viewer_groups(conversation_id: str, *, team_id: str, project_id: str) -> list[str]:
    """Every viewer group that may see a message published in this team/project scope: the
    viewers of the same scope, of its team, of its project and global ones (the rule of
    Principal.covers), so one conversation id used by two projects never merges their feeds."""
    scopes = {("", ""), (team_id, ""), ("", project_id), (team_id, project_id)}
    return [status_group(conversation_id, team_id=t, project_id=p) for t, p in sorted(scopes)]


class BroadcastMetrics:
    """What the broadcaster did (the seed's metrics). The embedded broadcaster keeps them here,
    in the server process that also answers /health; with Redis the broadcaster process adds
    them to a Redis hash after each tick (see `metrics_flush`)."""

    # Drops are counted where they happen (the queue's script, local_drops), not here.
    FIELDS = ("processed", "batches_sent", "broadcasts", "dashboard_updates")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.FIELDS, 0)
        self.unsaved = dict.fromkeys(self.FIELDS, 0)
        self.seen_at: str | None = None

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.totals[name] += n
                self.unsaved[name] += n

    def take_unsaved(self) -> dict[str, int]:
        with self._lock:
            unsaved = {k: v for k, v in self.unsaved.items() if v}
            self.unsaved = dict.fromkeys(self.FIELDS, 0)
        return unsaved


metrics = BroadcastMetrics()


def metrics_flush() -> None:
    """With Redis: add what this process's broadcaster counted since the last call to the
    shared hash, and note that it is alive. Raises the Redis error (the broadcaster backs off)."""
    metrics.seen_at = timezone.now().isoformat()
    if not tm_redis.configured():
        return
    unsaved = metrics.take_unsaved()
    try:
        with tm_redis.client().pipeline(transaction=False) as pipe:
            for name, n in unsaved.items():
                pipe.hincrby(metrics_key(), name, n)
            pipe.hset(metrics_key(), "seen_at", metrics.seen_at)
            pipe.execute()
    except tm_redis.REDIS_ERRORS:
        for name, n in unsaved.items():  # counted again with the next flush
            metrics.unsaved[name] += n
        raise


class ConnectedClients:
    """Open live-status sockets, per kind ("status", "dashboard"). Each server process counts
    its own; with Redis it writes its counts to a shared hash (field per process) with the time
    it last did, refreshed every REFRESH seconds while it has clients, and /health adds up the
    processes seen within STALE seconds (a crashed server's sockets are gone with it)."""

    REFRESH = 10.0
    STALE = 35.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"status": 0, "dashboard": 0}
        self._refresher: threading.Thread | None = None
        self._pid = 0

    def change(self, kind: str, delta: int) -> None:
        with self._lock:
            self.counts[kind] = max(0, self.counts[kind] + delta)
        if tm_redis.configured():
            self._ensure_refresher()
            self.write()

    def write(self) -> None:
        me = f"{socket.gethostname()}:{os.getpid()}"
        with self._lock:
            value = json.dumps({**self.counts, "at": time.time()})
        try:
            tm_redis.client().hset(clients_key(), me, value)
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; connected-client count not shared")

    def _ensure_refresher(self) -> None:
        if self._refresher is not None and self._pid == os.getpid():
            return
        self._pid = os.getpid()

        def refresh() -> None:
            while True:
                time.sleep(self.REFRESH)
                if any(self.counts.values()):
                    self.write()

        self._refresher = threading.Thread(target=refresh, name="live-clients", daemon=True)
        self._refresher.start()

    def total(self) -> dict[str, int] | None:
        if not tm_redis.configured():
            return dict(self.counts)
        try:
            raw: dict[bytes, bytes] = tm_redis.client().hgetall(clients_key())  # type: ignore[assignment]
        except tm_redis.REDIS_ERRORS:
            return None
        out = {"status": 0, "dashboard": 0}
        now = time.time()
        for field, value in raw.items():
            entry = json.loads(value)
            if now - float(entry.get("at", 0)) > self.STALE:
                tm_redis.client().hdel(clients_key(), field)  # that process is gone
                continue
            for kind in out:
                out[kind] += int(entry.get(kind, 0))
        return out


clients = ConnectedClients()


def status_message(
    *,
    conversation_id: str,
    category: str,
    message: str,
    team_id: str,
    project_id: str,
    metadata: dict[str, Any] | None = None,
    agent_id: str = "",
    correlation_id: str = "",
) -> dict[str, Any]:
    """One status message as it travels to the broadcaster (the seed's fields, plus the scope
    it belongs to)."""
    message_id = uuid.uuid4().hex
    return {
        "stream": STATUS,
        "id": message_id,
        "conversation_id": conversation_id,
        "team_id": team_id,
        "project_id": project_id,
        "category": StatusCategory(category).value,
        "message": message,
        "metadata": metadata or {},
        "agent_id": agent_id,
        "correlation_id": correlation_id or message_id,
        "timestamp": timezone.now().isoformat(),
    }


class _LocalDrops:
    """Drops counted by the embedded broadcaster, which runs in the server process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


local_drops = _LocalDrops()


def status_publish(
    *,
    conversation_id: str,
    category: str,
    message: str,
    team_id: str,
    project_id: str,
    metadata: dict[str, Any] | None = None,
    agent_id: str = "",
    correlation_id: str = "",
) -> None:
    """Queue one status message for the broadcaster, now (POST /status answers 202 once it is
    queued). Never waits on a slow consumer: the queue is bounded and drops its oldest
    messages, counting them. The project's own events use `reporting.publisher` instead, which
    does not even wait for the queue.

    `team_id`/`project_id` are the scope of whoever publishes (or of the usage or budget the
    message is about; "" and "" for organisation-wide): only viewers whose scope covers it
    receive the message.
    """
    status_push_many(
        [
            status_message(
                conversation_id=conversation_id,
                category=category,
                message=message,
                team_id=team_id,
                project_id=project_id,
                metadata=metadata,
                agent_id=agent_id,
                correlation_id=correlation_id,
            )
        ]
    )


def status_push_many(payloads: list[dict[str, Any]], *, dropped_before: int = 0) -> None:
    """Append payloads (status messages and dashboard events, told apart by "stream") to the
    shared queue: Redis lists when Redis is reachable, else the database table the broadcaster
    also reads. `dropped_before`: messages the publishing process already dropped (counted)."""
    if not payloads and not dropped_before:
        return
    if tm_redis.available():
        try:
            status_push_redis(payloads, dropped_before=dropped_before)
            return
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; status messages queued in the database")
            tm_redis.trip()
    local_drops.add(dropped_before)
    QueuedStatus.objects.bulk_create([QueuedStatus(payload=payload) for payload in payloads])


def status_push_redis(payloads: list[dict[str, Any]], *, dropped_before: int = 0) -> None:
    """The Redis half of status_push_many: raises the Redis error instead of falling back."""
    by_stream: dict[str, list[str]] = {STATUS: [], DASHBOARD: []}
    for payload in payloads:
        by_stream[payload.get("stream", STATUS)].append(json.dumps(payload))
    for stream, lines in by_stream.items():
        extra = dropped_before if stream == STATUS else 0
        for start in range(0, max(len(lines), 1 if extra else 0), _PUSH_CHUNK):
            tm_redis.run_script(
                _PUSH,
                [queue_key(stream), dropped_key()],
                [queue_limit(), extra, *lines[start : start + _PUSH_CHUNK]],
            )
            extra = 0


def status_take(limit: int, *, include_fallback: bool = True) -> list[dict[str, Any]]:
    """Remove and return up to `limit` queued status messages and up to `limit` dashboard
    events, oldest first.

    With Redis, messages queued in the database while Redis was unreachable are taken too when
    `include_fallback` (the broadcaster asks about once a second).
    """
    if not tm_redis.configured():
        return _take_from_database(limit)
    # The database's messages are removed only if taking Redis's works too: a failed RPOP
    # rolls the deletion back instead of losing them.
    with transaction.atomic():
        taken = _take_from_database(limit) if include_fallback else []
        with tm_redis.client().pipeline(transaction=False) as pipe:
            pipe.rpop(queue_key(STATUS), limit)
            pipe.rpop(queue_key(DASHBOARD), limit)
            raw_status, raw_dashboard = pipe.execute()
    return (
        taken
        + [json.loads(item) for item in raw_status or []]
        + [json.loads(item) for item in raw_dashboard or []]
    )


def _take_from_database(limit: int) -> list[dict[str, Any]]:
    excess = QueuedStatus.objects.count() - queue_limit()
    if excess > 0:
        # Keep the newest queue_limit(): the oldest fall off, as with the Redis list.
        cutoff = QueuedStatus.objects.order_by("pk").values_list("pk", flat=True)[excess - 1]
        local_drops.add(QueuedStatus.objects.filter(pk__lte=cutoff).delete()[0])
    rows = list(QueuedStatus.objects.order_by("pk").values_list("pk", "payload")[:limit])
    if rows:
        QueuedStatus.objects.filter(pk__lte=rows[-1][0]).delete()
    return [payload for _pk, payload in rows]


def status_dropped() -> int | None:
    """Messages dropped so far (queue overflow), None while Redis is unreachable."""
    if not tm_redis.configured():
        return local_drops.count
    try:
        raw: Any = tm_redis.client().get(dropped_key())
        return int(raw or 0)
    except tm_redis.REDIS_ERRORS:
        return None


def status_queue_stats() -> dict[str, Any]:
    """The /health probe "status_messages": queued and dropped messages (None for what an
    unreachable Redis holds), the broadcaster's metrics, connected sockets and the settings."""
    in_database = QueuedStatus.objects.count()
    body: dict[str, Any] = {
        "queued": in_database,
        "dropped": local_drops.count,
        **{name: metrics.totals[name] for name in BroadcastMetrics.FIELDS},
        "broadcaster_seen_at": metrics.seen_at,
        "connected_clients": clients.total(),
        "batch_size": batch_size(),
        "batch_window_ms": settings.TOKENMGR_STATUS_BATCH_WINDOW_MS,
        "queue_limit": queue_limit(),
    }
    if not tm_redis.configured():
        return body
    try:
        client = tm_redis.client()
        with client.pipeline(transaction=False) as pipe:
            pipe.llen(queue_key(STATUS))
            pipe.llen(queue_key(DASHBOARD))
            pipe.get(dropped_key())
            pipe.hgetall(metrics_key())
            depth, dashboard_depth, dropped, shared = pipe.execute()
    except tm_redis.REDIS_ERRORS:
        body.update(queued=None, dropped=None, broadcaster_seen_at=None)
        return body
    shared = {k.decode(): v.decode() for k, v in shared.items()}
    body.update(
        queued=int(depth) + int(dashboard_depth) + in_database,
        dropped=int(dropped or 0),
        broadcaster_seen_at=shared.get("seen_at"),
        **{name: int(shared.get(name, 0)) for name in BroadcastMetrics.FIELDS},
    )
    return body


def alert_status_send(channel: AlertChannel, notice: deliveries.Notice) -> None:
    """A budget alert or an anomaly on the live status feed (a `status` alert channel;
    budgets.deliveries calls it). In the notice's scope: a team budget's alert reaches the team's
    viewers only."""
    status_publish(
        conversation_id=channel.target,
        category=(
            StatusCategory.BUDGET if notice.kind == "budget_alert" else StatusCategory.ANALYSIS
        ),
        message=notice.message,
        metadata=notice.payload,
        team_id=notice.team_id,
        project_id=notice.project_id,
    )
