"""Budget running totals and holds (SPEC §5): in Redis when configured, else in the database.

Redis: one hash per budget and period, `<prefix>:budget:<id>:<period start epoch>`, with integer
fields `c` (spent cost, micro-USD), `t` (spent tokens), `hc`/`ht` (held by open reservations) and
`s` (seeded: the ledger's total for the window was loaded). A check of all applicable budgets and
the hold on each is one Lua script, so concurrent checks can never together pass a hard limit.
Usage increments the same hashes inside the buffer's add script (usage.buffer), atomically with
claiming the request_id, and settles its reservation there too.

A hash that is missing (new budget, new period, Redis restarted) is seeded from the ledger plus
the not yet flushed buffer, so a period is never "un-reset" or forgotten; the reconcile job adds
anything a seed raced past.

Database mode: spend is the ledger's sum plus open reservations, computed in one statement while
the applicable budget rows are locked (PostgreSQL) or the database write lock is held (SQLite).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from budgets.models import Budget, Reservation, Window
from tokenmgr_project import redis as tm_redis
from usage import buffer
from usage import rows as rows_codec
from usage.models import TokenUsage

MICROS = Decimal(1_000_000)
# Counters outlive their period by this much, so late usage and status reads still find them.
COUNTER_GRACE = timedelta(days=35)
# A settled or expired reservation's record stays this long, so settling it late is recognised.
TOMBSTONE_SECONDS = 7 * 24 * 3600


def to_micros(cost: Decimal, *, up: bool = False) -> int:
    return int((cost * MICROS).quantize(Decimal(1), ROUND_CEILING if up else ROUND_HALF_UP))


def from_micros(micros: int) -> Decimal:
    return Decimal(micros) / MICROS


def counter_key(budget_id: int, window: Window) -> str:
    return tm_redis.key("budget", str(budget_id), window.key)


def reservation_key(reservation_id: str) -> str:
    return tm_redis.key("rsv", reservation_id)


def open_reservations_key() -> str:
    return tm_redis.key("rsv", "open")


def new_reservation_id() -> str:
    return "rsv_" + secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class Totals:
    cost_micros: int = 0
    tokens: int = 0
    held_cost_micros: int = 0
    held_tokens: int = 0

    @property
    def cost(self) -> Decimal:
        return from_micros(self.cost_micros)

    @property
    def held_cost(self) -> Decimal:
        return from_micros(self.held_cost_micros)


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's part of a check: its counter and the limits the check must respect."""

    budget_id: int
    window: Window
    cost_limit_micros: int | None  # None: no cost limit (or unlimited by an override)
    token_limit: int | None
    hard: bool


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    blocked: int | None  # index into the holds of the first hard budget that would be exceeded
    totals: list[Totals]  # before this request
    reservation_id: str | None


# --- Redis ---------------------------------------------------------------------------------------

# Releases expired reservations' holds. Shared by the check script and the sweep job.
_SWEEP_LUA = r"""
local function sweep(openz, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', openz, '-inf', now, 'LIMIT', 0, limit)
  for _, rkey in ipairs(ids) do
    local r = redis.call('HMGET', rkey, 'keys', 'hc', 'ht', 'status')
    if r[4] == 'open' then
      for k in string.gmatch(r[1] or '', '[^,]+') do
        redis.call('HINCRBY', k, 'hc', -tonumber(r[2]))
        redis.call('HINCRBY', k, 'ht', -tonumber(r[3]))
      end
      redis.call('HSET', rkey, 'status', 'expired')
    end
    redis.call('ZREM', openz, rkey)
  end
  return #ids
end
"""

