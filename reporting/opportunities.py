"""Savings opportunities with their evidence, each priced from the catalogue: the engine behind
the optimization report and the recommendations (reporting.recommendations).

Traffic kinds, each per target: a model, or a team / feature / agent on one model:
- cheaper_model: successful short-output traffic (usage.rollups.SHORT_OUTPUT_TOKENS) on a model
  with a cheaper sibling of a comparable tier (CHEAPER_TIER), its token volumes priced on both
  (rollups). "Small prompts" are not a rollup measure, so only short outputs count;
- error_waste: spend on failed requests (rollups);
- caching: requests whose input hash and model repeat within DUPLICATE_WINDOW: what a response
  cache would have saved is their cost (ledger);
- prompt_caching: large inputs (>= PROMPT_CACHE_MIN_TOKENS) repeated within PROMPT_CACHE_TTL and
  not read from a cache (cache_read_tokens = 0), on a model whose price has a cache-read rate:
  the repeated tokens priced at the cache-read rate instead of the input rate, less the
  cache-write premium of the request that writes the cache (ledger). A repeated system prompt
  counts when the client says which (system_context, SYSTEM_PROMPT_KEYS), a repeated whole
  input (input_hash) otherwise;
- prompt_trimming: requests carrying a system prompt of >= LARGE_SYSTEM_PROMPT tokens (the
  client's system_context.system_prompt_tokens): the saving of TRIM_TOKENS fewer tokens each,
  at the rate those tokens were billed (input, or cache read) — an assumption stated in the
  evidence (ledger);
- max_tokens: outputs far below the output limit reserved (budget reservations, database mode)
  or sent (metadata MAX_TOKENS_KEYS). Providers bill the tokens generated, not the limit, so
  this frees budget headroom and saves no money (savings 0);
- retry_waste: retry storms (provenance retry edges): every attempt but the last successful one.

Budget kinds (archived BudgetPeriod rows of active budgets): budget_exhausted_early and
budget_underused, control recommendations with no money saving of their own.

Nothing is invented: a saving is a difference of two catalogue prices for observed volumes, or
the observed cost of waste; an opportunity with too little evidence (MIN_REQUESTS requests,
MIN_PERIODS periods) is left out. The ledger is read over a bounded window (`sample_window`)
when asked (recommendations), over the whole range otherwise (the report).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import BigIntegerField, Case, F, Q, QuerySet, Value, When
from django.db.models import Window as Over
from django.db.models.functions import Cast, Round, RowNumber

from budgets.models import Budget, BudgetAlert, BudgetPeriod, Reservation
from budgets.selectors import budgets_for_principal
from provenance import selectors as provenance_selectors
from tokenmgr_project.core.principal import Principal
from usage import pricing, rollups
from usage.models import TokenUsage
from usage.selectors import usage_for_principal

MIN_REQUESTS = 20
DUPLICATE_WINDOW = timedelta(hours=24)
RETRY_STORM_MIN = 3
RETRY_STORM_WINDOW = timedelta(minutes=10)
FINDINGS_SHOWN = 5
# Providers keep a prompt cache for about 5 minutes after its last use (OpenAI 5-10 min,
# Anthropic 5 min by default) and cache prompts from 1,024 tokens on.
PROMPT_CACHE_TTL = timedelta(minutes=5)
PROMPT_CACHE_MIN_TOKENS = 1024
LARGE_SYSTEM_PROMPT = 1024
TRIM_TOKENS = 1000
# What a client may say about the system prompt it sent, in provenance.system_context.
SYSTEM_PROMPT_KEYS = ("system_prompt_tokens", "system_prompt_hash")
# The output limit a client may send in metadata (first present wins), per provider naming.
MAX_TOKENS_KEYS = ("max_tokens", "max_output_tokens", "max_completion_tokens")
# Outputs at most this share of the reserved output are "far below" it.
MAX_TOKENS_USED_SHARE = Decimal("0.25")
MAX_TOKENS_HEADROOM = Decimal("1.25")  # the suggested limit: the largest output seen, +25 %
# The ledger window of the recommendations: at most SAMPLE_DAYS, and at most SAMPLE_ROWS rows.
SAMPLE_DAYS = 7
SAMPLE_ROWS = 150_000
# Budgets: exhausted before EARLY_SHARE of the period in at least EARLY_PERIODS of the last
# EARLY_OF closed periods; less than UNDERUSED_SHARE used in every one of the last (at least
# MIN_PERIODS, at most PERIODS_LOOKED_AT) closed periods.
PERIODS_LOOKED_AT = 6
EARLY_SHARE = Decimal("0.75")
EARLY_PERIODS = 3
EARLY_OF = 4
MIN_PERIODS = 3
UNDERUSED_SHARE = Decimal("0.30")
# Confidence (see `confidence`).
HIGH_EVIDENCE = 1000
MEDIUM_EVIDENCE = 100
STABLE_HALF = Decimal("0.30")
MONTH = timedelta(days=30)
CENT = Decimal("0.01")
MAX_COUNT = 10**12  # a JSON number a client sent, clamped to a sane integer

# A model → the cheaper model of its family that serves simple requests about as well. Matched
# on the longest prefix, so dated names (claude-3-5-sonnet-20241022) match their family.
CHEAPER_TIER = {
    "gpt-4o": "gpt-4o-mini",
    "gpt-4.1": "gpt-4.1-mini",
    "gpt-4.1-mini": "gpt-4.1-nano",
    "gpt-4-turbo": "gpt-4o-mini",
    "gpt-4": "gpt-4o-mini",
    "o1": "o3-mini",
    "o3": "o4-mini",
    "claude-3-opus": "claude-3-5-sonnet",
    "claude-3-5-sonnet": "claude-3-5-haiku",
    "claude-3-7-sonnet": "claude-3-5-haiku",
    "claude-sonnet-4": "claude-3-5-haiku",
    "claude-opus-4": "claude-sonnet-4",
    "gemini-1.5-pro": "gemini-1.5-flash",
    "gemini-2.5-pro": "gemini-2.5-flash",
    "gemini-2.5-flash": "gemini-2.5-flash-lite",
}
TRAFFIC_KINDS = (
    "cheaper_model",
    "caching",
    "prompt_caching",
    "prompt_trimming",
    "max_tokens",
    "error_waste",
    "retry_waste",
)
BUDGET_KINDS = ("budget_exhausted_early", "budget_underused")
ALL_KINDS = TRAFFIC_KINDS + BUDGET_KINDS
REPORT_KINDS = ("cheaper_model", "caching", "error_waste", "retry_waste")
# Target dimensions of the traffic kinds: a model, or a team / feature / agent on one model.
DIMENSIONS = ("model", "team", "feature", "agent")
GROUP = ("team_id", "project_id", "feature", "agent", "provider", "model")
COARSE_GROUP = ("team_id", "project_id", "provider", "model")
Aggregate = Callable[..., rollups.Result]
Group = tuple[str, str, str, str, str, str]  # values of GROUP
Measures = dict[str, int]


def cheaper_tier(model: str) -> str | None:
    best = max(
        (p for p in CHEAPER_TIER if model == p or model.startswith(p + "-")), key=len, default=None
    )
    return CHEAPER_TIER[best] if best else None


def _units(value: int) -> Decimal:
    return rollups.units_to_money(value)


def _money_units(value: Decimal) -> int:
    return int((value * rollups.UNITS_PER_USD).to_integral_value(ROUND_HALF_UP))


# --- windows, confidence --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """What an opportunity's evidence was read over; `mid` splits it in two halves (None: too
    short to split), to tell steady traffic from a one-off burst."""

    since: datetime
    until: datetime
    mid: datetime | None
    source: str  # rollups | ledger | reservations | budget periods
    capped: bool = False  # the ledger window was shortened to SAMPLE_ROWS rows

    @property
    def seconds(self) -> int:
        return max(int((self.until - self.since).total_seconds()), 1)

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "days": f"{Decimal(self.seconds) / 86400:.2f}",
            "source": self.source,
        }
        if self.capped:
            out["note"] = f"the most recent {SAMPLE_ROWS:,} requests of the range"
        return out


def _halves(since: datetime, until: datetime, source: str, capped: bool = False) -> Window:
    mid = (since + (until - since) / 2).replace(minute=0, second=0, microsecond=0)
    return Window(since, until, mid if since < mid < until else None, source, capped)


def confidence(evidence: int, first_half: int | None) -> str:
    """high: >= HIGH_EVIDENCE requests of evidence, spread over the window (each half holds at
    least STABLE_HALF of it); medium: >= MEDIUM_EVIDENCE and spread, or >= HIGH_EVIDENCE but in
    one half; low: the rest (still >= MIN_REQUESTS, or it is not shown)."""
    stable = (
        first_half is not None
        and evidence > 0
        and STABLE_HALF <= Decimal(first_half) / evidence <= 1 - STABLE_HALF
    )
    if evidence >= HIGH_EVIDENCE and stable:
        return "high"
    if (evidence >= MEDIUM_EVIDENCE and stable) or evidence >= HIGH_EVIDENCE:
        return "medium"
    return "low"


@dataclass(slots=True)
class Opportunity:
    kind: str
    dimension: str  # model | team | feature | agent | budget
    target: str
    savings: Decimal  # over `window`, in USD (0 for control recommendations)
    requests: int
    action: str
    evidence: dict[str, Any] = field(default_factory=dict)
    value: str = ""  # the dimension's value (the team, feature, agent, budget id)
    provider: str = ""
    model: str = ""
    team_id: str = ""  # the narrowest scope holding all its evidence
    project_id: str = ""
    window: Window | None = None
    confidence: str = "medium"
    saves_money: bool = True  # False: a control recommendation (headroom, limits)

    @property
    def evidence_text(self) -> str:
        return "; ".join(
            f"{k}={v}" for k, v in self.evidence.items() if not isinstance(v, list | dict)
        )

    @property
    def daily_units(self) -> int:
        """The saving per day, in 1e-10 USD units (what acceptance takes as the baseline)."""
        seconds = self.window.seconds if self.window else 86400
        return round(Decimal(_money_units(self.savings)) * 86400 / seconds)

    @property
    def monthly_savings(self) -> Decimal:
        seconds = self.window.seconds if self.window else int(MONTH.total_seconds())
        scaled = self.savings * Decimal(int(MONTH.total_seconds())) / Decimal(seconds)
        return scaled.quantize(CENT, ROUND_HALF_UP)


@dataclass(slots=True)
class Found:
    items: list[Opportunity]
    source: str


# --- prices of volumes ----------------------------------------------------------------------------


def _base(price: Any) -> Any:
    """A tiered price's first tier: volumes of many requests are priced per request, and
    simple traffic stays under the first tier (128k tokens) — stated in the evidence."""
    return getattr(price, "base", price)


def volume_cost(
    *,
    provider: str,
    model: str,
    at: datetime,
    requests: int,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> Decimal | None:
    """The catalogue (or override) price of a volume of `requests` requests, as the ledger
    prices one (usage.pricing.cost_for) at the first price tier; None when unpriced."""
    rates = pricing.price_choice(provider, model, at).rates
    if rates is None:
        return None
    base = pricing.Rates(
        input=_base(rates.input),
        output=_base(rates.output),
        cache_read=_base(rates.cache_read),
        cache_write=_base(rates.cache_write),
        per_krequests=rates.per_krequests,
    )
    input_cost, output_cost, fee = pricing.cost_for(
        base,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read=cache_read_tokens,
        cache_write=cache_write_tokens,
    )
    return pricing.ledger_cost(input_cost + output_cost + fee * requests)


def _tiered(provider: str, model: str, at: datetime) -> bool:
    rates = pricing.price_choice(provider, model, at).rates
    return rates is not None and any(
        hasattr(p, "tiers") for p in (rates.input, rates.output, rates.cache_read)
    )


def cache_rates(provider: str, model: str, at: datetime) -> tuple[Any, Any] | None:
    """(cache-read, cache-write) rates when the price offers a cache read cheaper than input."""
    rates = pricing.price_choice(provider, model, at).rates
    if rates is None or rates.cache_read is None or rates.input is None:
        return None
    if _base(rates.cache_read) >= _base(rates.input):
        return None
    return _base(rates.cache_read), _base(rates.cache_write)


# --- slices: a target's groups summed -------------------------------------------------------------


@dataclass(slots=True)
class Slice:
    """One target (a model, or a team / feature / agent on one model): its measures summed
    over the groups it holds, and the (team, project) pairs those came from."""

    dimension: str
    value: str
    provider: str
    model: str
    values: Measures = field(default_factory=lambda: defaultdict(int))
    scopes: set[tuple[str, str]] = field(default_factory=set)
    hashes: dict[str, Measures] = field(default_factory=dict)

    @property
    def model_label(self) -> str:
        return f"{self.provider}/{self.model}" if self.provider else self.model

    @property
    def target(self) -> str:
        if self.dimension == "model":
            return self.model_label
        return f"{self.value} ({self.model_label})"

    @property
    def scope(self) -> tuple[str, str]:
        teams = {t for t, _p in self.scopes}
        projects = {p for _t, p in self.scopes}
        return (
            next(iter(teams)) if len(teams) == 1 else "",
            next(iter(projects)) if len(projects) == 1 else "",
        )


def slices(
    groups: Iterable[tuple[Group, Measures]], dims: Sequence[str], *, skip: Iterable[str] = ()
) -> dict[tuple[str, str, str, str], Slice]:
    """Fold groups (GROUP values → measures) into one Slice per target of `dims`; a blank
    team / feature / agent is no target."""
    out: dict[tuple[str, str, str, str], Slice] = {}
    skipped = set(skip)
    for group, values in groups:
        team, project, feature, agent, provider, model = group
        by = {"model": "", "team": team, "feature": feature, "agent": agent}
        for dim in dims:
            if dim in skipped or (dim != "model" and not by[dim]):
                continue
            key = (dim, by[dim], provider, model)
            one = out.get(key)
            if one is None:
                one = out[key] = Slice(dim, by[dim], provider, model)
            one.scopes.add((team, project))
            for name, v in values.items():
                if not v:
                    continue  # most ledger measures of most groups: a defaultdict reads 0
                if name.endswith("_max_output"):  # a maximum, not a sum
                    one.values[name] = max(one.values[name], int(v))
                else:
                    one.values[name] += int(v)
    return out


def _opportunity(
    one: Slice, kind: str, savings: Decimal, requests: int, first: int | None, *, window: Window
) -> Opportunity:
    """An opportunity about one slice; `first`: its evidence in the window's first half."""
    team, project = one.scope
    return Opportunity(
        kind=kind,
        dimension=one.dimension,
        target=one.target,
        savings=savings,
        requests=requests,
        action="",
        value=one.value or one.model_label,
        provider=one.provider,
        model=one.model,
        team_id=team,
        project_id=project,
        window=window,
        confidence=confidence(requests, first if window.mid else None),
    )


