"""The project's own events onto the live feeds, without making the caller wait (issue 10).

Ingestion, the flush, alert evaluation and override decisions hand their news to the process's
`publisher`: an append to a bounded in-process list, nothing more. A daemon thread then turns
what piled up into status messages and dashboard events and pushes them to the shared queue in
one round trip (`services.status_push_many`). Stored usage is handed over as its ledger rows and
only summed up on that thread, so the request that stored it pays for a list append.

In the server process of the embedded default the broadcaster runs in the same process, and
takes from here directly (`take`) instead of through the database.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.utils import timezone

from reporting import services
from reporting.models import StatusCategory
from usage import pricing
from usage.rows import ROW_INDEX, Row

logger = logging.getLogger(__name__)

_GATHER = 0.02  # seconds the thread waits after a wake-up, so one push carries a burst
_MAX_USAGE_BATCHES = 10_000  # stored-usage hand-overs waiting (each one list of rows)
_REQUEST_IDS_SHOWN = 20  # per usage message: the first request ids, for links

_I = ROW_INDEX
_REQUEST, _OCCURRED, _PROVIDER, _MODEL = (
    _I["request_id"],
    _I["occurred_at"],
    _I["provider"],
    _I["model"],
)
_IN, _OUT, _COST = _I["input_tokens"], _I["output_tokens"], _I["cost"]
_TEAM, _PROJECT, _CONVERSATION = _I["team_id"], _I["project_id"], _I["conversation_id"]
_AGENT, _STATUS, _UNPRICED = _I["agent"], _I["status"], _I["unpriced"]


class Publisher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[dict[str, Any]] = deque()
        self._usage: deque[Sequence[Row]] = deque()
        self.dropped = 0  # messages this process dropped before they reached the queue
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        # True in the process whose broadcaster takes from here (embedded default).
        self.taken_locally = False

    # --- hand-overs (any thread; never block) ---------------------------------------------

    def status(self, **fields: Any) -> None:
        """A status message (the arguments of services.status_message)."""
        self._add(services.status_message(**fields))

    def dashboard(self, kind: str, **data: Any) -> None:
        """An event for the staff dashboard stream (alert, override, flush, …)."""
        self._add({"stream": services.DASHBOARD, "kind": kind, "at": _now(), **data})

    def usage(self, rows: Sequence[Row]) -> None:
        """New ledger rows (buffered or committed): summed up later, on the thread."""
        with self._lock:
            if len(self._usage) >= _MAX_USAGE_BATCHES:
                self._usage.popleft()
                self.dropped += 1
            self._usage.append(rows)
        self._kick()

    def _add(self, item: dict[str, Any]) -> None:
        with self._lock:
            if len(self._items) >= services.queue_limit():
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
        self._kick()

    def _kick(self) -> None:
        if self.taken_locally:
            return  # the broadcaster in this process polls `take`
        if self._thread is None or self._pid != os.getpid():
            self._start()
        self._wake.set()

    # --- delivery ------------------------------------------------------------------------------

    def take(self) -> tuple[list[dict[str, Any]], int]:
        """Everything waiting, as queue payloads (usage summed up), and the drops since the last
        take."""
        with self._lock:
            items, self._items = list(self._items), deque()
            usage, self._usage = list(self._usage), deque()
            dropped, self.dropped = self.dropped, 0
        if usage:
            items.extend(usage_payloads([row for rows in usage for row in rows]))
        return items, dropped

    def discard(self) -> None:
        """Forget everything waiting (tests: what an earlier test published)."""
        with self._lock:
            self._items.clear()
            self._usage.clear()
            self.dropped = 0

    def flush(self) -> None:
        """Push everything waiting now, on the calling thread (tests, process exit)."""
        items, dropped = self.take()
        services.status_push_many(items, dropped_before=dropped)

    def _start(self) -> None:
        self._pid = os.getpid()  # also after a fork (Celery's pool): a thread of this process
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(_GATHER)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # live status must never take its process down
                logger.warning("could not publish live status events", exc_info=True)


publisher = Publisher()


def _flush_at_exit() -> None:
    if publisher.taken_locally:
        return
    try:
        publisher.flush()
    except Exception:  # exiting anyway; what could not be pushed is lost with the process
        logger.warning("live status events lost at exit", exc_info=True)


atexit.register(_flush_at_exit)


def _now() -> str:
    return timezone.now().isoformat()


def _minute(value: datetime) -> str:
    return value.astimezone(timezone.get_current_timezone()).strftime("%Y-%m-%dT%H:%M")


def _day(value: datetime) -> str:
    return value.astimezone(timezone.get_current_timezone()).date().isoformat()


_DAY_FIELDS = ("requests", "input_tokens", "output_tokens", "cost", "errors")


def usage_figures(rows: Sequence[Row]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Rows' totals per local day ({"requests", "input_tokens", "output_tokens", "cost" (a
    Decimal), "errors"}) and requests per local minute ("2026-12-01T14:03"): what the dashboard
    adds to its figures, for new rows and for the buffer's on first load."""
    # Summed per minute first (an integer per row), named and rolled up into days after: a
    # time-zone conversion and two strftime per row cost ~5 µs, a thousand-row batch 5 ms.
    by_minute: dict[int, list[Any]] = {}
    for row in rows:
        bucket = int(row[_OCCURRED].timestamp()) // 60
        sums = by_minute.get(bucket)
        if sums is None:
            sums = by_minute[bucket] = [0, 0, 0, Decimal(0), 0, row[_OCCURRED]]
        sums[0] += 1
        sums[1] += row[_IN]
        sums[2] += row[_OUT]
        sums[3] += row[_COST] or 0
        sums[4] += row[_STATUS] == "error"
    days: dict[str, dict[str, Any]] = {}
    minutes: dict[str, int] = {}
    for sums in by_minute.values():
        minutes[_minute(sums[5])] = sums[0]
        day = days.setdefault(_day(sums[5]), dict.fromkeys(_DAY_FIELDS, 0))
        for name, value in zip(_DAY_FIELDS, sums, strict=False):
            day[name] += value
    return days, minutes


