"""Writes of the usage app: ingestion, the buffer flush, API keys, price overrides, settings."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import psycopg
import redis
from django import db
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from budgets import counters
from budgets import enforcement as budget_enforcement
from tokenmgr_project import redis as tm_redis
from tokenmgr_project import unavailable
from usage import buffer, pricing
from usage import rows as rows_codec
from usage.auth import Principal, key_cache
from usage.errors import ApiError, FieldErrors
from usage.models import ApiKey, ManagerConfig, ModelPrice, TokenUsage
from usage.rows import METADATA_COL, ROW_COLUMNS, Row
from usage.schemas import UsageEvent, validate_event

logger = logging.getLogger(__name__)

_TABLE = TokenUsage._meta.db_table
_COLS = ", ".join(ROW_COLUMNS)
# Rows per INSERT … VALUES statement (SQLite allows 32,766 bound parameters).
_VALUES_CHUNK = 800
# At or above this many rows, PostgreSQL takes the COPY path.
_COPY_THRESHOLD = 64


# --- manager settings (run-time adjustable, env values are the defaults) -------------------------


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    buffer_size: int
    flush_interval: float
    retention_days: int
    alert_channels: list[str]
    optimization_enabled: bool


_config_cache: tuple[float, EffectiveConfig] | None = None
_CONFIG_TTL_SECONDS = 5.0
_CONFIG_RETRY_SECONDS = 1.0


def manager_config() -> EffectiveConfig:
    """The run-time settings, re-read from the database at most every few seconds."""
    global _config_cache
    now = time.monotonic()
    if _config_cache is not None and _config_cache[0] > now:
        return _config_cache[1]
    ttl = _CONFIG_TTL_SECONDS
    try:
        row = ManagerConfig.objects.filter(pk=1).first()
    except unavailable.DATABASE_ERRORS as exc:
        # Database down: keep the last settings read (the environment's before any), and ask
        # again in a second rather than on every call.
        unavailable.note(exc, "manager settings")
        row, ttl = None, _CONFIG_RETRY_SECONDS
        if _config_cache is not None:
            _config_cache = (now + ttl, _config_cache[1])
            return _config_cache[1]
    effective = EffectiveConfig(
        buffer_size=(row.buffer_size if row and row.buffer_size else settings.TOKENMGR_BUFFER_SIZE),
        flush_interval=(
            row.flush_interval if row and row.flush_interval else settings.TOKENMGR_FLUSH_INTERVAL
        ),
        retention_days=(
            row.retention_days
            if row and row.retention_days is not None
            else settings.TOKENMGR_RETENTION_DAYS
        ),
        alert_channels=list(row.alert_channels) if row else ["status"],
        optimization_enabled=row.optimization_enabled if row else True,
    )
    _config_cache = (now + ttl, effective)
    return effective


def manager_config_update(**changes: Any) -> EffectiveConfig:
    """Apply the given run-time settings (None leaves a setting alone)."""
    global _config_cache
    changes = {k: v for k, v in changes.items() if v is not None}
    with transaction.atomic():
        row, _ = ManagerConfig.objects.select_for_update().get_or_create(pk=1)
        for name, value in changes.items():
            setattr(row, name, value)
        row.full_clean()
        row.save(update_fields=[*changes, "updated_at"] if changes else None)
    _config_cache = None
    return manager_config()


# --- ingestion ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ItemResult:
    index: int
    request_id: str | None
    status: str  # created | duplicate | rejected
    errors: FieldErrors = field(default_factory=dict)
    cost: Decimal | None = None
    unpriced: bool = False

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "index": self.index,
            "request_id": self.request_id,
            "status": self.status,
        }
        if self.status == "rejected":
            body["errors"] = self.errors
        else:
            body["duplicate"] = self.status == "duplicate"
            if self.status == "created" and self.cost is not None:
                body["cost"] = pricing.money(self.cost)
                body["currency"] = pricing.CURRENCY
                body["unpriced"] = self.unpriced
        return body


def _apply_scope(event: UsageEvent, principal: Principal) -> FieldErrors:
    """Fill attribution from a scoped key; refuse attribution outside the key's scope."""
    errors: FieldErrors = {}
    if principal.team_id:
        if event.team_id and event.team_id != principal.team_id:
            errors["team_id"] = [
                f"This API key may only record usage for team {principal.team_id!r}."
            ]
        event.team_id = principal.team_id
    if principal.project_id:
        if event.project_id and event.project_id != principal.project_id:
            errors["project_id"] = [
                f"This API key may only record usage for project {principal.project_id!r}."
            ]
        event.project_id = principal.project_id
    return errors


