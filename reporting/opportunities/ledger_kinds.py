"""Traffic kinds found in the ledger's measures (ledger_reads): caching, prompt_caching,
prompt_trimming, max_tokens, and retry_waste (provenance retry storms)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from provenance import selectors as provenance_selectors
from reporting.opportunities.common import (
    DUPLICATE_WINDOW,
    FINDINGS_SHOWN,
    GROUP,
    MAX_TOKENS_HEADROOM,
    MAX_TOKENS_KEYS,
    MAX_TOKENS_USED_SHARE,
    PROMPT_CACHE_MIN_TOKENS,
    PROMPT_CACHE_TTL,
    RETRY_STORM_MIN,
    RETRY_STORM_WINDOW,
    TRIM_TOKENS,
    Group,
    Measures,
    Opportunity,
    Slice,
    Window,
    _group,
    _money_units,
    _opportunity,
    _slice_keys,
    _units,
    _utc,
    cache_rates,
    slices,
    volume_cost,
)
from reporting.opportunities.ledger_reads import repeated_inputs, reservations, system_prompts
from tokenmgr_project.core.principal import Principal
from usage import pricing
from usage.selectors import usage_for_principal


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