def _group(values: Sequence[Any]) -> Group:
    team, project, feature, agent, provider, model = (str(v) for v in values)
    return team, project, feature, agent, provider, model


def _grouped(result: rollups.Result, names: Sequence[str]) -> dict[Group, Measures]:
    out: dict[Group, Measures] = {}
    for key, values in result.rows.items():
        named = dict(zip(names, key, strict=False))
        group: Group = (
            named.get("team_id", ""),
            named.get("project_id", ""),
            named.get("feature", ""),
            named.get("agent", ""),
            named.get("provider", ""),
            named.get("model", ""),
        )
        out[group] = values
    return out


def _with_first_half(
    total: dict[Group, Measures], first: dict[Group, Measures], names: Sequence[str]
) -> list[tuple[Group, Measures]]:
    """Each group's measures plus `first_<measure>` for those of the window's first half."""
    out = []
    for group, values in total.items():
        merged = dict(values)
        for name in names:
            merged[f"first_{name}"] = first.get(group, {}).get(name, 0)
        out.append((group, merged))
    return out


# --- traffic kinds from the rollups -------------------------------------------------------------


def rollup_groups(
    aggregate: Aggregate, window: Window, dims: Sequence[str]
) -> list[tuple[Group, Measures]]:
    """The rollups' measures per group over the window, with those of its first half."""
    fine = any(d in ("feature", "agent") for d in dims)
    names = GROUP if fine else COARSE_GROUP
    if window.mid is None:
        whole = _grouped(aggregate(list(names), since=window.since, until=window.until), names)
        return _with_first_half(whole, {}, ())
    first = _grouped(aggregate(list(names), since=window.since, until=window.mid), names)
    second = _grouped(aggregate(list(names), since=window.mid, until=window.until), names)
    whole = {g: dict(v) for g, v in first.items()}
    for group, values in second.items():
        into = whole.setdefault(group, dict.fromkeys(values, 0))
        for name, v in values.items():
            into[name] = into.get(name, 0) + v
    return _with_first_half(whole, first, ("short_requests", "errors"))


