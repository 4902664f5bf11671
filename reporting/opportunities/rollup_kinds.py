"""Traffic kinds read from the rollups: cheaper_model (short outputs on a model with a cheaper
sibling) and error_waste (spend on failed requests)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from reporting.opportunities.common import (
    COARSE_GROUP,
    GROUP,
    MIN_REQUESTS,
    Aggregate,
    Group,
    Measures,
    Opportunity,
    Slice,
    Window,
    _grouped,
    _opportunity,
    _tiered,
    _units,
    _with_first_half,
    cheaper_tier,
    volume_cost,
)
from usage import pricing, rollups


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