def usage_payloads(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Stored rows as one dashboard event (usage_figures, for the dashboard to add to its
    figures) and one `usage` message per conversation and scope that had any."""
    if not rows:
        return []
    days, minutes = usage_figures(rows)
    conversations: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row[_CONVERSATION]:
            key = (row[_TEAM], row[_PROJECT], row[_CONVERSATION])
            conversations.setdefault(key, []).append(row)
    out: list[dict[str, Any]] = [
        {
            "stream": services.DASHBOARD,
            "kind": "usage",
            "at": _now(),
            "days": {d: {**v, "cost": str(v["cost"])} for d, v in days.items()},
            "minutes": minutes,
        }
    ]
    for (team_id, project_id, conversation_id), group in conversations.items():
        out.append(
            services.status_message(
                conversation_id=conversation_id,
                category=StatusCategory.USAGE,
                message=_usage_text(group),
                team_id=team_id,
                project_id=project_id,
                metadata=_usage_metadata(group),
                agent_id=group[0][_AGENT] if len(group) == 1 else "",
                correlation_id=group[0][_REQUEST] if len(group) == 1 else "",
            )
        )
    return out


def _cost(rows: Sequence[Row]) -> Decimal:
    return sum((row[_COST] or Decimal(0) for row in rows), Decimal(0))


def _usage_text(rows: Sequence[Row]) -> str:
    tokens = sum(row[_IN] + row[_OUT] for row in rows)
    if len(rows) == 1:
        row = rows[0]
        price = "unpriced" if row[_UNPRICED] else f"${pricing.money(_cost(rows))}"
        return f"{row[_MODEL]}: {row[_IN]:,} in / {row[_OUT]:,} out tokens, {price}"
    return f"{len(rows)} requests recorded: {tokens:,} tokens, ${pricing.money(_cost(rows))}"


def _usage_metadata(rows: Sequence[Row]) -> dict[str, Any]:
    ids = [row[_REQUEST] for row in rows[:_REQUEST_IDS_SHOWN]]
    body: dict[str, Any] = {
        "requests": len(rows),
        "request_ids": ids,
        "input_tokens": sum(row[_IN] for row in rows),
        "output_tokens": sum(row[_OUT] for row in rows),
        "cost": pricing.money(_cost(rows)),
        "models": sorted({f"{row[_PROVIDER]}/{row[_MODEL]}" for row in rows})[:10],
    }
    if len(rows) == 1:
        body["request_id"] = rows[0][_REQUEST]
        body["status"] = rows[0][_STATUS]
    return body