def cheaper_models(
    found: dict[tuple[str, str, str, str], Slice],
    *,
    at: datetime,
    window: Window,
    min_requests: int = MIN_REQUESTS,
) -> list[Opportunity]:
    out = []
    for one in found.values():
        v = one.values
        candidate = cheaper_tier(one.model)
        if candidate is None or v["short_requests"] < min_requests or not v["short_cost_units"]:
            continue
        alternative = volume_cost(
            provider=one.provider,
            model=candidate,
            at=at,
            requests=v["short_requests"],
            input_tokens=v["short_input_tokens"],
            output_tokens=v["short_output_tokens"],
        )
        now = _units(v["short_cost_units"])
        if alternative is None or alternative >= now:
            continue
        saving, first = now - alternative, v.get("first_short_requests")
        item = _opportunity(one, "cheaper_model", saving, v["short_requests"], first, window=window)
        item.action = (
            f"Route requests with outputs up to {rollups.SHORT_OUTPUT_TOKENS} tokens "
            f"to {candidate}."
        )
        item.evidence = {
            "model": one.model,
            "cheaper_model": candidate,
            "short_requests": v["short_requests"],
            "share_of_requests": f"{v['short_requests'] * 100 / max(v['requests'], 1):.1f}%",
            "input_tokens": v["short_input_tokens"],
            "output_tokens": v["short_output_tokens"],
            "cost_now": pricing.money(now),
            "cost_on_cheaper_model": pricing.money(alternative),
            "method": "the same token volumes priced on the cheaper model (catalogue, first "
            "price tier, no prompt-cache discount); cost now is the ledger's",
        }
        if _tiered(one.provider, candidate, at):
            item.evidence["assumption"] = "each request under the first price tier"
        out.append(item)
    return out


def error_waste(
    found: dict[tuple[str, str, str, str], Slice],
    *,
    window: Window,
    min_requests: int = MIN_REQUESTS,
) -> list[Opportunity]:
    out = []
    for one in found.values():
        v = one.values
        if v["errors"] < min_requests or not v["error_cost_units"]:
            continue
        waste, first = _units(v["error_cost_units"]), v.get("first_errors")
        item = _opportunity(one, "error_waste", waste, v["errors"], first, window=window)
        item.action = "Find why these requests fail (error_type) before retrying them."
        item.evidence = {
            "errors": v["errors"],
            "error_share": f"{v['errors'] * 100 / max(v['requests'], 1):.1f}%",
            "cost_of_errors": pricing.money(_units(v["error_cost_units"])),
        }
        out.append(item)
    return out


# --- the ledger: repeated inputs, system prompts, output limits -----------------------------------


def _gap(later: str, earlier: str) -> str:
    """SQL: seconds from `earlier` to `later` (two columns of the same row)."""
    if connection.vendor == "postgresql":
        return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


def _json_int(column: str, key: str) -> str:
    """SQL: a JSON object's integer member (a number, clamped to [0, MAX_COUNT]), else NULL."""
    if connection.vendor == "postgresql":
        return (
            f"CASE WHEN jsonb_typeof({column}->'{key}') = 'number' THEN CAST(LEAST(GREATEST("
            f"FLOOR(CAST({column}->>'{key}' AS NUMERIC)), 0), {MAX_COUNT}) AS BIGINT) END"
        )
    return (
        f"CASE WHEN json_type({column}, '$.{key}') IN ('integer', 'real') THEN MIN(MAX(CAST("
        f"json_extract({column}, '$.{key}') AS INTEGER), 0), {MAX_COUNT}) END"
    )


def _json_text(column: str, key: str) -> str:
    if connection.vendor == "postgresql":
        return f"CASE WHEN jsonb_typeof({column}->'{key}') = 'string' THEN {column}->>'{key}' END"
    return f"CASE WHEN json_type({column}, '$.{key}') = 'text' THEN json_extract({column}, '$.{key}') END"  # noqa: E501 - one SQL expression