def _row_for(
    event: UsageEvent,
    received_at: datetime,
    choices: dict[tuple[str, str, datetime], pricing.PriceChoice],
    tenant: str,
) -> Row:
    key = (event.provider, event.model, event.occurred_at)
    choice = choices.get(key)
    if choice is None:
        choice = choices[key] = pricing.price_choice(*key)
    price = pricing.price_usage(
        choice=choice,
        provider=event.provider,
        model=event.model,
        at=event.occurred_at,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_write_tokens=event.cache_write_tokens,
    )
    return (
        event.request_id, event.occurred_at, received_at, price.provider, event.model,
        event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens,
        price.cost, price.input_cost, price.output_cost, price.currency, price.source, price.ref,
        price.unpriced, event.estimated, event.team_id, event.project_id, event.user_id,
        event.feature, event.agent, event.task_type, event.conversation_id, event.workflow_id,
        event.status, event.error_type, event.latency_ms, event.metadata, event.reservation_id,
        event.parent_request_id, event.root_request_id, event.relationship, event.intent,
        event.input_hash, event.output_hash, event.cache_hit, tenant,
    )  # fmt: skip


def usage_ingest(*, principal: Principal, events: list[Any]) -> list[ItemResult]:
    """Validate, attribute, price and store usage events; one result per event, in order.

    Idempotent on (tenant, request_id), the tenant being the principal's: a repeat (in this call,
    concurrently, or later) is reported as a duplicate and never stored or counted twice;
    another tenant's ids are none of this one's business. With Redis available the rows go to
    the buffer and are committed by `usage_flush`; otherwise they are inserted here.
    """
    now = timezone.now()
    results: list[ItemResult] = []
    accepted: list[tuple[ItemResult, Row]] = []
    # One principal per call, so one tenant: request ids alone tell this call's repeats apart.
    tenant = principal.tenant
    seen: set[str] = set()
    # Events of one call mostly share provider, model and time: resolve each price once.
    choices: dict[tuple[str, str, datetime], pricing.PriceChoice] = {}
    for index, raw in enumerate(events):
        event, errors = validate_event(raw, now=now)
        if event is not None:
            errors = _apply_scope(event, principal)
        request_id = raw.get("request_id") if isinstance(raw, dict) else None
        if errors or event is None:
            results.append(
                ItemResult(
                    index, request_id if isinstance(request_id, str) else None, "rejected", errors
                )
            )
            continue
        if event.request_id in seen:
            results.append(ItemResult(index, event.request_id, "duplicate"))
            continue
        seen.add(event.request_id)
        row = _row_for(event, now, choices, tenant)
        item = ItemResult(index, event.request_id, "created", cost=row[9], unpriced=row[15])
        results.append(item)
        accepted.append((item, row))
    if accepted:
        flags, budget_ids = _store(accepted, principal)
        for (item, _row), flag in zip(accepted, flags, strict=True):
            if flag == buffer.DUPLICATE:
                item.status = "duplicate"
            elif flag == buffer.UNKNOWN_RESERVATION:
                item.status = "rejected"
                item.errors = {"reservation_id": [_UNKNOWN_RESERVATION]}
        try:
            budget_enforcement.usage_counted(budget_ids)
        except unavailable.DATABASE_ERRORS as exc:
            # The usage is stored; its alerts wait for the beat's evaluation of every budget.
            unavailable.note(exc, "alert evaluation request")
    return results


