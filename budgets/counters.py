"""Budget running totals and holds (SPEC §5): in Redis when configured, else in the database.

Units: cost is counted in integers of 1e-10 USD, the ledger's own scale (TokenUsage.cost has 10
decimal places and usage.pricing rounds every cost to it, once). Every ledger cost is therefore a
whole number of units: spend is added and compared exactly and never rounds. Only a reservation's
hold may round (up: it is an estimate), and a limit rounds down, which for whole-unit spend gives
the same answers as the exact limit. All conversions are here (to_units, hold_units, limit_units,
from_units).

Redis: one hash per budget and period, `<prefix>:budget:<id>:<period start epoch>`, with integer
fields `c` (spent cost, units), `t` (spent tokens), `hc`/`ht` (held by open reservations) and
`s` (seeded: the ledger's total for the window was loaded). A check of all applicable budgets and
the hold on each is one Lua script, so concurrent checks can never together pass a hard limit.
Usage increments the same hashes inside the buffer's add script (usage.buffer), atomically with
claiming the request_id, and settles its reservation there too. Redis keeps hash fields as signed
64-bit integers, so one budget period counts up to 2^63-1 units (922,337,203.6854775807 USD).
Lua numbers are doubles, exact only to 2^53 (about 900,719.93 USD in units): every HINCRBY takes
an integer string as it arrived (a release negates the string, never `-tonumber`), and the check
compares spent + held + cost with a limit in two exact limbs (`_OVER`), so comparisons are exact
over the whole counter range and for any limit the API accepts.

A hash that is missing (new budget, new period, Redis restarted) is seeded from the ledger plus
the not yet flushed buffer (and parked dead letters, which usage counted when it was accepted),
exactly: see `rebase`. The reconcile job and the rebuild after direct writes use the same step
and correct a counter in both directions.

Database mode: spend is the ledger's sum plus open reservations, computed in one statement while
the applicable budget rows are locked (PostgreSQL) or the database write lock is held (SQLite),
summed in the same integer units (on SQLite, whose decimals are floats, per row).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import redis
from django.db import connection, transaction
from django.utils import timezone

from budgets.models import Budget, Reservation, Window
from tokenmgr_project.core import redis as tm_redis
from usage import buffer, pricing, rollups
from usage import rows as rows_codec
from usage.models import TokenUsage

logger = logging.getLogger(__name__)

COST_PLACES = pricing.LEDGER_COST_PLACES
UNITS_PER_USD = 10**COST_PLACES
# Set when this process wrote usage straight to the database while Redis is configured, or saw
# that another did (a CounterRebuild row): counters may lack that usage, so the next check or
# status read rebuilds them first (budgets.services.counters_rebuild). A plain flag: the hot path
# reads it without a round trip.
rebuild_due = False
# Counters outlive their period by this much, so late usage and status reads still find them.
COUNTER_GRACE = timedelta(days=35)
# A settled or expired reservation's record stays this long, so settling it late is recognised.
TOMBSTONE_SECONDS = 7 * 24 * 3600


def to_units(cost: Decimal) -> int:
    """A spent cost (at the ledger's scale, as every priced or stored cost is) in counter units,
    exactly. A cost finer than the ledger's scale is a bug upstream: refused, never rounded."""
    scaled = cost.scaleb(COST_PLACES)
    units = int(scaled)
    if units != scaled:
        raise ValueError(f"cost {cost} is finer than the ledger's {COST_PLACES} decimal places")
    return units


def hold_units(cost: Decimal) -> int:
    """A reservation's estimate in units, rounded up (a hold may only over-reserve)."""
    return int(cost.scaleb(COST_PLACES).to_integral_value(ROUND_CEILING))


def limit_units(limit: Decimal) -> int:
    """A limit in units, rounded down: for whole-unit spend, spend <= floor(limit) exactly when
    spend <= limit, so no comparison changes its answer."""
    return int(limit.scaleb(COST_PLACES).to_integral_value(ROUND_FLOOR))


def from_units(units: int) -> Decimal:
    return Decimal(units).scaleb(-COST_PLACES)


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
    cost_units: int = 0
    tokens: int = 0
    held_cost_units: int = 0
    held_tokens: int = 0

    @property
    def cost(self) -> Decimal:
        return from_units(self.cost_units)

    @property
    def held_cost(self) -> Decimal:
        return from_units(self.held_cost_units)


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's part of a check: its counter and the limits the check must respect."""

    budget_id: int
    window: Window
    cost_limit_units: int | None  # None: no cost limit (or unlimited by an override)
    token_limit: int | None
    hard: bool


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    blocked: int | None  # index into the holds of the first hard budget that would be exceeded
    totals: list[Totals]  # before this request
    reservation_id: str | None


# --- Redis ---------------------------------------------------------------------------------------

# over(a, b, c, limit): a + b + c > limit, exactly, for integer strings. Each value splits into
# limbs of 10^9, every one an exact double (a high limb stays below 2^53 up to 9e24), compared
# limb-wise: exact for every counter (int64) and any limit. The check calls it only past 2^51
# (about 225,000 USD): below, the values and their sum are exact doubles, compared inline (a Lua
# function call costs Redis about 2 µs).
_OVER_LUA = r"""
local function limbs(s)
  if not s then return 0, 0 end
  local sign = 1
  if string.sub(s, 1, 1) == '-' then sign = -1; s = string.sub(s, 2) end
  local n = #s
  if n <= 9 then return 0, sign * tonumber(s) end
  return sign * tonumber(string.sub(s, 1, n - 9)), sign * tonumber(string.sub(s, n - 8))
end
local B = 2251799813685248  -- 2^51
local function over(a, b, c, limit)
  local h1, l1 = limbs(a)
  local h2, l2 = limbs(b)
  local h3, l3 = limbs(c)
  local h4, l4 = limbs(limit)
  local dh = h1 + h2 + h3 - h4
  local dl = l1 + l2 + l3 - l4  -- |dl| < 4e9, so the high limbs decide unless |dh| <= 4
  if dh > 4 then return true end
  if dh < -4 then return false end
  return dh * 1000000000 + dl > 0
end
"""

# Releases expired reservations' holds. Shared by the check script and the sweep job.
_SWEEP_LUA = (
    buffer.HOLD_RELEASE_LUA
    + r"""
local function sweep(openz, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', openz, '-inf', now, 'LIMIT', 0, limit)
  for _, rkey in ipairs(ids) do
    release(rkey, openz, 'expired')
  end
  return #ids
end
"""
)

# KEYS: the budgets' counter hashes. ARGV: now_ms, cost (units), tokens, reserve (0/1), reservation
# key, ttl_ms, open zset, tombstone seconds, then per budget: cost limit (units, -1 none), token
# limit, hard, and last the reservation's team id and project id (its scope, for cancel's
# permission gate). A counter still being seeded (`p`) counts as missing. Values are returned as
# the strings Redis holds (a Lua number would be a double).
_CHECK = (
    _SWEEP_LUA
    + _OVER_LUA
    + r"""
local now = tonumber(ARGV[1])
local cost, costn = ARGV[2], tonumber(ARGV[2])
local tokens, tokensn = ARGV[3], tonumber(ARGV[3])
sweep(ARGV[7], now, 100)
local missing = {}
local out = {0}
local blocked = 0
for i, k in ipairs(KEYS) do
  local v = redis.call('HMGET', k, 'c', 't', 'hc', 'ht', 's', 'p')
  if not v[5] or v[6] then missing[#missing + 1] = i end
  local c, t, hc, ht = v[1] or '0', v[2] or '0', v[3] or '0', v[4] or '0'
  out[#out + 1] = c; out[#out + 1] = t; out[#out + 1] = hc; out[#out + 1] = ht
  local base = 8 + (i - 1) * 3
  local climit, tlimit, hard = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  if blocked == 0 and hard == '1' then
    local x = false
    if climit ~= '-1' then
      local cn, hn, ln = tonumber(c), tonumber(hc), tonumber(climit)
      if cn < B and hn < B and hn > -B and costn < B and ln < B then
        x = cn + hn + costn > ln
      else
        x = over(c, hc, cost, climit)
      end
    end
    if not x and tlimit ~= '-1' then
      local tn, hn, ln = tonumber(t), tonumber(ht), tonumber(tlimit)
      if tn < B and hn < B and hn > -B and tokensn < B and ln < B then
        x = tn + hn + tokensn > ln
      else
        x = over(t, ht, tokens, tlimit)
      end
    end
    if x then blocked = i end
  end
end
if #missing > 0 then return {-1, missing} end
out[1] = blocked
if blocked == 0 and ARGV[4] == '1' then
  for _, k in ipairs(KEYS) do
    redis.call('HINCRBY', k, 'hc', cost)
    redis.call('HINCRBY', k, 'ht', tokens)
  end
  local expires = now + tonumber(ARGV[6])
  redis.call('HSET', ARGV[5], 'keys', table.concat(KEYS, ','), 'hc', cost, 'ht', tokens,
             'status', 'open', 'expires', expires, 'team', ARGV[#ARGV - 1], 'project', ARGV[#ARGV])
  redis.call('PEXPIRE', ARGV[5], tonumber(ARGV[6]) + tonumber(ARGV[8]) * 1000)
  redis.call('ZADD', ARGV[7], expires, ARGV[5])
end
return out
"""
)

_SWEEP = _SWEEP_LUA + "return sweep(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"

# Step 1 of `rebase`, run while the ledger is frozen: note where the buffer stream stands and
# take the counters to rebase. KEYS[1]: the stream, then the counters. ARGV: token, now_ms,
# stale_ms, mode ('seed': only missing counters; 'all': seeded ones too), then per counter its
# expire-at (epoch s). Per counter the reply gives state, c, t: 0 untouched (seeded, mode seed),
# 1 taken for seeding (zeroed and marked pending `p`: usage adds to it from now on, checks wait
# for it), 2 taken as it is (c, t: its values now), 3 another process is seeding it. Returns
# the stream's last generated id first: usage after it is in the counters already.
_MARK = r"""
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local out = {last}
local now, stale = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 2, #KEYS do
  local k = KEYS[i]
  local v = redis.call('HMGET', k, 's', 'p', 'c', 't')
  local state, c, t = 0, '0', '0'
  if not v[1] or (v[2] and now - tonumber(v[2]) > stale) then
    redis.call('HSET', k, 's', '1', 'p', ARGV[2], 'm', ARGV[1], 'c', '0', 't', '0')
    redis.call('HSETNX', k, 'hc', '0')
    redis.call('HSETNX', k, 'ht', '0')
    redis.call('EXPIREAT', k, ARGV[3 + i])
    state = 1
  elseif v[2] then
    state = 3
  elseif ARGV[4] == 'all' then
    redis.call('HSET', k, 'm', ARGV[1])
    state, c, t = 2, v[3] or '0', v[4] or '0'
  end
  out[#out + 1] = state
  out[#out + 1] = c
  out[#out + 1] = t
end
return out
"""

# Step 2: add each counter's correction (integer strings) if it is still ours (no later `_MARK`
# took it), and end its seeding. KEYS: counters; ARGV: token, then (cost, tokens) per counter.
_APPLY = r"""
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = 0
  if redis.call('HGET', k, 'm') == ARGV[1] then
    local dc, dt = ARGV[2 * i], ARGV[2 * i + 1]
    if dc ~= '0' then redis.call('HINCRBY', k, 'c', dc) end
    if dt ~= '0' then redis.call('HINCRBY', k, 't', dt) end
    redis.call('HDEL', k, 'p', 'm')
    out[i] = 1
  end
end
return out
"""

# A rebase that failed half-way: counters it was seeding become missing again (seeded afresh by
# the next reader), the others are let go unchanged. KEYS: counters; ARGV: token.
_ABANDON = r"""
for _, k in ipairs(KEYS) do
  if redis.call('HGET', k, 'm') == ARGV[1] then
    if redis.call('HEXISTS', k, 'p') == 1 then
      redis.call('HDEL', k, 's', 'p', 'm')
    else
      redis.call('HDEL', k, 'm')
    end
  end
end
return 1
"""

# Cancel an open reservation: KEYS[1] reservation, KEYS[2] open zset. Returns its status before.
_CANCEL = buffer.HOLD_RELEASE_LUA + "return release(KEYS[1], KEYS[2], 'cancelled')"


def _now_ms() -> int:
    return int(timezone.now().timestamp() * 1000)


def redis_check(
    holds: Sequence[Hold],
    *,
    cost_units: int,
    tokens: int,
    reserve: bool,
    ttl_seconds: int,
    seed: Callable[[Hold], None] | None,
    team_id: str = "",
    project_id: str = "",
) -> CheckOutcome | None:
    """Check (and with `reserve`, hold) atomically across all budgets. `seed(hold)` is called for
    each counter that does not exist yet (or is being seeded), then the check is repeated. With
    `seed` None a missing counter answers None: the script found it before changing anything."""
    keys = [counter_key(h.budget_id, h.window) for h in holds]
    reservation_id = new_reservation_id() if reserve else None
    args: list[Any] = [
        _now_ms(),
        cost_units,
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
                -1 if h.cost_limit_units is None else h.cost_limit_units,
                -1 if h.token_limit is None else h.token_limit,
                1 if h.hard else 0,
            )
        )
    args.extend((team_id, project_id))
    for _attempt in range(3):
        reply = tm_redis.run_script(_CHECK, keys, args)
        if int(reply[0]) == -1:
            if seed is None:
                return None
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