# KEYS: the budgets' counter hashes. ARGV: now_ms, cost, tokens, reserve (0/1), reservation key,
# ttl_ms, open zset, tombstone seconds, then per budget: cost limit (-1 none), token limit, hard.
_CHECK = (
    _SWEEP_LUA
    + r"""
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
sweep(ARGV[7], now, 100)
local missing = {}
for i, k in ipairs(KEYS) do
  if redis.call('HEXISTS', k, 's') == 0 then missing[#missing + 1] = i end
end
if #missing > 0 then return {-1, missing} end
local out = {0}
local blocked = 0
for i, k in ipairs(KEYS) do
  local v = redis.call('HMGET', k, 'c', 't', 'hc', 'ht')
  local c, t, hc, ht = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
  out[#out + 1] = c; out[#out + 1] = t; out[#out + 1] = hc; out[#out + 1] = ht
  local base = 8 + (i - 1) * 3
  local climit, tlimit, hard = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  if blocked == 0 and hard == '1' then
    if (climit >= 0 and c + hc + cost > climit) or (tlimit >= 0 and t + ht + tokens > tlimit) then
      blocked = i
    end
  end
end
out[1] = blocked
if blocked == 0 and ARGV[4] == '1' then
  for _, k in ipairs(KEYS) do
    redis.call('HINCRBY', k, 'hc', cost)
    redis.call('HINCRBY', k, 'ht', tokens)
  end
  local expires = now + tonumber(ARGV[6])
  redis.call('HSET', ARGV[5], 'keys', table.concat(KEYS, ','), 'hc', cost, 'ht', tokens,
             'status', 'open', 'expires', expires)
  redis.call('PEXPIRE', ARGV[5], tonumber(ARGV[6]) + tonumber(ARGV[8]) * 1000)
  redis.call('ZADD', ARGV[7], expires, ARGV[5])
end
return out
"""
)

_SWEEP = _SWEEP_LUA + "return sweep(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"

# Seed a counter unless it exists: KEYS[1]; ARGV: cost micros, tokens, expire-at (epoch s).
_SEED = r"""
if redis.call('HEXISTS', KEYS[1], 's') == 1 then return 0 end
redis.call('HSET', KEYS[1], 's', 1, 'c', ARGV[1], 't', ARGV[2])
redis.call('HSETNX', KEYS[1], 'hc', 0)
redis.call('HSETNX', KEYS[1], 'ht', 0)
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return 1
"""

# Raise a seeded counter to at least the ledger's total: KEYS[1]; ARGV: cost micros, tokens.
_RAISE = r"""
if redis.call('HEXISTS', KEYS[1], 's') == 0 then return {0, 0} end
local v = redis.call('HMGET', KEYS[1], 'c', 't')
local dc = math.max(0, tonumber(ARGV[1]) - tonumber(v[1]))
local dt = math.max(0, tonumber(ARGV[2]) - tonumber(v[2]))
if dc > 0 then redis.call('HINCRBY', KEYS[1], 'c', dc) end
if dt > 0 then redis.call('HINCRBY', KEYS[1], 't', dt) end
return {dc, dt}
"""

# Cancel an open reservation: KEYS[1] reservation, KEYS[2] open zset. Returns its status before.
_CANCEL = r"""
local r = redis.call('HMGET', KEYS[1], 'keys', 'hc', 'ht', 'status')
if not r[4] then return false end
if r[4] == 'open' then
  for k in string.gmatch(r[1], '[^,]+') do
    redis.call('HINCRBY', k, 'hc', -tonumber(r[2]))
    redis.call('HINCRBY', k, 'ht', -tonumber(r[3]))
  end
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  redis.call('ZREM', KEYS[2], KEYS[1])
end
return r[4]
"""


def _now_ms() -> int:
    return int(timezone.now().timestamp() * 1000)


def redis_check(
    holds: Sequence[Hold],
    *,
    cost_micros: int,
    tokens: int,
    reserve: bool,
    ttl_seconds: int,
    seed: Any,
) -> CheckOutcome:
    """Check (and with `reserve`, hold) atomically across all budgets. `seed(hold)` is called for
    each counter that does not exist yet, then the check is repeated."""
    keys = [counter_key(h.budget_id, h.window) for h in holds]
    reservation_id = new_reservation_id() if reserve else None
    args: list[Any] = [
        _now_ms(),
        cost_micros,
        tokens,
        1 if reserve else 0,
        reservation_key(reservation_id) if reservation_id else "",
        ttl_seconds * 1000,
        open_reservations_key(),
        TOMBSTONE_SECONDS,
    ]
    for h in holds:
        args.extend(
            (
                -1 if h.cost_limit_micros is None else h.cost_limit_micros,
                -1 if h.token_limit is None else h.token_limit,
                1 if h.hard else 0,
            )
        )
    for _attempt in range(3):
        reply = tm_redis.run_script(_CHECK, keys, args)
        if int(reply[0]) == -1:
            for index in reply[1]:
                seed(holds[int(index) - 1])
            continue
        values = [int(v) for v in reply[1:]]
        totals = [Totals(*values[i * 4 : i * 4 + 4]) for i in range(len(holds))]
        blocked = int(reply[0])
        return CheckOutcome(
            blocked - 1 if blocked else None,
            totals,
            reservation_id if reserve and not blocked else None,
        )
    raise RuntimeError("budget counters could not be seeded")


