"""Writes of the reporting app: publishing live status messages (SPEC §8)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from django.db import transaction
from django.utils import timezone

from budgets import deliveries
from budgets.models import AlertChannel, BudgetAlert
from reporting.models import QueuedStatus, StatusCategory
from tokenmgr_project.core import redis as tm_redis

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 1000  # messages waiting; beyond this the oldest are dropped and counted
BATCH_SIZE = 50  # messages per pushed batch
BATCH_WINDOW = 0.1  # seconds a message may wait for its batch to fill

# LPUSH, then trim from the old end and count what fell off, in one step.
_PUSH = r"""
redis.call('LPUSH', KEYS[1], ARGV[1])
local over = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
  redis.call('INCRBY', KEYS[2], over)
end
return over
"""


def queue_key() -> str:
    return tm_redis.key("status", "queue")


def dropped_key() -> str:
    return tm_redis.key("status", "dropped")


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
    data: dict[str, Any] | None = None,
) -> None:
    """Queue one status message for the broadcaster. Never blocks on a slow consumer: the queue
    is bounded and drops its oldest messages, counting them.

    `team_id`/`project_id` are the scope of whoever publishes (or of the usage or budget the
    message is about; "" and "" for organisation-wide): only viewers whose scope covers it
    receive the message.
    """
    payload = {
        "conversation_id": conversation_id,
        "team_id": team_id,
        "project_id": project_id,
        "category": StatusCategory(category).value,
        "message": message,
        "data": data or {},
        "at": timezone.now().isoformat(),
    }
    if tm_redis.available():
        try:
            tm_redis.run_script(
                _PUSH, [queue_key(), dropped_key()], [json.dumps(payload), QUEUE_LIMIT]
            )
            return
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; status message queued in the database")
            tm_redis.trip()
    QueuedStatus.objects.create(payload=payload)


def status_take(limit: int, *, include_fallback: bool = True) -> list[dict[str, Any]]:
    """Remove and return up to `limit` queued messages, oldest first.

    With Redis, messages queued in the database while Redis was unreachable are taken too when
    `include_fallback` (the broadcaster asks about once a second).
    """
    if not tm_redis.configured():
        return _take_from_database(limit)
    # The database's messages are removed only if taking Redis's works too: a failed RPOP
    # rolls the deletion back instead of losing them.
    with transaction.atomic():
        taken = _take_from_database(limit) if include_fallback else []
        raw: Any = tm_redis.client().rpop(queue_key(), limit)
    return taken + [json.loads(item) for item in raw or []]


def _take_from_database(limit: int) -> list[dict[str, Any]]:
    excess = QueuedStatus.objects.count() - QUEUE_LIMIT
    if excess > 0:
        # Keep the newest QUEUE_LIMIT: the oldest fall off, as with the Redis list.
        cutoff = QueuedStatus.objects.order_by("pk").values_list("pk", flat=True)[excess - 1]
        local_drops.add(QueuedStatus.objects.filter(pk__lte=cutoff).delete()[0])
    rows = list(QueuedStatus.objects.order_by("pk").values_list("pk", "payload")[:limit])
    if rows:
        QueuedStatus.objects.filter(pk__lte=rows[-1][0]).delete()
    return [payload for _pk, payload in rows]


def status_queue_stats() -> dict[str, int | None]:
    """Queued and dropped status messages; None for what an unreachable Redis holds."""
    in_database = QueuedStatus.objects.count()
    if not tm_redis.configured():
        return {"queued": in_database, "dropped": local_drops.count}
    try:
        client = tm_redis.client()
        depth, dropped = client.llen(queue_key()), client.get(dropped_key())
    except tm_redis.REDIS_ERRORS:
        return {"queued": None, "dropped": None}
    return {"queued": int(depth) + in_database, "dropped": int(dropped or 0)}


def alert_status_send(channel: AlertChannel, alert: BudgetAlert) -> None:
    """A budget alert on the live status feed (a `status` alert channel; budgets.deliveries
    calls it). In the budget's scope: a team budget's alert reaches the team's viewers only."""
    status_publish(
        conversation_id=channel.target,
        category=StatusCategory.BUDGET,
        message=alert.message,
        data=deliveries.alert_payload(alert),
        team_id=alert.budget.team_id,
        project_id=alert.budget.project_id,
    )
