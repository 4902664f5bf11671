#!/usr/bin/env python
"""A realistic 10,000,000-row ledger on PostgreSQL, loaded with COPY, for the 10M-row benchmarks
(bench/reports.py) -- repeatable by anyone: the same seed, row count and range give the same
rows (times are relative to the moment of the run).

    .venv/bin/python bench/gen_ledger.py                    # 10M rows into tokenmgr_bench_10m
    .venv/bin/python bench/gen_ledger.py --reuse            # keep it if it already holds >= N
    .venv/bin/python bench/gen_ledger.py --rows 200000 --db tokenmgr_bench_small

The database is kept at the end (it is the point). Without --reuse an existing database of that
name is dropped and rebuilt; with --reuse one that holds >= --rows rows (counted from the
hourly rollup, which the ledger's trigger keeps equal to it) is only migrated (a no-op when
current) and kept, and the command exits at once.

What it does (127.0.0.1 only):
  1. creates database --db and migrates it (`manage.py migrate`, DATABASE_URL);
  2. builds the world from random.Random(--seed): 20 teams, 60 projects (each in one team), 600
     users (each in one project; every project has a heavy service account), 30 features
     (2-5 per project), 40 agents (1-3 per feature, plus agentless calls), 10 task types (each
     with its own prompt/answer size; 1-2 per agent) and 12 catalogue models of openai,
     anthropic and google (gpt-4o-mini, gpt-4o, gpt-4.1, gpt-4.1-mini, o3-mini,
     claude-3-5-sonnet, claude-3-5-haiku, claude-3-7-sonnet, claude-3-opus, gemini-2.0-flash,
     gemini-1.5-flash, gemini-1.5-pro; each team uses a subset, and each agent (or feature's
     plain calls) is configured per project with one of them plus a fallback for 15 % of its
     calls), all Zipf-skewed, so a few teams, users and models carry most of the traffic; 1 %
     of requests name a model the catalogue does not know (unpriced: cost 0);
  3. spreads --rows rows over the last --days days (ending now) by UTC hour, with a diurnal
     curve (peak ~15:00 UTC), quieter weekends, 30 % growth over the range and hourly noise;
     per row: lognormal token counts per task type, 2 % errors (a rate-limited call bills no
     tokens), prompt-cache reads on ~30 % of openai/anthropic calls and cache writes on 8 % of
     anthropic ones, latency from the model's speed and the answer length (3 % unknown), an
     input_hash on 25 % (40 % of those repeat a pool of common prompts), conversation and
     workflow ids on part of the traffic, 0.5 % estimated; tenant "org", time-ordered request
     ids (as UUIDv7/ULID ids are: random ones would make this a benchmark of random B-tree
     page writes, which ingest_batch.py measures); costs are exact products of token counts
     and the genai-prices catalogue's prices, rounded once to the ledger's 10 places (half up,
     as usage.pricing does);
  4. COPYs whole hours at a time, about --chunk-rows rows per COPY statement, each its own
     transaction (so the rollup trigger's transition table stays bounded), from --connections
     connections, the COPY text built by --procs generator processes while earlier chunks are
     being written (PostgreSQL's index upkeep, not the text, is what takes the time);
  5. the reference, in the same run: the first chunk COPYed into `CREATE TABLE ... (LIKE
     usage_tokenusage INCLUDING ALL)` (same indexes and constraints, no trigger), then the
     same chunk into the empty ledger, each after waiting (at most --quiet-wait s) for an idle
     machine and a CHECKPOINT: the difference is what the rollup trigger costs; the CPU table
     of the load says how much other processes took meanwhile;
  6. VACUUM (ANALYZE) of the ledger and both rollup tables; their rows and sizes;
  7. checks rollups = ledger: SUM(requests), SUM(input_tokens), SUM(cost_units) of
     usage_usagerollup and usage_modelrollup against the ledger's count(*), sum(input_tokens) and
     sum(round(cost * 1e10)) -- PASS/FAIL (exit status 1 on FAIL).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import itertools
import math
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

sys.path.insert(1, str(h.REPO))  # usage.rows: plain Python, no Django needed
from usage.rows import ROW_COLUMNS, decode_line, encode_line

DB_NAME = "tokenmgr_bench_10m"
LEDGER = "usage_tokenusage"
ROLLUPS = ("usage_modelrollup", "usage_usagerollup")
REF_TABLE = "bench_copy_reference"
UNITS_PER_USD = 10**10  # the ledger's scale (TokenUsage.cost: 10 decimal places)
SUB_PER_UNIT = 100  # costs are computed in 1e-12 USD (prices have <= 6 decimals per Mtok)
MAX_INPUT_TOKENS = 120_000  # under every tier start of the models used (128k)
HOUR_US = 3_600_000_000

TEAMS = (
    "payments", "search", "support", "growth", "platform", "data", "mobile", "web", "security",
    "risk", "ads", "marketing", "sales", "finance", "legal", "people", "infra", "research",
    "ops", "docs",
)  # fmt: skip
PROJECT_SUFFIXES = (
    "api", "assistant", "etl", "bot", "insights", "console", "sync", "agent", "portal", "batch",
)  # fmt: skip
FEATURES = (
    "chat", "search-answers", "ticket-triage", "email-drafts", "summaries", "code-review",
    "code-assist", "doc-qa", "translation", "moderation", "lead-scoring", "report-writer",
    "invoice-extract", "contract-review", "kb-builder", "faq-bot", "sql-assist", "alert-explain",
    "meeting-notes", "product-copy", "ad-variants", "churn-notes", "onboarding-bot",
    "fraud-review", "log-triage", "release-notes", "test-gen", "spec-writer", "classifier",
    "data-cleanup",
)  # fmt: skip
AGENT_ROLES = ("router", "planner", "retriever", "writer", "reviewer", "coder", "summarizer",
               "triage")  # fmt: skip
AGENT_VARIANTS = ("v1", "v2", "lite", "pro", "beta")
# name: (median input tokens, median output tokens); lognormal around them.
TASK_TYPES = {
    "chat": (1200, 250), "summarize": (4500, 350), "classify": (450, 8), "extract": (2500, 180),
    "codegen": (3000, 700), "rag_answer": (6000, 400), "translate": (900, 850),
    "moderation": (350, 5), "planning": (1800, 450), "review": (3500, 500),
}  # fmt: skip
CONVERSATIONAL = frozenset({"chat", "rag_answer", "codegen"})
# provider, model (as clients name it), time to first token ms, ms per output token; Zipf rank
# order: the first is the most used.
MODELS = (
    ("openai", "gpt-4o-mini", 300, 7), ("anthropic", "claude-3-5-sonnet", 600, 14),
    ("openai", "gpt-4o", 500, 13), ("google", "gemini-2.0-flash", 250, 5),
    ("anthropic", "claude-3-5-haiku", 350, 8), ("openai", "gpt-4.1-mini", 300, 7),
    ("google", "gemini-1.5-flash", 250, 6), ("openai", "gpt-4.1", 500, 12),
    ("anthropic", "claude-3-7-sonnet", 700, 15), ("openai", "o3-mini", 1500, 10),
    ("google", "gemini-1.5-pro", 700, 14), ("anthropic", "claude-3-opus", 1000, 30),
)  # fmt: skip
# Models the catalogue does not know (fine-tunes, self-hosted): unpriced, cost 0.
UNKNOWN_MODELS = (("openai", "acme-support-ft-v3", 400, 9), ("", "acme-internal-v2", 300, 6))
UNPRICED_SHARE = 0.01
ERROR_SHARE = 0.02
ERROR_TYPES = ("rate_limit", "timeout", "server_error", "context_length_exceeded",
               "invalid_request")  # fmt: skip
ERROR_WEIGHTS = (0.4, 0.25, 0.2, 0.1, 0.05)
HASH_SHARE, HASH_REPEAT_SHARE, HASH_POOL = 0.25, 0.4, 20_000


def zipf(n: int, s: float = 1.1) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def pick_weighted(rng: random.Random, items: list[Any], weights: list[float], k: int) -> list[Any]:
    """k distinct items, drawn by weight."""
    items, weights, out = list(items), list(weights), []
    for _ in range(min(k, len(items))):
        i = rng.choices(range(len(items)), weights=weights)[0]
        out.append(items.pop(i))
        weights.pop(i)
    return out


def sub_units_per_token(price: Any) -> int:
    """A catalogue price (USD per million tokens) as 1e-12 USD per token, exactly."""
    if hasattr(price, "tiers"):  # TieredPrices: the base applies below the first tier
        if any(t.start <= MAX_INPUT_TOKENS for t in price.tiers):
            raise RuntimeError(f"a price tier starts under {MAX_INPUT_TOKENS} tokens: {price}")
        price = price.base
    value = Decimal(price) * 10**6
    if value != value.to_integral_value():
        raise RuntimeError(f"price {price} has more than 6 decimals per million tokens")
    return int(value)


def catalogue_prices() -> dict[str, tuple[str, tuple[int, int, int, int] | None]]:
    """model -> (price_ref, (input, cache read, cache write, output) 1e-12 USD per token), or
    (\"\", None) for an unknown model; fails if a priced model is missing from the catalogue or
    an unknown one is in it."""
    import genai_prices
    from genai_prices.data_snapshot import get_snapshot

    snapshot, now = get_snapshot(), datetime.now(UTC)
    out: dict[str, tuple[str, tuple[int, int, int, int] | None]] = {}
    for provider, model, *_ in MODELS + UNKNOWN_MODELS:
        try:
            found = snapshot.find_provider_model(model, None, provider or None, None)
        except LookupError:
            found = None
        unknown = any(m == model for _p, m, *_ in UNKNOWN_MODELS)
        if (found is None) != unknown:
            raise RuntimeError(f"{provider}/{model}: catalogue lookup gave {found!r}")
        if found is None:
            out[model] = ("", None)
            continue
        prices = found[1].get_prices(now)
        p_in = sub_units_per_token(prices.input_mtok)
        # A cache price the catalogue lacks bills those tokens at the input price (usage.pricing)
        p_cr = sub_units_per_token(prices.cache_read_mtok) if prices.cache_read_mtok else p_in
        p_cw = sub_units_per_token(prices.cache_write_mtok) if prices.cache_write_mtok else p_in
        p_out = sub_units_per_token(prices.output_mtok)
        ref = f"genai-prices {genai_prices.__version__}: {found[0].id}/{found[1].id}"
        out[model] = (ref, (p_in, p_cr, p_cw, p_out))
    return out


@dataclass(frozen=True, slots=True)
class Combo:
    """One way a request can be attributed, priced and shaped (a row draws one by weight)."""

    head: str  # "provider\tmodel" (COPY text)
    attribution: str  # "team\tproject\tuser\tfeature\tagent\ttask_type"
    mu_in: float
    mu_out: float
    prices: tuple[int, int, int, int] | None
    priced: str  # "catalogue\t<price_ref>\tf" or "unpriced\t\tt"
    cache_share: float
    cache_write_share: float
    ttft_ms: int
    ms_per_token: int
    conversational: bool
    user_index: int
    agent_index: int  # -1: no agent


@dataclass(slots=True)
class World:
    combos: list[Combo]
    cum_weights: list[float]
    hour0_us: int  # start of the first UTC hour slot (epoch microseconds)
    start_us: int  # the range: [start_us, end_us)
    end_us: int
    slot_counts: list[int]  # rows per UTC hour slot
    slot_first: list[int]  # index of each slot's first row
    hash_pool: list[str]
    seed: int
    cardinality: dict[str, int]
    shares: dict[str, float]


def _norm(ws: list[float]) -> list[float]:
    total = sum(ws)
    return [w / total for w in ws]


def _spread(
    rng: random.Random, items: list[str], groups: list[str], k: tuple[int, int], s: float
) -> dict[str, list[str]]:
    """k[0]..k[1] distinct items per group, every item in at least one group, the Zipf-popular
    ones (items' order, exponent s) in more groups; each group's list most popular first."""
    weights = zipf(len(items), s)
    rank = {item: i for i, item in enumerate(items)}
    deck = list(items)
    rng.shuffle(deck)
    out: dict[str, list[str]] = {}
    for g in groups:
        n = rng.randint(*k)
        chosen = [deck.pop() for _ in range(min(n, len(deck)))]
        rest = [(i, w) for i, w in zip(items, weights, strict=True) if i not in chosen]
        chosen += pick_weighted(rng, [i for i, _ in rest], [w for _, w in rest], n - len(chosen))
        out[g] = chosen
    for item in deck:  # more items than the groups' first picks: they join a random group
        out[rng.choice(groups)].append(item)
    return {g: sorted(chosen, key=rank.__getitem__) for g, chosen in out.items()}


def _shares(items: list[Any], s: float) -> list[tuple[Any, float]]:
    """items with Zipf shares (in the order given) that add up to 1."""
    return list(zip(items, _norm(zipf(len(items), s)), strict=True))


def _organisation(rng: random.Random) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Teams, and users as (team, project, share of all traffic): 60 projects (one per team, 40
    more by team weight), 600 users (a service account per project taking ~40 % of it, people
    sharing the rest)."""
    teams = list(TEAMS)
    rng.shuffle(teams)
    team_share = dict(_shares(teams, 1.1))
    projects_of: dict[str, list[str]] = {t: [f"{t}-{PROJECT_SUFFIXES[0]}"] for t in teams}
    for t in rng.choices(teams, weights=[team_share[t] for t in teams], k=40):
        if len(projects_of[t]) < len(PROJECT_SUFFIXES):
            projects_of[t].append(f"{t}-{PROJECT_SUFFIXES[len(projects_of[t])]}")
    project_share = {
        (t, p): team_share[t] * w for t in teams for p, w in _shares(projects_of[t], 1.2)
    }
    keys = list(project_share)
    people: dict[tuple[str, str], list[str]] = {k: [] for k in keys}
    for k in rng.choices(keys, weights=list(project_share.values()), k=600 - len(keys)):
        people[k].append(f"user-{sum(map(len, people.values())):04d}")
    users = []
    for (t, p), share in project_share.items():
        service = 0.4 if people[(t, p)] else 1.0
        users.append((t, p, f"svc-{p}", share * service))
        users += [(t, p, u, share * (1 - service) * w) for u, w in _shares(people[(t, p)], 1.1)]
    return teams, [(f"{t}\t{p}\t{u}", t, w) for t, p, u, w in users]


def build_world(seed: int, n_rows: int, days: float, end: datetime) -> World:
    rng = random.Random(seed)
    prices = catalogue_prices()
    teams, users = _organisation(rng)

    # what people do: features per project, agents per feature, task types per agent
    agents = [f"{role}-{v}" for role in AGENT_ROLES for v in AGENT_VARIANTS]
    rng.shuffle(agents)
    tasks = list(TASK_TYPES)
    agent_tasks: dict[str, list[tuple[str, float]]] = {}
    for a in agents:
        chosen = pick_weighted(rng, tasks, zipf(len(tasks), 0.7), rng.choice((1, 1, 2)))
        agent_tasks[a] = list(zip(chosen, (1.0,) if len(chosen) == 1 else (0.8, 0.2), strict=True))
    feature_agents: dict[str, list[tuple[tuple[str, str], float]]] = {}
    for f, chosen in _spread(rng, agents, list(FEATURES), (1, 3), 0.9).items():
        # agentless calls (a plain API call from the product) do the feature's own task
        agentless = ("", rng.choice(("chat", "summarize", "classify", "extract")))
        feature_agents[f] = [(agentless, 0.15)] + [
            ((a, ""), 0.85 * w) for a, w in _shares(chosen, 1.0)
        ]
    projects = list(dict.fromkeys(who.split("\t")[1] for who, *_ in users))
    project_features = {
        p: _shares(chosen, 1.0)
        for p, chosen in _spread(rng, list(FEATURES), projects, (2, 5), 0.9).items()
    }
    # which models each team uses: the 3 most used ones and 1-6 others
    model_w = zipf(len(MODELS), 1.1)
    team_models: dict[str, tuple[list[int], list[float]]] = {}
    for t in teams:
        others = pick_weighted(rng, list(range(3, len(MODELS))), model_w[3:], rng.randint(1, 6))
        chosen = [0, 1, 2, *sorted(others)]
        team_models[t] = (chosen, [model_w[m] * rng.uniform(0.5, 1.5) for m in chosen])
    # An agent (or a feature's plain calls) is configured with one of its team's models in
    # each project, with a fallback model for 15 % of its calls; 1 % of all calls go to a model
    # the catalogue does not know.
    Mix = list[tuple[tuple[str, str, int, int], float]]
    configured: dict[tuple[str, str, str], Mix] = {}

    def models_of(team: str, project: str, feature: str, agent: str) -> Mix:
        key = (project, feature, agent)
        if key not in configured:
            ms, ws = team_models[team]
            primary, fallback = pick_weighted(rng, ms, ws, 2)
            priced = 1 - UNPRICED_SHARE
            configured[key] = [(MODELS[primary], 0.85 * priced), (MODELS[fallback], 0.15 * priced)]
            configured[key] += [(m, UNPRICED_SHARE / len(UNKNOWN_MODELS)) for m in UNKNOWN_MODELS]
        return configured[key]

    combos: list[Combo] = []
    weights: list[float] = []
    agent_index = {a: i for i, a in enumerate(agents)}
    for u, (who, team, uw) in enumerate(users):
        project = who.split("\t")[1]
        for feature, fw in project_features[project]:
            for (agent, own_task), aw in feature_agents[feature]:
                task_mix = agent_tasks[agent] if agent else [(own_task, 1.0)]
                model_mix = models_of(team, project, feature, agent)
                for task, tw in task_mix:
                    med_in, med_out = TASK_TYPES[task]
                    for (provider, model, ttft, mspt), mw in model_mix:
                        ref, price = prices[model]
                        cache = 0.3 if provider in ("openai", "anthropic") else 0.15
                        combos.append(
                            Combo(
                                head=f"{provider}\t{model}",
                                attribution=f"{who}\t{feature}\t{agent}\t{task}",
                                mu_in=math.log(med_in),
                                mu_out=math.log(med_out),
                                prices=price,
                                priced=f"catalogue\t{ref}\tf" if price else "unpriced\t\tt",
                                cache_share=cache if price else 0.0,
                                cache_write_share=0.08 if provider == "anthropic" else 0.0,
                                ttft_ms=ttft,
                                ms_per_token=mspt,
                                conversational=task in CONVERSATIONAL,
                                user_index=u,
                                agent_index=agent_index[agent] if agent else -1,
                            )
                        )
                        weights.append(uw * fw * aw * tw * mw)
    cum = list(itertools.accumulate(weights))
    end_us = int(end.timestamp() * 1_000_000)
    start_us = end_us - int(days * 86400 * 1_000_000)
    hour0_us = start_us - start_us % HOUR_US
    counts = _hourly_counts(rng, n_rows, hour0_us, start_us, end_us)
    return World(
        combos=combos,
        cum_weights=cum,
        hour0_us=hour0_us,
        start_us=start_us,
        end_us=end_us,
        slot_counts=counts,
        slot_first=[0, *itertools.accumulate(counts)][:-1],
        hash_pool=[f"{rng.getrandbits(256):064x}" for _ in range(HASH_POOL)],
        seed=seed,
        cardinality={
            "teams": len(teams),
            "projects": len(project_features),
            "users": len(users),
            "features": len({f for pf in project_features.values() for f, _ in pf}),
            "agents": len({c.attribution.split("\t")[4] for c in combos} - {""}),
            "task types": len({c.attribution.split("\t")[5] for c in combos}),
            "models": len({c.head for c in combos}),
            "weighted combinations": len(combos),
        },
        shares=_skew(combos, weights),
    )


def _hourly_counts(
    rng: random.Random, n_rows: int, hour0_us: int, start_us: int, end_us: int
) -> list[int]:
    """Rows per UTC hour from hour0_us: a diurnal curve peaking ~15:00 UTC (Europe and the US
    both at work) with a smaller morning bump, weekends at 40 %, 30 % growth over the range,
    hourly noise; the first and last hours only for the part inside [start_us, end_us)."""
    n_slots = -(-(end_us - hour0_us) // HOUR_US)
    slot_w = []
    for k in range(n_slots):
        lo, hi = max(start_us, hour0_us + k * HOUR_US), min(end_us, hour0_us + (k + 1) * HOUR_US)
        at = datetime.fromtimestamp((hour0_us + k * HOUR_US) / 1e6, UTC)
        diurnal = 0.25 + math.exp(-(((at.hour - 15) / 4.5) ** 2))
        diurnal += 0.35 * math.exp(-(((at.hour - 8) / 3) ** 2))
        weekly = 0.4 if at.weekday() >= 5 else 1.0
        growth = 1 + 0.3 * k / n_slots
        slot_w.append(diurnal * weekly * growth * rng.lognormvariate(0, 0.12) * (hi - lo))
    cum = list(itertools.accumulate(slot_w))
    upto = [round(n_rows * c / cum[-1]) for c in cum]
    return [b - a for a, b in zip([0, *upto[:-1]], upto, strict=True)]


def _skew(combos: list[Combo], weights: list[float]) -> dict[str, float]:
    """Shares of traffic of the biggest team(s) and model, for the report."""
    by_team: dict[str, float] = collections.defaultdict(float)
    by_model: dict[str, float] = collections.defaultdict(float)
    for c, w in zip(combos, weights, strict=True):
        by_team[c.attribution.split("\t", 1)[0]] += w
        by_model[c.head.split("\t")[1]] += w
    total = sum(weights)
    top_team = max(by_team, key=by_team.__getitem__)
    top_model = max(by_model, key=by_model.__getitem__)
    return {
        f"top team ({top_team})": by_team[top_team] / total,
        "top 3 teams": sum(sorted(by_team.values())[-3:]) / total,
        f"top model ({top_model})": by_model[top_model] / total,
        "unpriced": sum(w for c, w in zip(combos, weights, strict=True) if not c.prices) / total,
    }


# --- COPY text ----------------------------------------------------------------------------------

_WORLD: World | None = None


def _init_worker(seed: int, n_rows: int, days: float, end: datetime) -> None:
    global _WORLD
    if _WORLD is None:  # a forked worker inherits the parent's
        _WORLD = build_world(seed, n_rows, days, end)


def _money(units: int) -> str:
    return f"{units // UNITS_PER_USD}.{units % UNITS_PER_USD:010d}" if units else "0"


def _slot_lines(w: World, k: int, minute_prefix: dict[int, str]) -> list[str]:
    """The COPY text lines of UTC hour slot k (their own Random: independent of chunking)."""
    n = w.slot_counts[k]
    if not n:
        return []
    rng = random.Random(w.seed * 1_000_003 + k)
    lo = max(w.start_us, w.hour0_us + k * HOUR_US)
    hi = min(w.end_us, w.hour0_us + (k + 1) * HOUR_US)
    rand, gauss, getrandbits, exp = rng.random, rng.gauss, rng.getrandbits, math.exp
    span = hi - lo - 1
    offsets = sorted(int(rand() * span) | 1 for _ in range(n))
    combos = rng.choices(w.combos, cum_weights=w.cum_weights, k=n)
    first = w.slot_first[k]
    seed = w.seed
    pool = w.hash_pool
    lines = []
    for j in range(n):
        c = combos[j]
        occ = lo + offsets[j]
        r = rand()
        # lognormal around the task type's medians
        inp = min(MAX_INPUT_TOKENS, int(exp(c.mu_in + 0.9 * gauss())) + 1)
        out = min(16_000, int(exp(c.mu_out + 0.8 * gauss())) + 1)
        cr = cw = 0
        status, error_type = "success", ""
        if r < ERROR_SHARE:
            status = "error"
            error_type = ERROR_TYPES[bisect.bisect(_ERROR_CUM, r / ERROR_SHARE)]
            out = 0
            if error_type == "rate_limit":  # refused before any token was processed
                inp = 0
        else:
            if rand() < c.cache_share:
                cr = int(inp * (0.3 + 0.6 * rand()))
            # at most half of what the cache read left: cache_read <= input - cache_write
            if c.cache_write_share and rand() < c.cache_write_share:
                cw = int((inp - cr) * 0.5 * rand())
        if c.prices is None:
            cost = icost = ocost = "0"
        else:
            p_in, p_cr, p_cw, p_out = c.prices
            sub_in = (inp - cr - cw) * p_in + cr * p_cr + cw * p_cw
            sub_out = out * p_out
            # one rounding each, half up, at the ledger's scale (usage.pricing.price_usage)
            cost = _money((sub_in + sub_out + 50) // SUB_PER_UNIT)
            icost = _money((sub_in + 50) // SUB_PER_UNIT)
            ocost = _money((sub_out + 50) // SUB_PER_UNIT)
        if error_type == "rate_limit":
            latency = 20 + int(rand() * 200)
        else:
            latency = int((c.ttft_ms + out * c.ms_per_token) * exp(0.3 * gauss()))
        rec = occ + latency * 1000 + 50_000 + int(rand() * 2_000_000)
        lat = "\\N" if rand() < 0.03 else str(latency)
        if rand() < HASH_SHARE:
            ih = (
                pool[int(rand() * HASH_POOL)]
                if rand() < HASH_REPEAT_SHARE
                else f"{getrandbits(256):064x}"
            )
        else:
            ih = ""
        conv = (
            f"conv-{k}-{c.user_index}-{int(rand() * 3)}"
            if c.conversational and rand() < 0.8
            else ""
        )
        wf = (
            f"wf-{k}-{c.agent_index}-{int(rand() * 8)}"
            if c.agent_index >= 0 and rand() < 0.5
            else ""
        )
        est = "t" if rand() < 0.005 else "f"
        s_occ, s_rec = divmod(occ, 1_000_000), divmod(rec, 1_000_000)
        m_occ, m_rec = s_occ[0] // 60, s_rec[0] // 60
        p_occ = minute_prefix.get(m_occ) or _minute(minute_prefix, m_occ)
        p_rec = minute_prefix.get(m_rec) or _minute(minute_prefix, m_rec)
        lines.append(
            f"r{seed}-{first + j:09d}\t{p_occ}{s_occ[0] % 60:02d}.{s_occ[1]:06d}+00:00\t"
            f"{p_rec}{s_rec[0] % 60:02d}.{s_rec[1]:06d}+00:00\t{c.head}\t{inp}\t{out}\t{cr}\t{cw}\t"
            f"{cost}\t{icost}\t{ocost}\tUSD\t{c.priced}\t{est}\t{c.attribution}\t{conv}\t{wf}\t"
            f"{status}\t{error_type}\t{lat}\t{{}}\t\t\t\t\t\t{ih}\t\t\\N\t0\t\t\t{{}}\t\t\torg"
        )
    return lines


_ERROR_CUM = [sum(ERROR_WEIGHTS[: i + 1]) for i in range(len(ERROR_WEIGHTS) - 1)]


def _minute(cache: dict[int, str], minute: int) -> str:
    text = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:")
    cache[minute] = text
    return text


def chunk_text(slots: tuple[int, int]) -> tuple[bytes, int, float]:
    """(COPY text, rows, CPU seconds) of slots [slots[0], slots[1]) in the worker's world."""
    assert _WORLD is not None
    t = time.process_time()
    minute_prefix: dict[int, str] = {}
    lines: list[str] = []
    for k in range(*slots):
        lines.extend(_slot_lines(_WORLD, k, minute_prefix))
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    return data, len(lines), time.process_time() - t


def plan_chunks(w: World, chunk_rows: int) -> list[tuple[int, int]]:
    """Whole hour slots per chunk, about chunk_rows rows each."""
    chunks, start, rows = [], 0, 0
    for k, c in enumerate(w.slot_counts):
        rows += c
        if rows >= chunk_rows:
            chunks.append((start, k + 1))
            start, rows = k + 1, 0
    if start < len(w.slot_counts):
        chunks.append((start, len(w.slot_counts)))
    return chunks


def check_layout(data: bytes, n: int = 2000) -> None:
    """The generated lines are in the app's own layout: usage.rows decodes each of the first n
    into typed values (a bad date, number or JSON raises) that encode_line writes back to text
    meaning the same row (it writes tiny Decimals as 1.5E-7, which PostgreSQL reads alike)."""
    for line in data.decode().split("\n", n)[:n]:
        if not line:
            continue
        row = decode_line(line)
        if line.count("\t") != len(ROW_COLUMNS) - 1 or decode_line(encode_line(row)) != row:
            raise RuntimeError(f"a generated line is not in usage.rows layout: {line!r}")


# --- the database -------------------------------------------------------------------------------


def ledger_rows_from_rollup(stack: h.Stack) -> int | None:
    """The ledger's row count as the hourly rollup keeps it (None: no migrated database)."""
    import psycopg

    try:
        with stack.pg() as conn:
            return int(
                conn.execute("SELECT COALESCE(SUM(requests), 0) FROM usage_modelrollup").fetchone()[
                    0
                ]
            )
    except psycopg.Error:
        return None


def copy_chunk(conn: Any, table: str, data: bytes) -> float:
    cols = ", ".join(ROW_COLUMNS)
    t = time.perf_counter()
    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
        for start in range(0, len(data), 1 << 20):
            cp.write(data[start : start + (1 << 20)])
    conn.commit()
    return time.perf_counter() - t


def reference_copy(stack: h.Stack, data: bytes) -> float:
    """COPY of `data` into a LIKE-copy of the ledger (no trigger); the table is dropped again."""
    with stack.pg() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {REF_TABLE}")
        conn.execute(f"CREATE TABLE {REF_TABLE} (LIKE {LEDGER} INCLUDING ALL)")
        conn.commit()
        conn.execute("CHECKPOINT")
        conn.commit()
        took = copy_chunk(conn, REF_TABLE, data)
        conn.execute(f"DROP TABLE {REF_TABLE}")
        conn.commit()
        conn.execute("CHECKPOINT")
        conn.commit()
    return took


def sizes_and_counts(stack: h.Stack) -> list[tuple[str, int, int]]:
    with stack.pg() as conn:
        return [
            (
                table,
                conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0],
                conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0],
            )
            for table in (LEDGER, *ROLLUPS)
        ]


def verify(stack: h.Stack) -> tuple[bool, list[str]]:
    """The rollups add up to the ledger: requests, input tokens and cost units."""
    with stack.pg() as conn:
        ledger = conn.execute(
            f"SELECT count(*), COALESCE(SUM(input_tokens), 0), "
            f"COALESCE(SUM(ROUND(cost * {UNITS_PER_USD})), 0)::bigint FROM {LEDGER}"
        ).fetchone()
        lines = [f"verify ledger            requests={ledger[0]:,} input_tokens={ledger[1]:,} "
                 f"cost_units={ledger[2]:,}"]  # fmt: skip
        ok = True
        for table in ROLLUPS:
            got = conn.execute(
                f"SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(input_tokens), 0), "
                f"COALESCE(SUM(cost_units), 0) FROM {table}"
            ).fetchone()
            same = tuple(int(x) for x in got) == tuple(int(x) for x in ledger)
            ok = ok and same
            lines.append(
                f"verify {table:<17} requests={got[0]:,} input_tokens={got[1]:,} "
                f"cost_units={got[2]:,}  {'PASS' if same else 'FAIL'}"
            )
    return ok, lines


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --- main ---------------------------------------------------------------------------------------


class Loader:
    """COPYs chunks into the ledger from `connections` threads, each with its own connection
    (psycopg leaves the GIL while it waits on the server), at most `connections` chunks queued.
    Concurrent COPYs of different hours touch different rollup rows (and the trigger's upserts
    lock rows in one order), so they neither wait for nor deadlock with each other."""

    def __init__(self, stack: h.Stack, connections: int):
        self.stack = stack
        self.queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue(maxsize=connections)
        self.results: list[tuple[int, float]] = []  # (rows, seconds) per COPY, in commit order
        self.gen_cpu = 0.0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(connections)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with self.stack.pg() as conn:
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    continue  # drain; the main thread raises it
                data, n = item
                try:
                    took = copy_chunk(conn, LEDGER, data)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc
                    continue
                with self._lock:
                    self.results.append((n, took))

    def put(self, data: bytes, n: int) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((data, n))

    def rows(self) -> int:
        with self._lock:
            return sum(n for n, _ in self.results)

    def close(self) -> None:
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error


def load_rest(
    stack: h.Stack,
    args: argparse.Namespace,
    *,
    chunks: list[tuple[int, int]],
    end: datetime,
    t_load: float,
    rows_before: int,
) -> Loader:
    """The chunks' text built by --procs processes (in order, a few ahead) and COPYed from
    --connections connections; logs progress every million rows."""
    pool = (
        concurrent.futures.ProcessPoolExecutor(
            max_workers=args.procs,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(args.seed, args.rows, args.days, end),
        )
        if args.procs
        else None
    )
    loader = Loader(stack, args.connections)
    todo = iter(chunks)
    pending: collections.deque[Any] = collections.deque()

    def submit() -> None:
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(chunk_text, nxt) if pool is not None else nxt)

    try:
        for _ in range(args.procs + 1):  # built ahead: bounded memory
            submit()
        next_log = 1_000_000
        while pending:
            item = pending.popleft()
            data, n, cpu = item.result() if pool is not None else chunk_text(item)
            submit()
            loader.gen_cpu += cpu
            loader.put(data, n)
            done = rows_before + loader.rows()
            if done >= next_log:
                el = time.perf_counter() - t_load
                h.log(f"{done:,} rows in the ledger after {el:.0f} s ({done / el:,.0f} rows/s)")
                next_log = (done // 1_000_000 + 1) * 1_000_000
        loader.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return loader


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=10_000_000, help="ledger rows (default 10M)")
    ap.add_argument("--db", default=DB_NAME, help=f"database name (default {DB_NAME})")
    ap.add_argument("--days", type=float, default=90.0, help="range, ending now (default 90)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--chunk-rows", type=int, default=200_000, help="rows per COPY statement (whole hours)"
    )
    ap.add_argument(
        "--procs",
        type=int,
        default=1,
        help="processes building COPY text while the main one COPYs (0: build inline)",
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=1,
        help="concurrent COPY connections after the first chunk (default 1; 2 was ~20 %% "
        "faster on a 2-vCPU machine, with both cores busy)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait at most for an idle machine before the reference and chunk 1",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep an existing database holding >= --rows rows, and exit",
    )
    args = ap.parse_args()
    if min(args.rows, args.chunk_rows, args.connections) < 1 or args.days <= 0 or args.procs < 0:
        ap.error("--rows, --days, --chunk-rows and --connections must be positive, --procs >= 0")
    if not args.db.replace("_", "").isalnum():
        ap.error("--db: letters, digits and _ only")
    return args


def main() -> int:
    args = parse_args()
    with h.Stack(redis_db=None, db_name=args.db, keep_db=True) as stack:
        if args.reuse:
            have = ledger_rows_from_rollup(stack)
            if have is not None and have >= args.rows:
                stack.manage("migrate", "--noinput", "-v", "0")
                with stack.pg() as conn:
                    last = conn.execute(f"SELECT max(occurred_at) FROM {LEDGER}").fetchone()[0]
                print(f"reuse {args.db}: {have:,} rows (>= {args.rows:,}), last row at {last}")
                return 0
            why = "no such database" if have is None else f"{have:,} rows < {args.rows:,}"
            h.log(f"--reuse: {why}; rebuilding {args.db}")
        return generate(stack, args)


def generate(stack: h.Stack, args: argparse.Namespace) -> int:
    t_all = time.perf_counter()
    stack.reset_database()
    stack.manage("migrate", "--noinput", "-v", "0")
    end = datetime.now(UTC)
    t = time.perf_counter()
    _init_worker(args.seed, args.rows, args.days, end)
    world = _WORLD
    assert world is not None
    chunks = plan_chunks(world, args.chunk_rows)
    card = ", ".join(f"{v:,} {k}" for k, v in world.cardinality.items())
    h.log(f"world built in {time.perf_counter() - t:.1f} s: {card}")
    h.log("skew: " + ", ".join(f"{k} {v:.0%}" for k, v in world.shares.items()))
    start_at = datetime.fromtimestamp(world.start_us / 1e6, UTC)
    h.log(f"{args.rows:,} rows from {start_at:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC, "
          f"{len(chunks)} COPY chunks of ~{args.chunk_rows:,} rows, {args.procs} generator "
          f"process(es), {args.connections} COPY connection(s)")  # fmt: skip

    first, first_rows, first_cpu = chunk_text(chunks[0])
    check_layout(first)
    h.log(f"chunk 1: {first_rows:,} rows, {mib(len(first))} COPY text built in {first_cpu:.2f} "
          f"CPU-s ({first_rows / first_cpu:,.0f} rows/s per process)")  # fmt: skip
    h.wait_quiet(args.quiet_wait)
    ref_s = reference_copy(stack, first)
    h.log(f"reference COPY into {REF_TABLE} (no trigger): {ref_s:.2f} s")

    h.wait_quiet(args.quiet_wait)
    with stack.pg() as conn:
        conn.execute("CHECKPOINT")
        conn.commit()
        # this process and its generator workers: one process group
        me = {os.getpgrp(): "gen_ledger procs"}
        cpu0 = h.cpu_snapshot(stack, me)
        t_load = time.perf_counter()
        first_s = copy_chunk(conn, LEDGER, first)
    h.log(f"chunk 1 into the ledger (trigger on): {first_s:.2f} s")
    del first
    loaded = load_rest(
        stack, args, chunks=chunks[1:], end=end, t_load=t_load, rows_before=first_rows
    )
    load_s = time.perf_counter() - t_load
    cpu = h.cpu_report(cpu0, h.cpu_snapshot(stack, me), load_s)
    copy_s = [first_s] + [took for _n, took in loaded.results]
    rows_s = [first_rows] + [n for n, _took in loaded.results]
    gen_cpu = first_cpu + loaded.gen_cpu
    done = sum(rows_s)

    h.log("VACUUM (ANALYZE) of the ledger and the rollups")
    t = time.perf_counter()
    with stack.pg(autocommit=True) as conn:
        for table in (LEDGER, *ROLLUPS):
            conn.execute(f"VACUUM (ANALYZE) {table}")
    vacuum_s = time.perf_counter() - t
    tables = sizes_and_counts(stack)
    ok, checks = verify(stack)
    with stack.pg() as conn:
        db_size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    total_s = time.perf_counter() - t_all

    rule = "=" * 76
    print(f"\n{rule}")
    print(f"gen_ledger  db={args.db}  seed={args.seed}  days={args.days:g}  "
          f"chunk={args.chunk_rows:,}  procs={args.procs}  "
          f"connections={args.connections}")  # fmt: skip
    print(h.machine_line(stack))
    print("-" * 76)
    print(f"rows                     {done:>12,}  ({len(chunks)} COPY statements, one txn each)")
    print(f"load seconds             {load_s:>12.1f}  -> {done / load_s:>9,.0f} rows/s"
          "  (COPY into the ledger, trigger on, text built alongside)")  # fmt: skip
    par = loaded.results
    if par:
        rate = sum(n for n, _ in par) / sum(t for _, t in par)
        head = sum(n for n, _ in par[:5]) / sum(t for _, t in par[:5])
        tail = sum(n for n, _ in par[-5:]) / sum(t for _, t in par[-5:])
        print(
            f"  chunks 2-{len(copy_s):<13} {sum(t for _, t in par):>12.1f}  -> {rate:>9,.0f} "
            f"rows/s per connection ({args.connections}); their first 5 {head:,.0f}, last 5 "
            f"{tail:,.0f} rows/s"
        )
    print(f"  text generation        {gen_cpu:>12.1f}  CPU-s -> {done / gen_cpu:>9,.0f} rows/s "
          "per process")  # fmt: skip
    ref_rate, first_rate = first_rows / ref_s, first_rows / copy_s[0]
    print(f"chunk 1 into the ledger  {copy_s[0]:>12.2f}  -> {first_rate:>9,.0f} rows/s"
          f"  ({first_rows:,} rows, trigger on)")  # fmt: skip
    print(f"raw COPY reference       {ref_s:>12.2f}  -> {ref_rate:>9,.0f} rows/s"
          "  (same chunk, LIKE ... INCLUDING ALL, no trigger)")  # fmt: skip
    print(f"trigger cost             {copy_s[0] / ref_s - 1:>12.0%}  more time on chunk 1 "
          f"(ledger = {first_rate / ref_rate:.0%} of the raw rate)")  # fmt: skip
    print(cpu.replace("timed phase", "load"))
    print(f"vacuum analyze seconds   {vacuum_s:>12.1f}")
    for table, n, size in tables:
        print(f"table {table:<18} {n:>12,} rows  {mib(size):>10}  (with indexes, TOAST)")
    print(f"database {args.db:<18} {mib(db_size):>21}")
    print(f"total seconds            {total_s:>12.1f}  (create, migrate, generate, load, "
          "vacuum, verify)")  # fmt: skip
    print("-" * 76)
    for line in checks:
        print(line)
    print(f"rollups = ledger: {'PASS' if ok and done == args.rows else 'FAIL'}")
    print(rule)
    return 0 if ok and done == args.rows else 1


if __name__ == "__main__":
    h.run_main(main)