_UNKNOWN_RESERVATION = "Unknown reservation: no check with reserve=true returned this id."


def _store(
    accepted: list[tuple[ItemResult, Row]], principal: Principal
) -> tuple[list[int], set[int]]:
    """Store new rows; per row NEW, DUPLICATE or UNKNOWN_RESERVATION, and the budgets counted."""
    rows = [row for _item, row in accepted]
    plan = budget_enforcement.usage_plan(rows)
    # buffer_allowed: a Redis without persistence would lose acknowledged usage in a crash.
    if tm_redis.available() and tm_redis.buffer_allowed():
        try:
            return _store_buffered(rows, plan, principal), plan.budget_ids
        except tm_redis.REDIS_ERRORS:
            logger.warning("Redis unreachable; writing usage straight to the database")
            tm_redis.trip()
        except redis.ResponseError as exc:
            # MISCONF: Redis refuses writes (its AOF cannot be written). The add script's first
            # write is refused, so nothing was claimed or buffered: write direct.
            if "MISCONF" not in str(exc):
                raise
            logger.warning("Redis refuses writes (%s); writing usage straight to the database", exc)
            tm_redis.trip()
    return _store_direct(rows, plan, principal), plan.budget_ids


def _store_direct(
    rows: list[Row], plan: budget_enforcement.UsagePlan, principal: Principal
) -> list[int]:
    with transaction.atomic():
        # With Redis configured (but unreachable) Redis holds the reservations: record the usage
        # (it happened) and let the hold expire rather than refuse it.
        unknown = (
            set()
            if tm_redis.configured()
            else budget_enforcement.reservations_unknown_db(
                {r for r in plan.reservations if r}, principal=principal
            )
        )
        storable = [
            row for row, rsv in zip(rows, plan.reservations, strict=True) if rsv not in unknown
        ]
        inserted = usage_rows_insert(storable)
        if tm_redis.configured():  # the Redis counters miss this usage: rebuilt when Redis is back
            budget_enforcement.usage_written_direct(plan)
        budget_enforcement.reservations_settle_db(
            {
                rsv: row[0]
                for row, rsv in zip(rows, plan.reservations, strict=True)
                if rsv and rows_codec.row_key(row) in inserted
            }
        )
    return [
        buffer.UNKNOWN_RESERVATION
        if rsv in unknown
        else (buffer.NEW if rows_codec.row_key(row) in inserted else buffer.DUPLICATE)
        for row, rsv in zip(rows, plan.reservations, strict=True)
    ]


def _store_buffered(
    rows: list[Row], plan: budget_enforcement.UsagePlan, principal: Principal
) -> list[int]:
    tenant = principal.tenant
    ids = [row[0] for row in rows]
    # Older than the Redis claim's TTL, a repeat is only known to the ledger.
    # Database down (or failed a moment ago: not waited on again per request): the Redis claims
    # alone decide; the ledger's unique constraint drops a repeat older than its claim at flush.
    in_ledger: set[str] = set()
    if not unavailable.suspect():
        try:
            in_ledger = _ids_in_ledger(tenant, ids)
        except unavailable.DATABASE_ERRORS as exc:
            unavailable.note(exc, "ledger duplicate check")
    picked = [i for i, row in enumerate(rows) if row[0] not in in_ledger]
    flags_by_id: dict[str, int] = {}
    if picked:
        counting = None
        if not plan.empty:
            counting = [
                buffer.Counting(
                    reservation_key=(
                        counters.reservation_key(plan.reservations[i])
                        if plan.reservations[i]
                        else ""
                    ),
                    cost_units=plan.cost_units[i],
                    tokens=plan.tokens[i],
                    counter_keys=tuple(plan.keys[i]),
                )
                for i in picked
            ]
        flags, depth = buffer.add(
            [rows[i][0] for i in picked],
            [rows_codec.encode_line(rows[i]) for i in picked],
            settings.TOKENMGR_DEDUPE_TTL,
            counting,
            counters.open_reservations_key(),
            tenant=tenant,
            holder=(principal.team_id, principal.project_id),
        )
        flags_by_id = {rows[i][0]: flag for i, flag in zip(picked, flags, strict=True)}
        if depth >= manager_config().buffer_size:
            _trigger_flush()
    return [flags_by_id.get(rid, buffer.DUPLICATE) for rid in ids]