def _expire_at(window: Window) -> int:
    return int((min(window.end, timezone.now() + timedelta(days=3650)) + COUNTER_GRACE).timestamp())


def redis_totals(budget_id: int, window: Window) -> Totals | None:
    """The counter's totals; None while it is missing or being seeded."""
    raw = tm_redis.client().hmget(counter_key(budget_id, window), ["s", "p", "c", "t", "hc", "ht"])
    if raw[0] is None or raw[1] is not None:
        return None
    return Totals(*(int(v or 0) for v in raw[2:]))


def redis_seed_state(key: str) -> str:
    """ "ready", "pending" (being seeded) or "missing"."""
    s, p = tm_redis.client().hmget(key, ["s", "p"])
    return "missing" if s is None else ("ready" if p is None else "pending")


def redis_sweep(limit: int = 1000) -> int:
    return int(tm_redis.run_script(_SWEEP, [open_reservations_key()], [_now_ms(), limit]))


def redis_reservation_scope(reservation_id: str) -> tuple[str, str] | None:
    """(team_id, project_id) of a reservation held in Redis; None if Redis holds no such one."""
    raw: Any = tm_redis.client().hmget(
        reservation_key(reservation_id), ["status", "team", "project"]
    )
    if raw[0] is None:
        return None
    return (raw[1] or b"").decode(), (raw[2] or b"").decode()