def _cost_units() -> Any:
    return Cast(Round(F("cost") * rollups.UNITS_PER_USD), output_field=BigIntegerField())


def _rows(
    principal: Principal,
    window: Window,
    filters: dict[str, str],
    extra: Q,
    columns: Sequence[str],
    **annotations: Any,
) -> tuple[str, list[Any]]:
    """SQL and parameters of the caller's ledger rows in the window: `columns`, the cost in
    units (`cu`) and `first` (1 in the window's first half), for the window functions around
    them."""
    mid = window.mid or window.until
    rows: QuerySet[TokenUsage] = (
        usage_for_principal(principal)
        .filter(extra, occurred_at__gte=window.since, occurred_at__lt=window.until, **filters)
        .order_by()
        .annotate(
            cu=_cost_units(),
            first=Case(When(occurred_at__lt=mid, then=Value(1)), default=0),
            **annotations,
        )
        .values("id", *GROUP, "occurred_at", *columns, "cu", "first", *annotations)
    )
    sql, params = rows.query.sql_with_params()
    return sql, list(params)


_G = ", ".join(f"s.{c}" for c in GROUP)


def _fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return list(cursor.fetchall())


def repeated_inputs(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[str, Group, Measures]]:
    """Per input hash and group: repeats within DUPLICATE_WINDOW of the request before with the
    same hash and model (dup_*), and large uncached repeats within PROMPT_CACHE_TTL (pc_*: the
    tokens read again, and those of the request that would write the cache). A row whose
    client reported its system prompt is left to `system_prompts` for prompt caching."""
    reported = Case(When(system_context__has_key=SYSTEM_PROMPT_KEYS[0], then=Value(1)), default=0)
    inner, params = _rows(
        principal,
        window,
        filters,
        ~Q(input_hash=""),
        ("input_hash", "input_tokens", "cache_read_tokens"),
        reported=reported,
    )
    order = "ORDER BY t.occurred_at, t.id"
    part = "PARTITION BY t.input_hash, t.model"
    dup_s, ttl_s = int(DUPLICATE_WINDOW.total_seconds()), int(PROMPT_CACHE_TTL.total_seconds())
    big = (
        f"s.input_tokens >= {PROMPT_CACHE_MIN_TOKENS} AND s.cache_read_tokens = 0 "
        "AND s.reported = 0"
    )
    dup = f"s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {dup_s}"
    read = f"s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s} AND {big}"
    write = (
        f"s.next_at IS NOT NULL AND {_gap('s.next_at', 's.occurred_at')} <= {ttl_s} AND {big} "
        f"AND NOT (s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s})"
    )

    def when(cond: str, value: str = "1") -> str:
        return f"SUM(CASE WHEN {cond} THEN {value} ELSE 0 END)"

    sql = f"""
        SELECT s.input_hash, {_G},
            {when(dup)}, {when(dup, "s.cu")}, {when(dup, "s.first")},
            {when(read)}, {when(read, "s.input_tokens")}, {when(read, "s.first")},
            {when(write)}, {when(write, "s.input_tokens")}
        FROM (
            SELECT t.*, LAG(t.occurred_at) OVER ({part} {order}) AS prev_at,
                LEAD(t.occurred_at) OVER ({part} {order}) AS next_at
            FROM ({inner}) t
        ) s
        WHERE s.prev_at IS NOT NULL OR s.next_at IS NOT NULL
        GROUP BY s.input_hash, {_G}
    """
    names = (
        "dup_requests", "dup_cost_units", "first_dup_requests",
        "pc_requests", "pc_tokens", "first_pc_requests", "pc_writes", "pc_write_tokens",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        values = {n: int(v or 0) for n, v in zip(names, row[7:], strict=True)}
        if values["dup_requests"] or values["pc_requests"]:
            out.append((str(row[0]), _group(row[1:7]), values))
    return out


def system_prompts(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[Group, Measures]]:
    """Per group: requests whose client reported a large system prompt (sp_*), the uncached
    repeats of the same prompt within PROMPT_CACHE_TTL (spc_*), and successful requests that
    sent an output limit in metadata (mt_*)."""
    sp_keys = Q(system_context__has_key=SYSTEM_PROMPT_KEYS[0])
    inner, params = _rows(
        principal,
        window,
        filters,
        sp_keys | Q(metadata__has_any_keys=list(MAX_TOKENS_KEYS)),
        (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "status",
            "metadata",
            "system_context",
        ),
    )
    sp_tokens = _json_int("t.system_context", "system_prompt_tokens")
    sp_hash = _json_text("t.system_context", "system_prompt_hash")
    limit = "COALESCE(" + ", ".join(_json_int("t.metadata", k) for k in MAX_TOKENS_KEYS) + ")"
    order = "ORDER BY t.occurred_at, t.id"
    part = f"PARTITION BY {sp_hash}, t.model"
    ttl_s = int(PROMPT_CACHE_TTL.total_seconds())
    large = f"s.sp >= {LARGE_SYSTEM_PROMPT}"
    cached = f"{large} AND s.sph IS NOT NULL AND s.cache_read_tokens = 0"
    read = f"{cached} AND s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s}"
    write = (
        f"{cached} AND s.next_at IS NOT NULL AND {_gap('s.next_at', 's.occurred_at')} <= {ttl_s}"
        f" AND NOT (s.prev_at IS NOT NULL AND {_gap('s.occurred_at', 's.prev_at')} <= {ttl_s})"
    )
    limited = "s.mt IS NOT NULL AND s.mt > 0 AND s.status = 'success'"

    def when(cond: str, value: str = "1") -> str:
        return f"SUM(CASE WHEN {cond} THEN {value} ELSE 0 END)"

    sql = f"""
        SELECT {_G},
            {when(large)}, {when(large, "s.sp")}, {when(f"{large} AND s.cache_read_tokens > 0")},
            {when(large, "s.first")}, {when(f"{large} AND s.cache_read_tokens > 0", "s.sp")},
            {when(read)}, {when(read, "s.sp")}, {when(read, "s.first")},
            {when(write)}, {when(write, "s.sp")},
            {when(limited)}, {when(limited, "s.mt")}, {when(limited, "s.output_tokens")},
            MAX(CASE WHEN {limited} THEN s.output_tokens END), {when(limited, "s.first")}
        FROM (
            SELECT t.*,
                CASE WHEN {sp_tokens} < t.input_tokens THEN {sp_tokens} ELSE t.input_tokens END
                    AS sp,
                {sp_hash} AS sph, {limit} AS mt,
                LAG(t.occurred_at) OVER ({part} {order}) AS prev_at,
                LEAD(t.occurred_at) OVER ({part} {order}) AS next_at
            FROM ({inner}) t
        ) s
        GROUP BY {_G}
    """
    names = (
        "sp_requests", "sp_tokens", "sp_cached_requests", "first_sp_requests", "sp_cached_tokens",
        "spc_requests", "spc_tokens", "first_spc_requests", "spc_writes", "spc_write_tokens",
        "mt_requests", "mt_limit_tokens", "mt_output_tokens", "mt_max_output", "first_mt_requests",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        out.append((_group(row[:6]), {n: int(v or 0) for n, v in zip(names, row[6:], strict=True)}))
    return out


def reservations(
    principal: Principal, window: Window, filters: dict[str, str]
) -> list[tuple[Group, Measures]]:
    """Per group: budget reservations settled in the window (database mode) against the usage
    that settled them: output tokens reserved (the hold's tokens less the request's input) and
    generated, and the cost held beyond the cost charged."""
    usage = TokenUsage._meta.db_table
    held = Reservation._meta.db_table
    where = ["r.status = %s", "r.closed_at >= %s", "r.closed_at < %s"]
    mid = window.mid or window.until
    params: list[Any] = [
        connection.ops.adapt_datetimefield_value(mid),
        Reservation.Status.SETTLED.value,
        connection.ops.adapt_datetimefield_value(window.since),
        connection.ops.adapt_datetimefield_value(window.until),
    ]
    scope = {"team_id": principal.team_id, "project_id": principal.project_id}
    for column, value in [*((c, v) for c, v in scope.items() if v), *filters.items()]:
        if column not in rollups.FINE_DIMENSIONS:
            raise ValueError(f"not a filter column: {column}")
        where.append(f"u.{column} = %s")
        params.append(value)
    out_tokens = "CASE WHEN r.tokens > u.input_tokens THEN r.tokens - u.input_tokens ELSE 0 END"
    held_units = f"CAST(ROUND(r.cost * {rollups.UNITS_PER_USD}) AS BIGINT)"
    used_units = f"CAST(ROUND(u.cost * {rollups.UNITS_PER_USD}) AS BIGINT)"
    group = ", ".join(f"u.{c}" for c in GROUP)
    sql = f"""
        SELECT {group}, COUNT(*), SUM({out_tokens}), SUM(u.output_tokens), MAX(u.output_tokens),
            SUM(CASE WHEN r.closed_at < %s THEN 1 ELSE 0 END),
            SUM(CASE WHEN {held_units} > {used_units} THEN {held_units} - {used_units} ELSE 0 END)
        FROM {held} r
        JOIN {usage} u ON u.request_id = r.settled_request_id AND u.reservation_id = r.reservation_id
        WHERE u.status = 'success' AND {" AND ".join(where)}
        GROUP BY {group}
    """  # noqa: E501 - one SQL statement
    names = (
        "rs_requests", "rs_limit_tokens", "rs_output_tokens", "rs_max_output",
        "first_rs_requests", "rs_headroom_units",
    )  # fmt: skip
    out = []
    for row in _fetch(sql, params):
        out.append((_group(row[:6]), {n: int(v or 0) for n, v in zip(names, row[6:], strict=True)}))
    return out


def sample_window(
    principal: Principal, since: datetime, until: datetime, filters: dict[str, str]
) -> Window | None:
    """The ledger window: the last SAMPLE_DAYS of [since, until) (never before retention's
    cutoff), shortened to its most recent SAMPLE_ROWS rows (one index probe on occurred_at)."""
    start = max(since, until - timedelta(days=SAMPLE_DAYS))
    cutoff = rollups.purged_before()
    if cutoff is not None:
        start = max(start, cutoff)
    if start >= until:
        return None
    edge = list(
        usage_for_principal(principal)
        .filter(occurred_at__gte=start, occurred_at__lt=until, **filters)
        .order_by("-occurred_at")
        .values_list("occurred_at", flat=True)[SAMPLE_ROWS : SAMPLE_ROWS + 1]
    )
    if edge:
        return _halves(edge[0], until, "ledger", capped=True)
    return _halves(start, until, "ledger")


def caching(
    found: dict[tuple[str, str, str, str], Slice], *, window: Window, min_requests: int
) -> list[Opportunity]:
    out = []
    for one in found.values():
        repeats = one.values["dup_requests"]
        savings = _units(one.values["dup_cost_units"])
        if repeats < min_requests or not savings:
            continue
        first = one.values["first_dup_requests"]
        item = _opportunity(one, "caching", savings, repeats, first, window=window)
        groups = sorted(
            ((h, v) for h, v in one.hashes.items() if v["dup_requests"]),
            key=lambda hv: (-hv[1]["dup_cost_units"], hv[0]),
        )
        item.action = "Cache responses by input hash (or use the provider's prompt caching)."
        item.evidence = {
            "repeated_inputs": len(groups),
            "repeat_requests": repeats,
            "window_hours": int(DUPLICATE_WINDOW.total_seconds() // 3600),
            "since": window.since.isoformat(),
            "cost_of_repeats": pricing.money(savings),
            "examples": [
                {
                    "input_hash": h,
                    "repeats": v["dup_requests"],
                    "cost": pricing.money(_units(v["dup_cost_units"])),
                }
                for h, v in groups[:FINDINGS_SHOWN]
            ],
        }
        out.append(item)
    return out


_CACHE_HOW = {
    "anthropic": "Mark the repeated prefix with cache_control (Anthropic prompt caching).",
    "openai": "Keep the repeated part first and byte-identical: OpenAI caches prompts of 1,024+ "
    "tokens automatically (and report cached_tokens).",
    "google": "Use Gemini context caching for the repeated part.",
}


def _pricer(one: Slice, at: datetime) -> Callable[..., Decimal | None]:
    """Token volumes priced on the slice's model (no per-request fee: the requests happen
    either way)."""

    def cost(**tokens: int) -> Decimal | None:
        return volume_cost(provider=one.provider, model=one.model, at=at, requests=0, **tokens)

    return cost


def _prompt_cache_saving(
    one: Slice, at: datetime, read_tokens: int, write_tokens: int
) -> tuple[Decimal, Decimal, Decimal] | None:
    """(saving, read saving, write premium) of serving `read_tokens` from the cache and writing
    `write_tokens` into it, on the slice's model; None without a cheaper cache read."""
    if cache_rates(one.provider, one.model, at) is None:
        return None
    cost = _pricer(one, at)
    full = cost(input_tokens=read_tokens)
    cached = cost(input_tokens=read_tokens, cache_read_tokens=read_tokens)
    plain = cost(input_tokens=write_tokens)
    written = cost(input_tokens=write_tokens, cache_write_tokens=write_tokens)
    if full is None or cached is None or plain is None or written is None:
        return None
    read_saving, premium = full - cached, max(written - plain, Decimal(0))
    return read_saving - premium, read_saving, premium


def prompt_caching(
    found: dict[tuple[str, str, str, str], Slice],
    *,
    at: datetime,
    window: Window,
    min_requests: int,
) -> list[Opportunity]:
    out = []
    for one in found.values():
        v = one.values
        requests = v["pc_requests"] + v["spc_requests"]
        if requests < min_requests:
            continue
        read = v["pc_tokens"] + v["spc_tokens"]
        written = v["pc_write_tokens"] + v["spc_write_tokens"]
        priced = _prompt_cache_saving(one, at, read, written)
        if priced is None or priced[0] <= 0:
            continue
        saving, read_saving, premium = priced
        first = v["first_pc_requests"] + v["first_spc_requests"]
        item = _opportunity(one, "prompt_caching", saving, requests, first, window=window)
        item.action = _CACHE_HOW.get(
            one.provider.lower(), "Use the provider's prompt caching for the repeated part."
        )
        item.evidence = {
            "repeated_requests": requests,
            "repeats_of_system_prompts": v["spc_requests"],
            "repeats_of_whole_inputs": v["pc_requests"],
            "tokens_read_again": read,
            "tokens_written_to_cache": written,
            "cache_ttl_minutes": int(PROMPT_CACHE_TTL.total_seconds() // 60),
            "min_prompt_tokens": PROMPT_CACHE_MIN_TOKENS,
            "saving_at_cache_read_rate": pricing.money(read_saving),
            "cache_write_premium": pricing.money(premium),
            "method": "repeats within the cache TTL with cache_read_tokens = 0: their repeated "
            "tokens at the catalogue's cache-read rate instead of the input rate, less the "
            "cache-write premium of the request before each run",
        }
        out.append(item)
    return out


def prompt_trimming(
    found: dict[tuple[str, str, str, str], Slice],
    *,
    at: datetime,
    window: Window,
    min_requests: int,
) -> list[Opportunity]:
    out = []
    for one in found.values():
        v = one.values
        n = v["sp_requests"]
        if n < min_requests:
            continue
        cached = v["sp_cached_requests"]
        cost = _pricer(one, at)
        trim = min(TRIM_TOKENS, v["sp_tokens"] // n)
        uncached_cost = cost(input_tokens=trim * (n - cached))
        cached_cost = cost(input_tokens=trim * cached, cache_read_tokens=trim * cached)
        whole = cost(input_tokens=v["sp_tokens"])
        if uncached_cost is None or cached_cost is None or whole is None:
            continue
        saving = uncached_cost + cached_cost
        if saving <= 0:
            continue
        first = v["first_sp_requests"]
        item = _opportunity(one, "prompt_trimming", saving, n, first, window=window)
        item.action = (
            f"Trim the system prompt (about {v['sp_tokens'] // n:,} tokens a request): every "
            f"{TRIM_TOKENS:,} tokens cut save the amount shown."
        )
        item.evidence = {
            "requests_with_large_system_prompt": n,
            "mean_system_prompt_tokens": v["sp_tokens"] // n,
            "system_prompt_tokens": v["sp_tokens"],
            "served_from_cache": cached,
            "system_prompt_cost_at_input_rate": pricing.money(whole),
            "assumption": f"{trim:,} tokens trimmed from each request's system prompt, billed "
            "at the input rate (the cache-read rate where it was read from a cache)",
            "source": "provenance.system_context.system_prompt_tokens as the client reported it",
        }
        out.append(item)
    return out


def max_tokens(
    found: dict[tuple[str, str, str, str], Slice], *, window: Window, min_requests: int
) -> list[Opportunity]:
    out = []
    for one in found.values():
        v = one.values
        source = "reservations" if v["rs_requests"] >= min_requests else "metadata"
        prefix = "rs" if source == "reservations" else "mt"
        n, limit = v[f"{prefix}_requests"], v[f"{prefix}_limit_tokens"]
        used, largest = v[f"{prefix}_output_tokens"], v[f"{prefix}_max_output"]
        if n < min_requests or not limit or Decimal(used) > MAX_TOKENS_USED_SHARE * limit:
            continue
        suggested = max(1, math.ceil(largest * MAX_TOKENS_HEADROOM))
        first = v[f"first_{prefix}_requests"]
        item = _opportunity(one, "max_tokens", Decimal(0), n, first, window=window)
        item.saves_money = False
        item.action = (
            f"Lower max_tokens to about {suggested:,} (the largest output seen, {largest:,}, "
            f"plus 25 %): it frees budget headroom; providers bill generated tokens only."
        )
        freed = max(limit - suggested * n, 0)
        item.evidence = {
            "source": source,
            "requests": n,
            "mean_output_limit": limit // n,
            "mean_output_tokens": used // n,
            "largest_output": largest,
            "used_share": f"{Decimal(used) * 100 / limit:.1f}%",
            "suggested_max_tokens": suggested,
            "output_tokens_reserved": limit,
            "freed_headroom_tokens": freed,
            "money": "none: providers bill the tokens a model generates, not max_tokens; the "
            "benefit is reservation headroom (fewer checks refused while holds are open)",
        }
        if source == "reservations":
            item.evidence["cost_held_beyond_cost_charged"] = pricing.money(
                _units(v["rs_headroom_units"])
            )
        else:
            item.evidence["metadata_keys"] = list(MAX_TOKENS_KEYS)
        out.append(item)
    return out


def retry_waste(
    principal: Principal,
    window: Window,
    dims: Sequence[str],
    *,
    min_requests: int,
    skip: list[str],
) -> list[Opportunity]:
    """Retry storms attributed to the target of their original request (`min_requests`
    retries at least)."""
    found = provenance_selectors.retry_storms(
        principal,
        window.since,
        window.until,
        storm_min=RETRY_STORM_MIN,
        storm_window=RETRY_STORM_WINDOW,
        limit=10_000,
    )
    if not found["storms"] or not found["waste"]:
        return []
    ops = [s["operation"] for s in found["findings"]]
    where: dict[str, Group] = {}
    for chunk in range(0, len(ops), 500):
        for row in (
            usage_for_principal(principal)
            .filter(request_id__in=ops[chunk : chunk + 500])
            .values_list("request_id", *GROUP)
        ):
            where.setdefault(row[0], _group(row[1:]))
    by_group: dict[Group, list[dict[str, Any]]] = defaultdict(list)
    for storm in found["findings"]:
        by_group[where.get(storm["operation"], ("", "", "", "", "", "?"))].append(storm)
    measured = []
    for group, storms in by_group.items():
        mid = window.mid or window.until
        measured.append(
            (
                group,
                {
                    "storms": len(storms),
                    "retries": sum(s["retries"] for s in storms),
                    "first_retries": sum(s["retries"] for s in storms if _utc(s["first_at"]) < mid),
                    "waste_units": sum(_money_units(s["waste"]) for s in storms),
                },
            )
        )
    out = []
    for key, one in slices(measured, dims, skip=skip).items():
        v = one.values
        if v["retries"] < min_requests or not v["waste_units"]:
            continue
        waste, first = _units(v["waste_units"]), v["first_retries"]
        item = _opportunity(one, "retry_waste", waste, v["retries"], first, window=window)
        item.action = "Back off between retries and stop after a few; fix the failing step."
        storms = [
            s for group, ss in by_group.items() if key in _slice_keys(group, dims, skip) for s in ss
        ]
        storms.sort(key=lambda s: (-s["waste"], s["operation"]))
        item.evidence = {
            "retry_storms": v["storms"],
            "retries": v["retries"],
            "waste": pricing.money(_units(v["waste_units"])),
            "examples": [
                {
                    "operation": s["operation"],
                    "retries": s["retries"],
                    "waste": pricing.money(s["waste"]),
                }
                for s in storms[:FINDINGS_SHOWN]
            ],
        }
        out.append(item)
    return out


def _ceil_hour(at: datetime) -> datetime:
    floor = at.replace(minute=0, second=0, microsecond=0)
    return floor if floor == at else floor + timedelta(hours=1)


def _utc(at: datetime) -> datetime:
    # A raw query on SQLite answers a time without its zone (it is UTC).
    return at if at.tzinfo else at.replace(tzinfo=UTC)


# --- budgets ------------------------------------------------------------------------------------


def _used_share(period: BudgetPeriod) -> Decimal | None:
    """The larger share of its limits a closed period used (None: no limit recorded)."""
    shares = []
    if period.cost_limit:
        shares.append(period.cost_spent / period.cost_limit)
    if period.token_limit:
        shares.append(Decimal(period.tokens_spent) / period.token_limit)
    return max(shares) if shares else None


def budget_periods(
    principal: Principal, until: datetime
) -> dict[int, tuple[Budget, list[BudgetPeriod], dict[datetime, datetime]]]:
    """Each visible active budget's last PERIODS_LOOKED_AT periods closed by `until` (newest
    first), with when each was exhausted (its first exhausted alert)."""
    visible = budgets_for_principal(principal).filter(is_active=True)
    periods = list(
        BudgetPeriod.objects.filter(budget__in=visible, period_end__lte=until)
        .annotate(
            n=Over(RowNumber(), partition_by=[F("budget_id")], order_by=F("period_start").desc())
        )
        .filter(n__lte=PERIODS_LOOKED_AT)
        .select_related("budget")
        .order_by("budget_id", "-period_start")
    )
    out: dict[int, tuple[Budget, list[BudgetPeriod], dict[datetime, datetime]]] = {}
    for period in periods:
        out.setdefault(period.budget_id, (period.budget, [], {}))[1].append(period)
    starts = {p.period_start for _b, ps, _e in out.values() for p in ps}
    alerts = BudgetAlert.objects.filter(
        budget_id__in=list(out), kind=BudgetAlert.Kind.EXHAUSTED, period_start__in=list(starts)
    ).values_list("budget_id", "period_start", "created_at")
    for budget_id, start, at in alerts:
        exhausted = out[budget_id][2]
        if start not in exhausted or at < exhausted[start]:
            exhausted[start] = at
    return out


def _period_row(period: BudgetPeriod, exhausted_at: datetime | None) -> dict[str, Any]:
    share = _used_share(period)
    length = (period.period_end - period.period_start).total_seconds()
    row: dict[str, Any] = {
        "period_start": period.period_start.isoformat(),
        "period_end": period.period_end.isoformat(),
        "cost_spent": pricing.money(period.cost_spent),
        "cost_limit": pricing.money(period.cost_limit) if period.cost_limit is not None else None,
        "tokens_spent": period.tokens_spent,
        "token_limit": period.token_limit,
        "used": f"{share * 100:.1f}%" if share is not None else None,
    }
    if exhausted_at is not None:
        elapsed = Decimal((exhausted_at - period.period_start).total_seconds()) / Decimal(length)
        row["exhausted_at"] = exhausted_at.isoformat()
        row["exhausted_after"] = f"{min(elapsed, Decimal(1)) * 100:.1f}% of the period"
    return row


def budget_recommendations(principal: Principal, until: datetime) -> list[Opportunity]:
    out = []
    for budget, periods, exhausted in budget_periods(principal, until).values():
        if len(periods) < MIN_PERIODS:
            continue
        item = _exhausted_early(budget, periods[:EARLY_OF], exhausted) or _underused(
            budget, periods, exhausted
        )
        if item is not None:
            item.saves_money = False
            item.value = str(budget.pk)
            item.team_id, item.project_id = budget.team_id, budget.project_id
            out.append(item)
    return out


def _budget_evidence(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> dict[str, Any]:
    return {
        "budget_id": budget.pk,
        "budget": budget.name,
        "scope": budget.scope if not budget.scope_id else f"{budget.scope} {budget.scope_id}",
        "period": budget.period,
        "periods_looked_at": len(looked),
        "periods": [_period_row(p, exhausted.get(p.period_start)) for p in looked],
        "money": "none: a control recommendation (the limit changes, not the spend)",
    }


def _budget_window(looked: list[BudgetPeriod]) -> Window:
    return Window(looked[-1].period_start, looked[0].period_end, None, "budget periods")


def _exhausted_early(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> Opportunity | None:
    """Ran out before EARLY_SHARE of the period in >= EARLY_PERIODS of the last EARLY_OF."""
    early = 0
    for p in looked:
        at = exhausted.get(p.period_start)
        length = Decimal((p.period_end - p.period_start).total_seconds())
        if at is not None and Decimal((at - p.period_start).total_seconds()) < EARLY_SHARE * length:
            early += 1
    if early < EARLY_PERIODS:
        return None
    median = sorted(p.cost_spent for p in looked)[len(looked) // 2]
    return Opportunity(
        kind="budget_exhausted_early",
        dimension="budget",
        target=f"budget #{budget.pk}",
        savings=Decimal(0),
        requests=sum(p.requests for p in looked),
        action=(
            f"Raise the limit of {budget.name!r} (median spend of a period: "
            f"{pricing.money(median)}) or cut its usage (see its other recommendations): it ran "
            f"out before {EARLY_SHARE * 100:.0f} % of the period in {early} of the last "
            f"{len(looked)} periods."
        ),
        evidence={**_budget_evidence(budget, looked, exhausted), "exhausted_early": early},
        window=_budget_window(looked),
        confidence="high" if early == len(looked) == EARLY_OF else "medium",
    )


def _underused(
    budget: Budget, looked: list[BudgetPeriod], exhausted: dict[datetime, datetime]
) -> Opportunity | None:
    """Used less than UNDERUSED_SHARE of its limits in every one of >= MIN_PERIODS periods."""
    shares = [_used_share(p) for p in looked]
    if len(looked) < MIN_PERIODS or any(s is None or s >= UNDERUSED_SHARE for s in shares):
        return None
    largest = max(s for s in shares if s is not None)
    suggested = []
    if budget.cost_limit is not None:
        peak = max(p.cost_spent for p in looked)
        suggested.append(f"cost {pricing.money((peak * 2).quantize(CENT, ROUND_HALF_UP))}")
    if budget.token_limit is not None:
        suggested.append(f"{max(p.tokens_spent for p in looked) * 2:,} tokens")
    return Opportunity(
        kind="budget_underused",
        dimension="budget",
        target=f"budget #{budget.pk}",
        savings=Decimal(0),
        requests=sum(p.requests for p in looked),
        action=(
            f"Lower the limit of {budget.name!r} to about {' and '.join(suggested)} (twice the "
            f"largest period): it never used {UNDERUSED_SHARE * 100:.0f} % of it in the last "
            f"{len(looked)} periods, so it would not stop a runaway early."
        ),
        evidence={
            **_budget_evidence(budget, looked, exhausted),
            "largest_share_used": f"{largest * 100:.1f}%",
        },
        window=_budget_window(looked),
        confidence="high" if len(looked) >= PERIODS_LOOKED_AT else "medium",
    )


# --- everything --------------------------------------------------------------------------------


def find(
    principal: Principal,
    aggregate: Aggregate,
    *,
    since: datetime,
    until: datetime,
    filters: dict[str, str],
    kinds: Iterable[str] = REPORT_KINDS,
    dims: Sequence[str] = ("model",),
    min_requests: int = MIN_REQUESTS,
    sample: bool = False,
) -> Found:
    """Every opportunity of `kinds` over [since, until) the caller may see, largest saving
    first, per target of `dims`. `aggregate(group_by, since=, until=)` sums rollups in the
    caller's scope and `filters`. The ledger is read over [since, until), or with `sample` over
    `sample_window`. Retry storms follow edges across requests, and budgets have no attribution,
    so both are looked for only without filters."""
    with _tuned():
        items = _find(
            principal,
            aggregate,
            since=since,
            until=until,
            filters=filters,
            wanted=set(kinds),
            dims=dims,
            min_requests=min_requests,
            sample=sample,
        )
    items.sort(key=lambda o: (-o.savings, o.kind, o.dimension, o.target))
    source = "rollups+ledger"  # rollups for volumes; the ledger for repeated inputs and retries
    return Found(items, source)


@contextmanager
def _tuned() -> Iterator[None]:
    """PostgreSQL: these statements sort and group a few hundred thousand rows once; compiling
    them (JIT) costs more than running them, and 4 MB of work_mem sends their sorts to disk."""
    if connection.vendor != "postgresql":
        yield
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")
        cursor.execute("SET LOCAL work_mem = '64MB'")
        yield


def _find(
    principal: Principal,
    aggregate: Aggregate,
    *,
    since: datetime,
    until: datetime,
    filters: dict[str, str],
    wanted: set[str],
    dims: Sequence[str],
    min_requests: int,
    sample: bool,
) -> list[Opportunity]:
    skip = ["team"] if principal.team_id else []  # a team key's team is all it sees
    items: list[Opportunity] = []
    ledger: Window | None = None
    if wanted & LEDGER_KINDS or (sample and set(dims) & FINE_TARGETS):
        ledger = (
            sample_window(principal, since, until, filters) if sample else _ledger(since, until)
        )
    if wanted & {"cheaper_model", "error_waste"}:
        whole = _halves(since, until, "rollups")
        parts = [(whole, [d for d in dims if d not in FINE_TARGETS])]
        fine = [d for d in dims if d in FINE_TARGETS]
        if fine and sample and ledger is not None:
            # The fine rollup over 30 days is millions of rows: read it over the ledger window.
            start = min(_ceil_hour(ledger.since), ledger.mid or ledger.until)  # whole hours
            parts.append((Window(start, ledger.until, ledger.mid, "rollups", ledger.capped), fine))
        elif fine:
            parts[0] = (whole, list(dims))
        for window, part_dims in parts:
            if not part_dims:
                continue
            found = slices(rollup_groups(aggregate, window, part_dims), part_dims, skip=skip)
            if "cheaper_model" in wanted:
                items += cheaper_models(found, at=until, window=window, min_requests=min_requests)
            if "error_waste" in wanted:
                items += error_waste(found, window=window, min_requests=min_requests)
    if wanted & LEDGER_KINDS and ledger is not None:
        items += _ledger_kinds(
            principal,
            ledger,
            filters,
            wanted=wanted,
            dims=dims,
            skip=skip,
            at=until,
            min_requests=min_requests,
            retry_min=min_requests if sample else 1,
        )
    if wanted & set(BUDGET_KINDS) and not filters:
        items += [b for b in budget_recommendations(principal, until) if b.kind in wanted]
    return items


FINE_TARGETS = {"feature", "agent"}  # only the fine rollup holds them
LEDGER_KINDS = {"caching", "prompt_caching", "prompt_trimming", "max_tokens", "retry_waste"}


def _ledger(since: datetime, until: datetime) -> Window | None:
    cutoff = rollups.purged_before()
    start = max(since, cutoff) if cutoff else since
    return _halves(start, until, "ledger") if start < until else None


def _ledger_kinds(
    principal: Principal,
    window: Window,
    filters: dict[str, str],
    *,
    wanted: set[str],
    dims: Sequence[str],
    skip: list[str],
    at: datetime,
    min_requests: int,
    retry_min: int,
) -> list[Opportunity]:
    items: list[Opportunity] = []
    measured: list[tuple[Group, Measures]] = []
    hashes: list[tuple[str, Group, Measures]] = []
    if wanted & {"caching", "prompt_caching"}:
        hashes = repeated_inputs(principal, window, filters)
        measured += [(g, v) for _h, g, v in hashes]
    if wanted & {"prompt_caching", "prompt_trimming", "max_tokens"}:
        measured += system_prompts(principal, window, filters)
    held: list[tuple[Group, Measures]] = []
    if "max_tokens" in wanted:
        held = reservations(principal, window, filters)
        measured += held
    if measured:
        found = slices(measured, dims, skip=skip)
        for input_hash, group, values in hashes:
            for key in _slice_keys(group, dims, skip):
                into = found[key].hashes.setdefault(input_hash, defaultdict(int))
                for name, v in values.items():
                    into[name] += v
        if "caching" in wanted:
            items += caching(found, window=window, min_requests=min_requests)
        if "prompt_caching" in wanted:
            items += prompt_caching(found, at=at, window=window, min_requests=min_requests)
        if "prompt_trimming" in wanted:
            items += prompt_trimming(found, at=at, window=window, min_requests=min_requests)
        if "max_tokens" in wanted:
            rs_window = Window(window.since, window.until, window.mid, "ledger+reservations")
            items += max_tokens(found, window=rs_window if held else window,
                                min_requests=min_requests)  # fmt: skip
    if "retry_waste" in wanted and not filters:
        items += retry_waste(principal, window, dims, min_requests=retry_min, skip=skip)
    return items


def _slice_keys(
    group: Group, dims: Sequence[str], skip: list[str]
) -> list[tuple[str, str, str, str]]:
    team, _project, feature, agent, provider, model = group
    by = {"model": "", "team": team, "feature": feature, "agent": agent}
    return [(d, by[d], provider, model) for d in dims if d not in skip and (d == "model" or by[d])]