def _ids_in_ledger(tenant: str, ids: list[str]) -> set[str]:
    """Which of one tenant's request ids the ledger has (served by the unique constraint)."""
    if connection.vendor == "postgresql":
        # One array parameter instead of one placeholder per id: far cheaper to build and plan.
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT request_id FROM {_TABLE} WHERE tenant = %s AND request_id = ANY(%s)",
                [tenant, ids],
            )
            return {row[0] for row in cursor.fetchall()}
    return set(
        TokenUsage.objects.filter(tenant=tenant, request_id__in=ids).values_list(
            "request_id", flat=True
        )
    )


_TRIGGER_EVERY_SECONDS = 0.25
_last_trigger = 0.0


def _trigger_flush() -> None:
    """Ask a worker to flush now, at most a few times a second across all API processes."""
    global _last_trigger
    now = time.monotonic()
    if now - _last_trigger < _TRIGGER_EVERY_SECONDS:
        return  # this process asked moments ago: spare Redis the round trip
    _last_trigger = now
    from usage.tasks import usage_flush_buffer

    try:
        if tm_redis.client().set(tm_redis.key("usage", "flush-trigger"), "1", nx=True, px=250):
            usage_flush_buffer.delay(force=True)
    except Exception:
        # Redis or the broker died after the events were buffered: the request must still
        # answer what was stored (raising here would write them a second time, direct).
        logger.warning("could not ask a worker to flush now", exc_info=True)


def _db_params(row: Row) -> list[Any]:
    ops = connection.ops
    values = list(row)
    for i in rows_codec.DATETIME_COLS:
        values[i] = ops.adapt_datetimefield_value(values[i])
    values[METADATA_COL] = json.dumps(values[METADATA_COL], separators=(",", ":"))
    return values


Key = tuple[str, str]  # (tenant, request_id): what identifies a ledger row


def usage_rows_insert(rows: list[Row]) -> set[Key]:
    """Insert ledger rows unless their (tenant, request_id) exists; returns the keys inserted."""
    if not rows:
        return set()
    if connection.vendor == "postgresql" and len(rows) >= _COPY_THRESHOLD:
        return usage_lines_insert([rows_codec.encode_line(row) for row in rows])
    inserted: set[Key] = set()
    with transaction.atomic():
        for start in range(0, len(rows), _VALUES_CHUNK):
            inserted |= _insert_values(rows[start : start + _VALUES_CHUNK])
    return inserted


def usage_lines_insert(lines: list[str]) -> set[Key]:
    """The same for rows already encoded as COPY text lines (the buffer's form)."""
    if not lines:
        return set()
    if connection.vendor != "postgresql":
        return usage_rows_insert([rows_codec.decode_line(line) for line in lines])
    data = "\n".join(lines) + "\n"
    try:
        # Nearly always nothing conflicts (Redis claimed every id): COPY straight into the ledger.
        with (
            transaction.atomic(),
            connection.cursor() as cursor,
            cursor.cursor.copy(f"COPY {_TABLE} ({_COLS}) FROM STDIN") as copy,
        ):
            copy.write(data)
        return {rows_codec.line_key(line) for line in lines}
    except psycopg.errors.UniqueViolation:
        # A re-claimed entry or an old repeat: stage, then insert only the absent rows.
        return _insert_staged(data)


