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

The package: `find` (here) runs the kinds of rollup_kinds, ledger_kinds (over the measures of
ledger_reads) and budget_kinds; common holds the thresholds, Window / Opportunity / Found, the
prices of volumes and the slices. Callers import from reporting.opportunities.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from django.db import connection, transaction

from reporting.opportunities.budget_kinds import budget_periods, budget_recommendations
from reporting.opportunities.common import (
    ALL_KINDS,
    BUDGET_KINDS,
    CENT,
    CHEAPER_TIER,
    COARSE_GROUP,
    DIMENSIONS,
    DUPLICATE_WINDOW,
    EARLY_OF,
    EARLY_PERIODS,
    EARLY_SHARE,
    FINDINGS_SHOWN,
    GROUP,
    HIGH_EVIDENCE,
    LARGE_SYSTEM_PROMPT,
    MAX_COUNT,
    MAX_TOKENS_HEADROOM,
    MAX_TOKENS_KEYS,
    MAX_TOKENS_USED_SHARE,
    MEDIUM_EVIDENCE,
    MIN_PERIODS,
    MIN_REQUESTS,
    MONTH,
    PERIODS_LOOKED_AT,
    PROMPT_CACHE_MIN_TOKENS,
    PROMPT_CACHE_TTL,
    REPORT_KINDS,
    RETRY_STORM_MIN,
    RETRY_STORM_WINDOW,
    SAMPLE_DAYS,
    SAMPLE_ROWS,
    STABLE_HALF,
    SYSTEM_PROMPT_KEYS,
    TRAFFIC_KINDS,
    TRIM_TOKENS,
    UNDERUSED_SHARE,
    Aggregate,
    Found,
    Group,
    Measures,
    Opportunity,
    Slice,
    Window,
    _ceil_hour,
    _halves,
    cache_rates,
    cheaper_tier,
    confidence,
    slices,
    volume_cost,
)
from reporting.opportunities.ledger_kinds import (
    _ledger_kinds,
    caching,
    max_tokens,
    prompt_caching,
    prompt_trimming,
    retry_waste,
)
from reporting.opportunities.ledger_reads import (
    repeated_inputs,
    reservations,
    sample_window,
    system_prompts,
)
from reporting.opportunities.rollup_kinds import cheaper_models, error_waste, rollup_groups
from tokenmgr_project.core.principal import Principal
from usage import rollups

__all__ = [
    "ALL_KINDS",
    "BUDGET_KINDS",
    "CENT",
    "CHEAPER_TIER",
    "COARSE_GROUP",
    "DIMENSIONS",
    "DUPLICATE_WINDOW",
    "EARLY_OF",
    "EARLY_PERIODS",
    "EARLY_SHARE",
    "FINDINGS_SHOWN",
    "FINE_TARGETS",
    "GROUP",
    "HIGH_EVIDENCE",
    "LARGE_SYSTEM_PROMPT",
    "LEDGER_KINDS",
    "MAX_COUNT",
    "MAX_TOKENS_HEADROOM",
    "MAX_TOKENS_KEYS",
    "MAX_TOKENS_USED_SHARE",
    "MEDIUM_EVIDENCE",
    "MIN_PERIODS",
    "MIN_REQUESTS",
    "MONTH",
    "PERIODS_LOOKED_AT",
    "PROMPT_CACHE_MIN_TOKENS",
    "PROMPT_CACHE_TTL",
    "REPORT_KINDS",
    "RETRY_STORM_MIN",
    "RETRY_STORM_WINDOW",
    "SAMPLE_DAYS",
    "SAMPLE_ROWS",
    "STABLE_HALF",
    "SYSTEM_PROMPT_KEYS",
    "TRAFFIC_KINDS",
    "TRIM_TOKENS",
    "UNDERUSED_SHARE",
    "Aggregate",
    "Found",
    "Group",
    "Measures",
    "Opportunity",
    "Slice",
    "Window",
    "budget_periods",
    "budget_recommendations",
    "cache_rates",
    "caching",
    "cheaper_models",
    "cheaper_tier",
    "confidence",
    "error_waste",
    "find",
    "max_tokens",
    "prompt_caching",
    "prompt_trimming",
    "repeated_inputs",
    "reservations",
    "retry_waste",
    "rollup_groups",
    "sample_window",
    "slices",
    "system_prompts",
    "volume_cost",
]


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
