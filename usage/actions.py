"""The usage app's actions: ingestion, ledger reads, health, tokens and pricing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from tokenmgr_project.core.actions import ANY_STAFF, Outcome, action, validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import pricing, selectors, services, tokenizer
from usage.models import ModelPrice, TokenUsage
from usage.schemas import (
    CompareIn,
    ConfigureIn,
    ModelRef,
    PriceOverrideIn,
    QuoteIn,
    RepriceIn,
    TokenizeIn,
    TruncateIn,
)

VIEW_USAGE = "usage.view_tokenusage"


# --- usage -------------------------------------------------------------------------------------


def usage_out(row: TokenUsage) -> dict[str, Any]:
    return {
        "request_id": row.request_id,
        "occurred_at": row.occurred_at.isoformat(),
        "provider": row.provider,
        "model": row.model,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "total_tokens": row.total_tokens,
        "cost": pricing.money(row.cost),
        "currency": row.currency,
        "price_source": row.price_source,
        "price_ref": row.price_ref,
        "unpriced": row.unpriced,
        "estimated": row.estimated,
        "team_id": row.team_id,
        "project_id": row.project_id,
        "user_id": row.user_id,
        "feature": row.feature,
        "agent": row.agent,
        "task_type": row.task_type,
        "conversation_id": row.conversation_id,
        "workflow_id": row.workflow_id,
        "status": row.status,
        "error_type": row.error_type,
        "latency_ms": row.latency_ms,
        "metadata": row.metadata,
        "reservation_id": row.reservation_id,
        "provenance": {
            "parent_request_id": row.parent_request_id,
            "root_request_id": row.root_request_id,
            "relationship": row.relationship,
            "intent": row.intent,
            "input_hash": row.input_hash,
            "output_hash": row.output_hash,
            "cache_hit": row.cache_hit,
        },
    }


@action(
    "track_usage",
    "Record one LLM request's usage (SPEC §4 usage event).",
    staff_perm="usage.add_tokenusage",
)
def track_usage(principal: Principal, data: Any) -> Outcome:
    result = services.usage_ingest(principal=principal, events=[data])[0]
    if result.status == "rejected":
        if result.conflict:
            raise ApiError(
                "The usage event's link conflicts with recorded provenance.",
                status_code=409,
                code="cycle",
                fields=result.errors,
            )
        raise ApiError("Invalid usage event.", fields=result.errors)
    body = result.as_dict()
    del body["index"], body["status"]
    return Outcome(body, status=200 if result.status == "duplicate" else 201)


@action(
    "track_usage_batch",
    "Record up to 1,000 usage events; one result per event.",
    staff_perm="usage.add_tokenusage",
)
def track_usage_batch(principal: Principal, data: Any) -> Outcome:
    events = data.get("events") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"events"}:
        raise ApiError(
            "Invalid batch.", fields={k: ["Unknown field."] for k in sorted(set(data) - {"events"})}
        )
    if not isinstance(events, list):
        raise ApiError("Invalid batch.", fields={"events": ["Expected a list of usage events."]})
    if not events:
        raise ApiError("Invalid batch.", fields={"events": ["Send at least one event."]})
    if len(events) > settings.TOKENMGR_BATCH_MAX:
        raise ApiError(
            "Batch too large.",
            fields={
                "events": [
                    f"At most {settings.TOKENMGR_BATCH_MAX} events per batch; got {len(events)}."
                ]
            },
            status_code=413,
            code="too_large",
        )
    results = services.usage_ingest(principal=principal, events=events)
    counts = {"created": 0, "duplicate": 0, "rejected": 0}
    for item in results:
        counts[item.status] += 1
    return Outcome(
        {
            "created": counts["created"],
            "duplicates": counts["duplicate"],
            "rejected": counts["rejected"],
            "results": [item.as_dict() for item in results],
        }
    )


@action(
    "get_usage",
    "List usage newest first, filtered by any dimension and time range.",
    staff_perm=VIEW_USAGE,
)
def get_usage(principal: Principal, data: Any) -> Outcome:
    params = data if isinstance(data, dict) else {}
    rows, next_cursor = selectors.usage_list(principal=principal, params=params)
    return Outcome({"results": [usage_out(r) for r in rows], "next_cursor": next_cursor})


@action(
    "get_usage_summary",
    "Totals grouped by dimensions and by hour/day/week/month.",
    staff_perm=VIEW_USAGE,
)
def get_usage_summary(principal: Principal, data: Any) -> Outcome:
    params = data if isinstance(data, dict) else {}
    return Outcome(selectors.usage_summary(principal=principal, params=params))


@action(
    "get_status",
    "Health: database and Redis reachability, buffer depth, last flush.",
    staff_perm=ANY_STAFF,  # the same as the public GET /health
)
def get_status(principal: Principal, data: Any) -> Outcome:
    body = selectors.health_snapshot()
    return Outcome(body, status=200 if body["database"]["reachable"] else 503)


# --- tokens ------------------------------------------------------------------------------------


@action(
    "tokenize",
    "Count tokens of a text or chat messages with the model's encoding.",
    staff_perm=ANY_STAFF,
)
def tokenize(principal: Principal, data: Any) -> Outcome:
    params = validate(TokenizeIn, data)
    if (params.text is None) == (params.messages is None):
        raise ApiError("Invalid input.", fields={"text": ["Give text or messages (exactly one)."]})
    choice = tokenizer.encoding_for_model(params.model)
    encoding = tokenizer.get_encoding(choice.name)
    if params.text is not None:
        count = tokenizer.count_text(params.text, encoding)
    else:
        count = tokenizer.count_messages(params.messages or [], encoding)
    return Outcome(
        {
            "model": params.model,
            "encoding": choice.name,
            "estimated": choice.estimated,
            "tokens": count,
        }
    )


@action("truncate", "Trim text to at most max_tokens, on a token boundary.", staff_perm=ANY_STAFF)
def truncate(principal: Principal, data: Any) -> Outcome:
    params = validate(TruncateIn, data)
    choice = tokenizer.encoding_for_model(params.model)
    result = tokenizer.truncate_text(
        params.text, params.max_tokens, tokenizer.get_encoding(choice.name)
    )
    return Outcome(
        {
            "model": params.model,
            "encoding": choice.name,
            "estimated": choice.estimated,
            "text": result.text,
            "tokens": result.tokens,
            "original_tokens": result.original_tokens,
            "truncated": result.truncated,
        }
    )


# --- pricing -----------------------------------------------------------------------------------


def _quote(provider: str, model: str, params: QuoteIn | CompareIn) -> dict[str, Any]:
    at = params.at or timezone.now()
    if params.cache_read_tokens + params.cache_write_tokens > params.input_tokens:
        raise ApiError(
            "Invalid token counts.",
            fields={
                "cache_read_tokens": ["cache_read_tokens + cache_write_tokens exceed input_tokens."]
            },
        )
    price = pricing.price_usage(
        provider=provider.lower(),
        model=model,
        at=at,
        input_tokens=params.input_tokens,
        output_tokens=params.output_tokens,
        cache_read_tokens=params.cache_read_tokens,
        cache_write_tokens=params.cache_write_tokens,
    )
    return {
        "provider": price.provider,
        "model": model,
        "cost": pricing.money(price.cost),
        "input_cost": pricing.money(price.input_cost),
        "output_cost": pricing.money(price.output_cost),
        "currency": price.currency,
        "unpriced": price.unpriced,
        "price_source": price.source,
        "price_ref": price.ref,
        "context_window": pricing.context_window(provider, model),
    }


@action("quote_price", "Cost of one request's token volumes on one model.", staff_perm=ANY_STAFF)
def quote_price(principal: Principal, data: Any) -> Outcome:
    params = validate(QuoteIn, data)
    return Outcome(_quote(params.provider, params.model, params))


@action(
    "compare_prices",
    "The same token volumes on several models, cheapest first.",
    staff_perm=ANY_STAFF,
)
def compare_prices(principal: Principal, data: Any) -> Outcome:
    params = validate(CompareIn, data)
    refs = [m if isinstance(m, ModelRef) else ModelRef(model=m) for m in params.models]
    quotes = [_quote(ref.provider, ref.model, params) for ref in refs]
    priced = sorted((q for q in quotes if not q["unpriced"]), key=lambda q: Decimal(q["cost"]))
    unpriced = [q for q in quotes if q["unpriced"]]
    cheapest = Decimal(priced[0]["cost"]) if priced else None
    for q in priced:
        q["vs_cheapest"] = (
            pricing.money(Decimal(q["cost"]) - cheapest) if cheapest is not None else None
        )
    return Outcome({"currency": pricing.CURRENCY, "results": priced + unpriced})


def price_override_out(row: ModelPrice) -> dict[str, Any]:
    def optional(value: Decimal | None) -> str | None:
        return None if value is None else pricing.money(value)

    return {
        "id": row.pk,
        "provider": row.provider,
        "model": row.model,
        "input_per_mtok": pricing.money(row.input_per_mtok),
        "output_per_mtok": pricing.money(row.output_per_mtok),
        "cache_read_per_mtok": optional(row.cache_read_per_mtok),
        "cache_write_per_mtok": optional(row.cache_write_per_mtok),
        "effective_from": row.effective_from.isoformat(),
        "note": row.note,
    }


@action(
    "get_pricing",
    "The price catalogue (genai-prices) and the active overrides.",
    staff_perm="usage.view_modelprice",
)
def get_pricing(principal: Principal, data: Any) -> Outcome:
    params = data if isinstance(data, dict) else {}
    provider = str(params.get("provider") or "").lower()
    search = str(params.get("model") or "").lower()
    rows = [
        r
        for r in pricing.catalogue_entries()
        if (not provider or r["provider"] == provider)
        and (not search or search in r["model"].lower())
    ]
    overrides = [price_override_out(o) for o in selectors.price_overrides(provider, search)]
    return Outcome(
        {
            "catalogue_version": pricing.CATALOGUE_VERSION,
            "currency": pricing.CURRENCY,
            "overrides": overrides,
            "catalogue": rows,
        }
    )


@action(
    "update_pricing",
    "Create or replace a price override (global key or staff).",
    # An override is a new row, or replaces the one with the same effective_from.
    staff_perm=("usage.add_modelprice", "usage.change_modelprice"),
    staff_or_global=True,
)
def update_pricing(principal: Principal, data: Any) -> Outcome:
    params = validate(PriceOverrideIn, data)
    row, created = services.model_price_set(
        provider=params.provider,
        model=params.model,
        input_per_mtok=params.input_per_mtok,
        output_per_mtok=params.output_per_mtok,
        cache_read_per_mtok=params.cache_read_per_mtok,
        cache_write_per_mtok=params.cache_write_per_mtok,
        effective_from=params.effective_from,
        note=params.note,
    )
    return Outcome({**price_override_out(row), "created": created}, status=201 if created else 200)


def actor_label(principal: Principal) -> str:
    """Who did it, for an audit row: "staff user #3", "api key #5 (global)", or "cli" for the
    keyless organisation principal that management commands act as."""
    if principal.user_id is None and principal.key_id is None:
        return "cli"
    return principal.label


def reprice_out(result: services.RepriceResult) -> dict[str, Any]:
    return {
        "applied": result.applied,
        "since": result.since.isoformat(),
        "until": result.until.isoformat(),
        "provider": result.provider,
        "model": result.model,
        "currency": pricing.CURRENCY,
        "rows_seen": result.rows_seen,
        "rows_changed": result.rows_changed,
        "cost_before": pricing.money(result.cost_before),
        "cost_after": pricing.money(result.cost_after),
        "difference": pricing.money(result.difference),
        "models": [m.as_dict() for m in result.models],
        "repricing_id": result.repricing.pk if result.repricing else None,
    }


@action(
    "reprice_usage",
    "Price past usage in a range again with the prices in effect when it occurred: per model "
    "and total differences; with `apply`, rewrite the costs, rollups and budget counters and "
    "record it (global key or staff).",
    # Rewriting ledger costs is changing what prices were charged.
    staff_perm="usage.change_modelprice",
    staff_or_global=True,
)
def reprice_usage(principal: Principal, data: Any) -> Outcome:
    params = validate(RepriceIn, data)
    result = services.usage_reprice(
        since=params.since,
        until=params.until,
        provider=params.provider,
        model=params.model,
        apply=params.apply,
        actor=actor_label(principal),
    )
    return Outcome(reprice_out(result), status=201 if result.applied else 200)


@action(
    "configure_manager",
    "Change run-time settings (global key or staff).",
    staff_perm="usage.change_managerconfig",
    staff_or_global=True,
)
def configure_manager(principal: Principal, data: Any) -> Outcome:
    params = validate(ConfigureIn, data)
    config = services.manager_config_update(**params.model_dump())
    return Outcome(
        {
            "buffer_size": config.buffer_size,
            "flush_interval": config.flush_interval,
            "retention_days": config.retention_days,
            "alert_channels": config.alert_channels,
            "optimization_enabled": config.optimization_enabled,
        }
    )