def redis_seed(budget: Budget, window: Window, spend_micros: int, tokens: int) -> bool:
    expire_at = int(
        (min(window.end, timezone.now() + timedelta(days=3650)) + COUNTER_GRACE).timestamp()
    )
    return bool(
        tm_redis.run_script(
            _SEED, [counter_key(budget.pk, window)], [spend_micros, tokens, expire_at]
        )
    )


def redis_raise(budget: Budget, window: Window, spend_micros: int, tokens: int) -> tuple[int, int]:
    reply = tm_redis.run_script(_RAISE, [counter_key(budget.pk, window)], [spend_micros, tokens])
    return int(reply[0]), int(reply[1])


def redis_totals(budget_id: int, window: Window) -> Totals | None:
    raw = tm_redis.client().hmget(counter_key(budget_id, window), ["s", "c", "t", "hc", "ht"])
    if raw[0] is None:
        return None
    return Totals(*(int(v or 0) for v in raw[1:]))


def redis_sweep(limit: int = 1000) -> int:
    return int(tm_redis.run_script(_SWEEP, [open_reservations_key()], [_now_ms(), limit]))


def redis_cancel(reservation_id: str) -> str | None:
    status = tm_redis.run_script(
        _CANCEL, [reservation_key(reservation_id), open_reservations_key()]
    )
    return status.decode() if status else None


def buffered_rows() -> list[rows_codec.Row]:
    """Every row still in the buffer stream (not yet committed to the ledger)."""
    client = tm_redis.client()
    rows: list[rows_codec.Row] = []
    start = "-"
    while True:
        batch: Any = client.xrange(buffer.stream_key(), min=start, count=500)
        if not batch:
            return rows
        for entry_id, fields in batch:
            if fields:
                rows.extend(
                    rows_codec.decode_line(line) for line in fields[b"rows"].decode().split("\n")
                )
            last = entry_id.decode()
        if len(batch) < 500:
            return rows
        start = "(" + last


# --- the ledger ----------------------------------------------------------------------------------


def ledger_filter(budget: Budget, window: Window) -> Q:
    return Q(occurred_at__gte=window.start, occurred_at__lt=window.end, **budget.filters())


def row_matches(budget: Budget, window: Window, row: rows_codec.Row) -> bool:
    if not (window.start <= row[rows_codec.ROW_INDEX["occurred_at"]] < window.end):
        return False
    return all(row[rows_codec.ROW_INDEX[col]] == value for col, value in budget.filters().items())


def row_spend(row: rows_codec.Row) -> tuple[Decimal, int]:
    return row[rows_codec.ROW_INDEX["cost"]], row[rows_codec.ROW_INDEX["input_tokens"]] + row[
        rows_codec.ROW_INDEX["output_tokens"]
    ]


def ledger_sums(budget: Budget, window: Window) -> tuple[Decimal, int, int]:
    """(cost, tokens, requests) in the ledger for this budget's attribution over the window."""
    agg = TokenUsage.objects.filter(ledger_filter(budget, window)).aggregate(
        cost=Sum("cost"), tokens=Sum("total_tokens"), requests=Count("id")
    )
    return agg["cost"] or Decimal(0), int(agg["tokens"] or 0), int(agg["requests"])


def snapshot(
    budget: Budget,
    window: Window,
    buffered: list[rows_codec.Row] | None = None,
    *,
    ledger: tuple[Decimal, int, int] | None = None,
) -> tuple[int, int, int]:
    """(cost micros, tokens, requests) of the ledger plus the buffer for this budget and window.

    The ledger is read first and the buffer second (pass `ledger` and `buffered` read in that
    order), and buffered rows already in the ledger are skipped: a row moving from one to the
    other between the two reads is counted at most once, never twice.
    """
    cost, tokens, requests = ledger if ledger is not None else ledger_sums(budget, window)
    if tm_redis.configured():
        for r in unflushed(lambda r: row_matches(budget, window, r), buffered):
            c, t = row_spend(r)
            cost += c
            tokens += t
            requests += 1
    return to_micros(cost), tokens, requests


