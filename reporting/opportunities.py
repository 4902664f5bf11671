"""Savings opportunities with their evidence, each priced from the catalogue: the engine behind
the optimization report (and, later, recommendations).

- cheaper model: successful short-output traffic (usage.rollups.SHORT_OUTPUT_TOKENS) on a model
  with a cheaper sibling of a comparable tier (CHEAPER_TIER), its token volumes priced on both;
- caching: requests whose input hash and model repeat within a day (provenance), whose cost a
  response cache would have saved;
- retry and error waste: spend on failed requests (rollups) and retry storms (provenance).

Nothing is invented: a saving is a difference of two catalogue prices for observed volumes, or
the observed cost of waste; an opportunity with too little evidence (MIN_REQUESTS) is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from provenance import selectors as provenance_selectors
from tokenmgr_project.core.principal import Principal
from usage import pricing, rollups
from usage.selectors import usage_for_principal

MIN_REQUESTS = 20
DUPLICATE_WINDOW = timedelta(hours=24)
RETRY_STORM_MIN = 3
RETRY_STORM_WINDOW = timedelta(minutes=10)
FINDINGS_SHOWN = 5
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
Aggregate = Callable[..., rollups.Result]


@dataclass(slots=True)
class Opportunity:
    kind: str  # cheaper_model, caching, error_waste, retry_waste
    dimension: str
    target: str
    savings: Decimal  # over the report's range, in USD
    requests: int
    action: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def evidence_text(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.evidence.items() if not isinstance(v, list))


@dataclass(slots=True)
class Found:
    items: list[Opportunity]
    source: str


def cheaper_tier(model: str) -> str | None:
    best = max(
        (p for p in CHEAPER_TIER if model == p or model.startswith(p + "-")), key=len, default=None
    )
    return CHEAPER_TIER[best] if best else None


def _units(value: int) -> Decimal:
    return rollups.units_to_money(value)


def cheaper_models(by_model: rollups.Result, *, at: datetime) -> list[Opportunity]:
    out = []
    for (provider, model), v in by_model.rows.items():
        candidate = cheaper_tier(model)
        if candidate is None or v["short_requests"] < MIN_REQUESTS or not v["short_cost_units"]:
            continue
        alternative = pricing.price_usage(
            provider=provider,
            model=candidate,
            at=at,
            input_tokens=v["short_input_tokens"],
            output_tokens=v["short_output_tokens"],
        )
        now = _units(v["short_cost_units"])
        if alternative.unpriced or alternative.cost >= now:
            continue
        out.append(
            Opportunity(
                kind="cheaper_model",
                dimension="model",
                target=f"{provider}/{model}" if provider else model,
                savings=now - alternative.cost,
                requests=v["short_requests"],
                action=(
                    f"Route requests with outputs up to {rollups.SHORT_OUTPUT_TOKENS} tokens "
                    f"to {candidate}."
                ),
                evidence={
                    "model": model,
                    "cheaper_model": candidate,
                    "short_requests": v["short_requests"],
                    "share_of_requests": f"{v['short_requests'] * 100 / v['requests']:.1f}%",
                    "input_tokens": v["short_input_tokens"],
                    "output_tokens": v["short_output_tokens"],
                    "cost_now": pricing.money(now),
                    "cost_on_cheaper_model": pricing.money(alternative.cost),
                },
            )
        )
    return out


def caching(
    principal: Principal, since: datetime, until: datetime, filters: dict[str, str]
) -> list[Opportunity]:
    cutoff = rollups.purged_before()
    start = max(since, cutoff) if cutoff else since
    if start >= until:
        return []
    rows = usage_for_principal(principal).filter(
        occurred_at__gte=start, occurred_at__lt=until, **filters
    )
    found = provenance_selectors.duplicate_requests(rows, window=DUPLICATE_WINDOW, limit=10_000)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for group in found["findings"]:
        by_model.setdefault(group["model"], []).append(group)
    out = []
    for model, groups in by_model.items():
        repeats = sum(g["duplicates"] for g in groups)
        if repeats < MIN_REQUESTS:
            continue
        savings = sum((g["savings"] for g in groups), Decimal(0))
        if not savings:
            continue
        out.append(
            Opportunity(
                kind="caching",
                dimension="model",
                target=model,
                savings=savings,
                requests=repeats,
                action="Cache responses by input hash (or use the provider's prompt caching).",
                evidence={
                    "repeated_inputs": len(groups),
                    "repeat_requests": repeats,
                    "window_hours": int(DUPLICATE_WINDOW.total_seconds() // 3600),
                    "since": start.isoformat(),
                    "examples": [
                        {
                            "input_hash": g["input_hash"],
                            "requests": g["requests"],
                            "request_ids": g["request_ids"],
                        }
                        for g in groups[:FINDINGS_SHOWN]
                    ],
                },
            )
        )
    return out


def error_waste(by_model: rollups.Result) -> list[Opportunity]:
    out = []
    for (provider, model), v in by_model.rows.items():
        if v["errors"] < MIN_REQUESTS or not v["error_cost_units"]:
            continue
        out.append(
            Opportunity(
                kind="error_waste",
                dimension="model",
                target=f"{provider}/{model}" if provider else model,
                savings=_units(v["error_cost_units"]),
                requests=v["errors"],
                action="Find why these requests fail (error_type) before retrying them.",
                evidence={
                    "errors": v["errors"],
                    "error_share": f"{v['errors'] * 100 / v['requests']:.1f}%",
                    "cost_of_errors": pricing.money(_units(v["error_cost_units"])),
                },
            )
        )
    return out


def retry_waste(principal: Principal, since: datetime, until: datetime) -> list[Opportunity]:
    found = provenance_selectors.retry_storms(
        principal,
        since,
        until,
        storm_min=RETRY_STORM_MIN,
        storm_window=RETRY_STORM_WINDOW,
        limit=FINDINGS_SHOWN,
    )
    if not found["storms"] or not found["waste"]:
        return []
    retries = sum(s["retries"] for s in found["findings"])
    return [
        Opportunity(
            kind="retry_waste",
            dimension="operation",
            target=f"{found['storms']} retried operations",
            savings=found["waste"],
            requests=retries,
            action="Back off between retries and stop after a few; fix the failing step.",
            evidence={
                "retry_storms": found["storms"],
                "waste": pricing.money(found["waste"]),
                "examples": [
                    {
                        "operation": s["operation"],
                        "retries": s["retries"],
                        "waste": pricing.money(s["waste"]),
                    }
                    for s in found["findings"]
                ],
            },
        )
    ]


def find(
    principal: Principal,
    aggregate: Aggregate,
    *,
    since: datetime,
    until: datetime,
    filters: dict[str, str],
) -> Found:
    """Every opportunity over [since, until) the caller may see, largest saving first.
    `aggregate(group_by)` sums rollups in the caller's scope and `filters`. Retry storms follow
    edges across requests, so they are looked for only without filters."""
    by_model = aggregate(["provider", "model"])
    items = (
        cheaper_models(by_model, at=until)
        + caching(principal, since, until, filters)
        + error_waste(by_model)
        + (retry_waste(principal, since, until) if not filters else [])
    )
    items.sort(key=lambda o: (-o.savings, o.kind, o.target))
    source = "rollups+ledger"  # rollups for volumes; the ledger for repeated inputs and retries
    return Found(items, source)
