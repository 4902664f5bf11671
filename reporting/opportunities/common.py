"""The opportunities' common ground: the thresholds and kinds, the evidence window and its
confidence, Opportunity / Found, catalogue prices of token volumes, and the slices (a target's
groups summed) every kind is found in."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from usage import pricing, rollups

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


def _ceil_hour(at: datetime) -> datetime:
    floor = at.replace(minute=0, second=0, microsecond=0)
    return floor if floor == at else floor + timedelta(hours=1)


def _utc(at: datetime) -> datetime:
    # A raw query on SQLite answers a time without its zone (it is UTC).
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _slice_keys(
    group: Group, dims: Sequence[str], skip: list[str]
) -> list[tuple[str, str, str, str]]:
    team, _project, feature, agent, provider, model = group
    by = {"model": "", "team": team, "feature": feature, "agent": agent}
    return [(d, by[d], provider, model) for d in dims if d not in skip and (d == "model" or by[d])]