def redis_cancel(reservation_id: str) -> str | None:
    status = tm_redis.run_script(
        _CANCEL, [reservation_key(reservation_id), open_reservations_key()]
    )
    return status.decode() if status else None


def _entry_rows(fields: dict[bytes, bytes]) -> list[rows_codec.Row]:
    lines = fields[b"rows"].decode().split("\n")
    if b"v" not in fields:  # buffered by a server from before the tenant column
        lines = [rows_codec.upgrade_legacy_line(line) for line in lines]
    return [rows_codec.decode_line(line) for line in lines]


def buffered_rows(upto: str = "+", *, dead: bool = False) -> list[rows_codec.Row]:
    """Every row still in the buffer stream (up to entry id `upto`), and with `dead` the lines
    the flush parked as dead letters: acknowledged usage not (yet) in the ledger."""
    client = tm_redis.client()
    rows: list[rows_codec.Row] = []
    start = "-"
    while True:
        batch: Any = client.xrange(buffer.stream_key(), min=start, max=upto, count=500)
        for entry_id, fields in batch:
            if fields:
                rows.extend(_entry_rows(fields))
            start = "(" + entry_id.decode()
        if len(batch) < 500:
            break
    if dead:
        rows.extend(_dead_rows(client))
    return rows


def _dead_rows(client: redis.Redis) -> list[rows_codec.Row]:
    rows: list[rows_codec.Row] = []
    start = "-"
    while True:
        batch: Any = client.xrange(buffer.dead_key(), min=start, count=500)
        for entry_id, fields in batch:
            start = "(" + entry_id.decode()
            try:
                rows.append(rows_codec.decode_line(fields[b"line"].decode()))
            except (KeyError, ValueError, ArithmeticError):
                logger.warning("dead letter %s cannot be read; not counted", entry_id)
        if len(batch) < 500:
            return rows