def _insert_values(rows: list[Row]) -> set[Key]:
    jsonb = connection.vendor == "postgresql"
    one = (
        "("
        + ", ".join("%s::jsonb" if jsonb and c == "metadata" else "%s" for c in ROW_COLUMNS)
        + ")"
    )
    sql = (
        f"INSERT INTO {_TABLE} ({_COLS}) VALUES {', '.join([one] * len(rows))} "
        "ON CONFLICT (tenant, request_id) DO NOTHING RETURNING tenant, request_id"
    )
    params: list[Any] = []
    for row in rows:
        params.extend(_db_params(row))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {(r[0], r[1]) for r in cursor.fetchall()}


def _insert_staged(data: str) -> set[Key]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS usage_stage ON COMMIT DELETE ROWS AS "
            f"SELECT {_COLS} FROM {_TABLE} WITH NO DATA"
        )
        with cursor.cursor.copy(f"COPY usage_stage ({_COLS}) FROM STDIN") as copy:
            copy.write(data)
        cursor.execute(
            f"INSERT INTO {_TABLE} ({_COLS}) SELECT {_COLS} FROM usage_stage "
            "ON CONFLICT (tenant, request_id) DO NOTHING RETURNING tenant, request_id"
        )
        inserted = {(r[0], r[1]) for r in cursor.fetchall()}
        cursor.execute("TRUNCATE usage_stage")
        return inserted


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


# --- retention ---------------------------------------------------------------------------------

_PURGE_CHUNK = 10_000


def usage_purge_expired(*, now: datetime | None = None, max_chunks: int = 100) -> int:
    """Delete ledger rows older than retention_days (0 keeps everything), in bounded chunks."""
    days = manager_config().retention_days
    if days <= 0:
        return 0
    cutoff = (now or timezone.now()) - timedelta(days=days)
    deleted = 0
    for _ in range(max_chunks):
        ids = list(
            TokenUsage.objects.filter(occurred_at__lt=cutoff).values_list("pk", flat=True)[
                :_PURGE_CHUNK
            ]
        )
        if not ids:
            break
        deleted += TokenUsage.objects.filter(pk__in=ids).delete()[0]
    return deleted


# --- API keys ----------------------------------------------------------------------------------

KEY_PREFIX = "tm_"


def api_key_create(
    *, name: str, scope: str, team_id: str = "", project_id: str = "", created_by: Any = None
) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned here once and never stored."""
    errors: FieldErrors = {}
    if not name.strip():
        errors["name"] = ["This field is required."]
    if scope not in ApiKey.Scope.values:
        errors["scope"] = [f"Must be one of {', '.join(ApiKey.Scope.values)}."]
    if scope == ApiKey.Scope.TEAM and not team_id:
        errors["team_id"] = ["A team key needs a team_id."]
    if scope == ApiKey.Scope.PROJECT and not project_id:
        errors["project_id"] = ["A project key needs a project_id."]
    if scope == ApiKey.Scope.GLOBAL and (team_id or project_id):
        errors["scope"] = ["A global key has no team_id or project_id."]
    if errors:
        raise ApiError("Invalid API key.", fields=errors)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        name=name.strip(),
        prefix=raw[:10],
        key_hash=ApiKey.hash_key(raw),
        scope=scope,
        team_id=team_id,
        project_id=project_id,
        created_by=created_by,
    )
    return key, raw


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    key_cache.revoke(key.key_hash)
    return key


# --- price overrides ---------------------------------------------------------------------------


def model_price_set(
    *,
    provider: str,
    model: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cache_read_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    effective_from: datetime | None = None,
    note: str = "",
) -> tuple[ModelPrice, bool]:
    """Create or replace the override for (provider, model, effective_from): (row, created)."""
    effective_from = effective_from or timezone.now()
    row, created = ModelPrice.objects.update_or_create(
        provider=provider.lower(),
        model=model,
        effective_from=effective_from,
        defaults={
            "input_per_mtok": input_per_mtok,
            "output_per_mtok": output_per_mtok,
            "cache_read_per_mtok": cache_read_per_mtok,
            "cache_write_per_mtok": cache_write_per_mtok,
            "note": note,
        },
    )
    transaction.on_commit(pricing.overrides.invalidate)
    return row, created
