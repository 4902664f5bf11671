"""The buffer flush (Redis stream → ledger, exactly once) and the dead letters it parks."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from django import db
from django.conf import settings
from django.utils import timezone

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.errors import ApiError
from usage import buffer, hooks
from usage.services.config import manager_config
from usage.services.ledger import usage_lines_insert

logger = logging.getLogger(__name__)

# --- flushing the buffer -----------------------------------------------------------------------

# Entries per XREADGROUP, and rows per database transaction.
_READ_ENTRIES = 50
_FLUSH_CHUNK_ROWS = 5_000
# One flush stops after this long so a worker is never held forever by a firehose.
_FLUSH_TIME_BUDGET_SECONDS = 20.0
_flush_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class FlushResult:
    entries: int
    events: int
    inserted: int
    dead: int = 0  # lines the database refused, parked as dead letters

    @property
    def duplicates(self) -> int:
        return self.events - self.inserted - self.dead


# What the database (or the codec) raises for a line it refuses on its own, as psycopg raises it
# (COPY) and as Django wraps it: bad data, a violated constraint other than the handled
# (tenant, request_id) conflict, a value too complex. Never an outage (OperationalError in
# general): that is retried later with nothing parked.
_REFUSED: tuple[type[BaseException], ...] = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.ProgramLimitExceeded,
    db.DataError,
    db.IntegrityError,
    ValueError,  # includes UnicodeEncodeError; a line decode_line cannot read
    KeyError,
    IndexError,
    StopIteration,
)
_ERROR_TEXT_MAX = 2000


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, _REFUSED) or isinstance(exc.__cause__, _REFUSED)


def _error_text(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, db.Error) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}"[:_ERROR_TEXT_MAX]


def _insert_isolating(
    lines: list[str], owners: list[str], refusal: BaseException, dead: list[buffer.DeadLine]
) -> int:
    """Insert lines whose group the database refused (with `refusal`): halves, down to single
    lines, so every good line is committed and each bad one lands in `dead` (with its entry id,
    `owners`). Returns how many were inserted."""
    if len(lines) == 1:
        error = _error_text(refusal)
        logger.error("usage line parked as a dead letter (entry %s): %s", owners[0], error)
        dead.append(buffer.DeadLine(owners[0], lines[0], error))
        return 0
    inserted = 0
    mid = len(lines) // 2
    for part, part_owners in ((lines[:mid], owners[:mid]), (lines[mid:], owners[mid:])):
        try:
            inserted += len(usage_lines_insert(part))
        except Exception as exc:
            if not _refused(exc):
                raise
            inserted += _insert_isolating(part, part_owners, exc, dead)
    return inserted


def usage_flush(*, consumer: str | None = None, reclaim_idle_ms: int | None = None) -> FlushResult:
    """Commit buffered events to the ledger, insert-if-absent, then acknowledge them.

    Safe to run anywhere at any time: entries a dead flusher left pending are re-claimed after
    `reclaim_idle_ms`; a crash between commit and acknowledgement re-inserts nothing.
    """
    if not tm_redis.configured():
        return FlushResult(0, 0, 0)
    consumer = consumer or buffer.consumer_name()
    idle = settings.TOKENMGR_RECLAIM_IDLE_MS if reclaim_idle_ms is None else reclaim_idle_ms
    deadline = time.monotonic() + _FLUSH_TIME_BUDGET_SECONDS
    total_entries = total_events = total_inserted = total_dead = 0
    client = tm_redis.client()
    with _flush_lock:
        pending = buffer.reclaim(consumer, idle, _READ_ENTRIES)
        while time.monotonic() < deadline:
            entries = pending or buffer.read_new(consumer, _READ_ENTRIES)
            pending = []
            if not entries:
                break
            lines = [line for entry in entries for line in entry.lines]
            inserted = 0
            dead: list[buffer.DeadLine] = []
            for start in range(0, len(lines), _FLUSH_CHUNK_ROWS):
                chunk = lines[start : start + _FLUSH_CHUNK_ROWS]
                try:
                    inserted += len(usage_lines_insert(chunk))
                except Exception as exc:
                    if not _refused(exc):
                        raise  # an outage: the entries stay pending and are retried
                    # One bad line must not hold back the others read with it.
                    owners = [entry.entry_id for entry in entries for _line in entry.lines]
                    inserted += _insert_isolating(
                        chunk, owners[start : start + len(chunk)], exc, dead
                    )
            buffer.ack(entries, dead, timezone.now().isoformat())
            total_entries += len(entries)
            total_events += len(lines)
            total_inserted += inserted
            total_dead += len(dead)
            if len(entries) < _READ_ENTRIES:
                pending = buffer.reclaim(consumer, idle, _READ_ENTRIES)
                if not pending:
                    break
        stats = {"last_run_at": timezone.now().isoformat()}
        if total_events:
            stats.update(last_flush_at=stats["last_run_at"], last_flush_count=str(total_inserted))
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(buffer.stats_key(), mapping=cast("Mapping[Any, Any]", stats))
            if total_inserted:
                pipe.hincrby(buffer.stats_key(), "total_flushed", total_inserted)
            pipe.execute()
    if total_events:
        hooks.usage_flushed.send(
            sender=FlushResult, inserted=total_inserted, dead=total_dead, at=stats["last_run_at"]
        )
    return FlushResult(total_entries, total_events, total_inserted, total_dead)


# --- dead letters (lines the flush parked) -----------------------------------------------------

_DEAD_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _dead_ids(ids: list[str]) -> list[str]:
    bad = [i for i in ids if not _DEAD_ID.fullmatch(i)]
    if bad:
        raise ApiError(
            "Invalid dead letter id.", fields={"ids": [f"Not a dead letter id: {', '.join(bad)}."]}
        )
    return ids


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: list[str]  # dead letter ids now in the ledger (inserted, or found there)
    failed: dict[str, str]  # dead letter id -> why the database still refuses it


def usage_dead_letter_replay(*, ids: list[str] | None = None) -> ReplayResult:
    """Insert parked lines again (insert-if-absent: a line already in the ledger counts as
    replayed) and remove from the dead list those the database now accepts; `ids` None: all.

    Budget counters are not touched: the line was counted when it was buffered, and the
    reconcile job makes counters equal the ledger in both directions.
    """
    replayed: list[str] = []
    failed: dict[str, str] = {}
    if not tm_redis.configured():  # no buffer, no dead letters
        return ReplayResult(replayed, failed)
    letters = buffer.dead_letters(ids=None if ids is None else _dead_ids(ids))
    for letter in letters:
        try:
            usage_lines_insert([letter.line])
        except Exception as exc:
            if not _refused(exc):
                raise
            failed[letter.dead_id] = _error_text(exc)
            continue
        replayed.append(letter.dead_id)
    buffer.dead_remove(replayed)
    return ReplayResult(replayed, failed)


def usage_dead_letter_discard(*, ids: list[str]) -> int:
    """Drop parked lines for good; returns how many were removed."""
    return buffer.dead_remove(_dead_ids(ids)) if tm_redis.configured() else 0


def flush_due(*, force: bool = False) -> bool:
    """Is a flush due: forced, buffer at buffer_size, or flush_interval since the last run?"""
    if not tm_redis.configured():
        return False
    if force:
        return True
    client = tm_redis.client()
    pipe = client.pipeline()
    pipe.get(buffer.depth_key())
    pipe.hget(buffer.stats_key(), "last_run_at")
    depth_raw, last_run = pipe.execute()
    depth = int(depth_raw or 0)
    config = manager_config()
    if depth >= config.buffer_size:
        return True
    if last_run is None:
        return True
    elapsed = (timezone.now() - datetime.fromisoformat(last_run.decode())).total_seconds()
    return elapsed >= config.flush_interval