# --- the ledger ----------------------------------------------------------------------------------


def row_matches(budget: Budget, window: Window, row: rows_codec.Row) -> bool:
    if not (window.start <= row[rows_codec.ROW_INDEX["occurred_at"]] < window.end):
        return False
    return all(row[rows_codec.ROW_INDEX[col]] == value for col, value in budget.filters().items())


def row_spend(row: rows_codec.Row) -> tuple[Decimal, int]:
    return row[rows_codec.ROW_INDEX["cost"]], row[rows_codec.ROW_INDEX["input_tokens"]] + row[
        rows_codec.ROW_INDEX["output_tokens"]
    ]


def _cost_units_sql(column: str) -> str:
    """SQL summing a cost column in counter units, exactly. PostgreSQL's numeric sum is exact
    (converted by to_units). SQLite keeps decimals as doubles and sums them as doubles: each row
    is turned back into its exact units first (a double holds any cost below 2^53 units, about
    900,000 USD per row, closely enough to round back), then summed as 64-bit integers."""
    if connection.vendor == "sqlite":
        return f"SUM(CAST(ROUND({column} * {UNITS_PER_USD}) AS INTEGER))"
    return f"SUM({column})"


def _units_of(value: Any) -> int:
    """A value from `_cost_units_sql` (NULL: no rows) in units."""
    if value is None:
        return 0
    if connection.vendor == "sqlite":
        return int(value)
    return to_units(Decimal(str(value)))


