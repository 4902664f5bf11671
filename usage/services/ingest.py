"""Ingestion: validate, attribute, price and store usage events (buffered or direct)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from tokenmgr_project.core.errors import FieldErrors
from tokenmgr_project.core.principal import Principal, within_scope
from usage import buffer, hooks, pricing
from usage import rows as rows_codec
from usage.models import TokenUsage
from usage.rows import Row
from usage.schemas import UsageEvent, validate_event
from usage.services import ledger
from usage.services.config import manager_config

logger = logging.getLogger(__name__)

_TABLE = TokenUsage._meta.db_table


@dataclass(slots=True)
class ItemResult:
    index: int
    request_id: str | None
    status: str  # created | duplicate | rejected
    errors: FieldErrors = field(default_factory=dict)
    cost: Decimal | None = None
    unpriced: bool = False
    conflict: bool = False  # rejected for what is stored (a lineage cycle), not its own content

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
    event.team_id, event.project_id, errors = within_scope(
        principal, event.team_id, event.project_id, doing="record usage for"
    )
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
        event.input_hash, event.output_hash, event.cache_hit,
        None if event.parent_request_id else 0, event.agent_type, event.workflow_step,
        event.system_context, event.input_text, event.output_text, tenant,
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
        accepted = _with_lineage(accepted, tenant)
    if accepted:
        flags, accounting = _store(accepted, principal)
        for (item, _row), flag in zip(accepted, flags, strict=True):
            if flag == buffer.DUPLICATE:
                item.status = "duplicate"
            elif flag == buffer.UNKNOWN_RESERVATION:
                item.status = "rejected"
                item.errors = {"reservation_id": [_UNKNOWN_RESERVATION]}
        try:
            hooks.accountant().counted(accounting)
        except unavailable.DATABASE_ERRORS as exc:
            # The usage is stored; what follows from it (alerts) waits for the beat's sweep.
            unavailable.note(exc, "after-ingestion hook")
        stored = [(item, row) for item, row in accepted if item.status == "created"]
        if stored:
            hooks.usage_stored.send(
                sender=Principal,
                tenant=tenant,
                request_ids=[item.request_id for item, _row in stored],
                rows=[row for _item, row in stored],
            )
    return results


def _with_lineage(
    accepted: list[tuple[ItemResult, Row]], tenant: str
) -> list[tuple[ItemResult, Row]]:
    """The rows with their lineage completed where it is known (depth, root); those the lineage
    refuses (a cycle, a chain too deep) are rejected and left out."""
    rows = [row for _item, row in accepted]
    if all(row[_PARENT] == "" for row in rows):
        return accepted  # nothing to derive: roots only
    if unavailable.suspect():
        # The database failed a moment ago: not waited on again per request. The flush
        # resolves what could not be derived here (the rows wait with depth None).
        return accepted
    try:
        completed, refusals = hooks.lineage().prepare(rows, tenant=tenant)
    except unavailable.DATABASE_ERRORS as exc:
        unavailable.note(exc, "lineage lookup")
        return accepted
    kept: list[tuple[ItemResult, Row]] = []
    for (item, _row), row, refusal in zip(accepted, completed, refusals, strict=True):
        if refusal is not None:
            item.status, item.errors, item.cost = "rejected", refusal.errors, None
            item.conflict = refusal.conflict
        else:
            kept.append((item, row))
    return kept


_PARENT = rows_codec.ROW_INDEX["parent_request_id"]
_UNKNOWN_RESERVATION = "Unknown reservation: no check with reserve=true returned this id."


def _store(
    accepted: list[tuple[ItemResult, Row]], principal: Principal
) -> tuple[list[int], hooks.Accounting]:
    """Store new rows; per row NEW, DUPLICATE or UNKNOWN_RESERVATION, and what was counted."""
    rows = [row for _item, row in accepted]
    plan = hooks.accountant().plan(rows)
    # buffer_allowed: a Redis without persistence would lose acknowledged usage in a crash.
    if tm_redis.available() and tm_redis.buffer_allowed():
        try:
            return _store_buffered(rows, plan, principal), plan
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
    return _store_direct(rows, plan, principal), plan


def _store_direct(rows: list[Row], plan: hooks.Accounting, principal: Principal) -> list[int]:
    reservations = [plan.reservation(i) for i in range(len(rows))]
    with transaction.atomic():
        # With Redis configured (but unreachable) Redis holds the reservations: record the usage
        # (it happened) and let the hold expire rather than refuse it.
        wanted = {r for r in reservations if r}
        unknown = (
            set()
            if tm_redis.configured() or not wanted
            else hooks.accountant().unknown_reservations(wanted, principal=principal)
        )
        storable = [row for row, rsv in zip(rows, reservations, strict=True) if rsv not in unknown]
        inserted = ledger.usage_rows_insert(storable)
        hooks.accountant().stored_direct(
            plan,
            settled={
                rsv: row[0]
                for row, rsv in zip(rows, reservations, strict=True)
                if rsv and rows_codec.row_key(row) in inserted
            },
            redis_configured=tm_redis.configured(),
        )
    return [
        buffer.UNKNOWN_RESERVATION
        if rsv in unknown
        else (buffer.NEW if rows_codec.row_key(row) in inserted else buffer.DUPLICATE)
        for row, rsv in zip(rows, reservations, strict=True)
    ]


def _store_buffered(rows: list[Row], plan: hooks.Accounting, principal: Principal) -> list[int]:
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
        counting = None if plan.counting is None else [plan.counting[i] for i in picked]
        flags, depth = buffer.add(
            [rows[i][0] for i in picked],
            [rows_codec.encode_line(rows[i]) for i in picked],
            settings.TOKENMGR_DEDUPE_TTL,
            counting,
            plan.open_reservations_key,
            tenant=tenant,
            holder=(principal.team_id, principal.project_id),
        )
        flags_by_id = {rows[i][0]: flag for i, flag in zip(picked, flags, strict=True)}
        if depth >= manager_config().buffer_size:
            _flush_soon()
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


def _flush_soon() -> None:
    """Ask for a flush now (usage.tasks sends the worker a message), at most a few times a
    second per API process."""
    global _last_trigger
    now = time.monotonic()
    if now - _last_trigger < _TRIGGER_EVERY_SECONDS:
        return  # this process asked moments ago: spare Redis the round trip
    _last_trigger = now
    try:
        hooks.flush_wanted.send(sender=Principal)
    except Exception:
        # Redis or the broker died after the events were buffered: the request must still
        # answer what was stored (raising here would write them a second time, direct).
        logger.warning("could not ask a worker to flush now", exc_info=True)