def unflushed(
    match: Callable[[rows_codec.Row], bool], buffered: list[rows_codec.Row] | None = None
) -> list[rows_codec.Row]:
    """Buffered rows that `match` and are not yet in the ledger (read the ledger before this)."""
    if buffered is None:
        buffered = buffered_rows()
    pending = [r for r in buffered if match(r)]
    if not pending:
        return []
    ids = [r[rows_codec.ROW_INDEX["request_id"]] for r in pending]
    committed = set(
        TokenUsage.objects.filter(request_id__in=ids).values_list("request_id", flat=True)
    )
    return [r for r in pending if r[rows_codec.ROW_INDEX["request_id"]] not in committed]


# --- database mode -------------------------------------------------------------------------------


def db_totals(
    budgets: Sequence[Budget], windows: Sequence[Window], *, now: datetime
) -> list[Totals]:
    """Spent and held per budget, all in ONE statement: under READ COMMITTED each statement sees
    its own snapshot, and a usage row settling a reservation between a ledger query and a holds
    query would be missed by both (the unit neither spent nor held: an overspend)."""
    if not budgets:
        return []
    parts: list[str] = []
    params: list[Any] = []
    for i, (budget, window) in enumerate(zip(budgets, windows, strict=True)):
        spent_sql, spent_params = (
            TokenUsage.objects.filter(ledger_filter(budget, window))
            .order_by()
            .values_list("cost", "total_tokens")
            .query.sql_with_params()
        )
        held_sql, held_params = (
            Reservation.objects.filter(
                budgets=budget, status=Reservation.Status.OPEN, expires_at__gt=now
            )
            .order_by()
            .values_list("cost", "tokens")
            .query.sql_with_params()
        )
        parts.append(
            f"SELECT {i} AS i, s.c, s.t, h.c, h.t FROM "
            f"(SELECT SUM(x.cost) AS c, SUM(x.total_tokens) AS t FROM ({spent_sql}) x) s "
            f"CROSS JOIN (SELECT SUM(y.cost) AS c, SUM(y.tokens) AS t FROM ({held_sql}) y) h"
        )
        params.extend((*spent_params, *held_params))
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        found = {int(r[0]): r[1:] for r in cursor.fetchall()}
    out = []
    for i in range(len(budgets)):
        cost, tokens, held_cost, held_tokens = found[i]
        out.append(
            Totals(
                to_micros(Decimal(str(cost or 0))),
                int(tokens or 0),
                to_micros(Decimal(str(held_cost or 0)), up=True),
                int(held_tokens or 0),
            )
        )
    return out


def db_check(
    budgets: Sequence[Budget],
    holds: Sequence[Hold],
    *,
    cost: Decimal,
    tokens: int,
    reserve: bool,
    ttl_seconds: int,
    team_id: str,
    project_id: str,
) -> CheckOutcome:
    now = timezone.now()
    cost_micros = to_micros(cost, up=True)
    # On SQLite, transaction_mode IMMEDIATE takes the write lock at BEGIN: checks run one by one.
    with transaction.atomic():
        if connection.vendor == "postgresql" and budgets:
            # Concurrent checks on any shared budget queue here, in id order (no deadlocks).
            list(
                Budget.objects.select_for_update()
                .filter(pk__in=sorted(b.pk for b in budgets))
                .order_by("pk")
                .values_list("pk", flat=True)
            )
        totals = db_totals(budgets, [h.window for h in holds], now=now)
        blocked = None
        for i, (h, t) in enumerate(zip(holds, totals, strict=True)):
            if not h.hard:
                continue
            over_cost = (
                h.cost_limit_micros is not None
                and t.cost_micros + t.held_cost_micros + cost_micros > h.cost_limit_micros
            )
            over_tokens = (
                h.token_limit is not None and t.tokens + t.held_tokens + tokens > h.token_limit
            )
            if over_cost or over_tokens:
                blocked = i
                break
        reservation_id = None
        if reserve and blocked is None:
            reservation_id = new_reservation_id()
            reservation = Reservation.objects.create(
                reservation_id=reservation_id,
                cost=cost,
                tokens=tokens,
                expires_at=now + timedelta(seconds=ttl_seconds),
                team_id=team_id,
                project_id=project_id,
            )
            reservation.budgets.set(budgets)
    return CheckOutcome(blocked, totals, reservation_id)


def db_sweep(*, now: datetime | None = None) -> int:
    now = now or timezone.now()
    return Reservation.objects.filter(status=Reservation.Status.OPEN, expires_at__lte=now).update(
        status=Reservation.Status.EXPIRED, closed_at=now
    )