def ledger_units(budget: Budget, window: Window) -> tuple[int, int, int]:
    """(cost units, tokens, requests) in the ledger for this budget's attribution and window:
    from the hourly rollups (exact, and still counting usage retention purged), the ledger for
    a window's sub-hour edges (usage.rollups.totals)."""
    return rollups.totals(filters=budget.filters(), since=window.start, until=window.end)


def ledger_sums(budget: Budget, window: Window) -> tuple[Decimal, int, int]:
    """(cost, tokens, requests) in the ledger for this budget's attribution over the window."""
    units, tokens, requests = ledger_units(budget, window)
    return from_units(units), tokens, requests


def freeze_ledger() -> None:
    """Hold off every write to the ledger until the current transaction ends (reads go on).

    PostgreSQL: SHARE mode conflicts with the ROW EXCLUSIVE lock of INSERT and COPY, so the
    flush, direct writes and replays wait; concurrent rebases share it. SQLite: the transaction
    (IMMEDIATE) already holds the database's write lock."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {TokenUsage._meta.db_table} IN SHARE MODE")


def not_in_ledger(rows: list[rows_codec.Row]) -> list[rows_codec.Row]:
    """These rows (deduplicated by (tenant, request_id)) minus those the ledger holds."""
    by_key = {rows_codec.row_key(r): r for r in rows}
    by_tenant: dict[str, list[str]] = {}
    for tenant, request_id in by_key:
        by_tenant.setdefault(tenant, []).append(request_id)
    committed: set[tuple[str, str]] = set()
    # Per tenant: the look-up then uses the ledger's (tenant, request_id) unique index.
    for tenant, ids in by_tenant.items():
        for start in range(0, len(ids), 5000):
            committed.update(
                (tenant, request_id)
                for request_id in TokenUsage.objects.filter(
                    tenant=tenant, request_id__in=ids[start : start + 5000]
                ).values_list("request_id", flat=True)
            )
    return [row for key, row in by_key.items() if key not in committed]


# Another process seeding a counter is waited for this long, then taken over (it died).
SEED_STALE_MS = 10_000
_SEED_POLL_SECONDS = 0.005


@dataclass(frozen=True, slots=True)
class Rebased:
    budget_id: int
    window: Window
    cost_delta: int  # units added (negative: lowered); for a seed, the whole total
    tokens_delta: int
    seeded: bool


def rebase(pairs: Sequence[tuple[Budget, Window]], *, existing: bool) -> list[Rebased]:
    """Make these Redis counters equal, exactly, to the ledger plus the unflushed buffer plus
    dead letters: the missing ones (a seed), and with `existing` the seeded ones too (reconcile,
    rebuild), in both directions. Returns what changed; counters another process is seeding are
    left to it (waited for when seeding).

    Exact although usage keeps arriving and flushing: with the ledger frozen (`freeze_ledger`),
    one script notes the stream's last id G and each counter's value at that instant (or zeroes
    a missing one, which usage then adds to); the rows of entries up to G plus the ledger are
    then exactly what the counter should have held at that instant (entries flushed before are
    in the ledger, none can be flushed meanwhile), and the difference is added, so usage added
    since G stays counted. A later rebase of the same counter supersedes this one (token)."""
    waiting: list[str] = []
    results = _rebase_once(pairs, existing=existing, busy=waiting) if pairs else []
    if existing:
        return results
    by_key = {counter_key(b.pk, w): (b, w) for b, w in pairs}
    deadline = time.monotonic() + SEED_STALE_MS / 1000
    while waiting:
        # Another process is seeding these: wait for it; seed them here if it gave up (the
        # counter is missing again) or its mark went stale (it died).
        time.sleep(_SEED_POLL_SECONDS)
        states = {k: redis_seed_state(k) for k in waiting}
        retry = [k for k, state in states.items() if state == "missing"]
        waiting = [k for k, state in states.items() if state == "pending"]
        if waiting and time.monotonic() > deadline:
            retry, waiting = retry + waiting, []
            deadline = time.monotonic() + SEED_STALE_MS / 1000
        if retry:
            results += _rebase_once([by_key[k] for k in retry], existing=False, busy=waiting)
    return results


def _rebase_once(
    pairs: Sequence[tuple[Budget, Window]], *, existing: bool, busy: list[str]
) -> list[Rebased]:
    keys = [counter_key(b.pk, w) for b, w in pairs]
    token = secrets.token_hex(8)
    results: list[Rebased] = []
    with transaction.atomic():
        freeze_ledger()  # first: on the event loop this raises before any side effect
        reply = tm_redis.run_script(
            _MARK,
            [buffer.stream_key(), *keys],
            [
                token,
                _now_ms(),
                SEED_STALE_MS,
                "all" if existing else "seed",
                *(_expire_at(w) for _b, w in pairs),
            ],
        )
        last = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        states = [
            (int(reply[1 + 3 * i]), int(reply[2 + 3 * i]), int(reply[3 + 3 * i]))
            for i in range(len(pairs))
        ]
        busy.extend(k for k, (state, _c, _t) in zip(keys, states, strict=True) if state == 3)
        taken = [i for i, (state, _c, _t) in enumerate(states) if state in (1, 2)]
        if not taken:
            return results
        try:
            pending = not_in_ledger(buffered_rows(last, dead=True))
            args: list[Any] = [token]
            for i in taken:
                budget, window = pairs[i]
                cost, tokens, _requests = ledger_units(budget, window)
                for row in pending:
                    if row_matches(budget, window, row):
                        row_cost, row_tokens = row_spend(row)
                        cost += to_units(row_cost)
                        tokens += row_tokens
                _state, base_cost, base_tokens = states[i]
                args.extend((str(cost - base_cost), str(tokens - base_tokens)))
            applied = tm_redis.run_script(_APPLY, [keys[i] for i in taken], args)
        except BaseException:
            # Unable to abandon: a stale mark is taken over after SEED_STALE_MS.
            with contextlib.suppress(*tm_redis.REDIS_ERRORS):
                tm_redis.run_script(_ABANDON, [keys[i] for i in taken], [token])
            raise
    for n, i in enumerate(taken):
        if int(applied[n]):
            budget, window = pairs[i]
            results.append(
                Rebased(
                    budget.pk,
                    window,
                    int(args[1 + 2 * n]),
                    int(args[2 + 2 * n]),
                    seeded=states[i][0] == 1,
                )
            )
    return results


def unflushed(
    match: Callable[[rows_codec.Row], bool], buffered: list[rows_codec.Row] | None = None
) -> list[rows_codec.Row]:
    """Buffered rows that `match` and are not yet in the ledger (read the ledger before this)."""
    if buffered is None:
        buffered = buffered_rows()
    # A row is (tenant, request_id): another tenant's row with the same id is not this one.
    return not_in_ledger([r for r in buffered if match(r)])


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
        spent_sql, spent_params = rollups.totals_sql(
            filters=budget.filters(), since=window.start, until=window.end
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
            f"({spent_sql}) s CROSS JOIN "
            f"(SELECT {_cost_units_sql('y.cost')} AS c, SUM(y.tokens) AS t FROM ({held_sql}) y) h"
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
                int(cost),
                int(tokens or 0),
                _units_of(held_cost),  # reservations hold priced costs: whole units already
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
    cost_units = hold_units(cost)
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
                h.cost_limit_units is not None
                and t.cost_units + t.held_cost_units + cost_units > h.cost_limit_units
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
