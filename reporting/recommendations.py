"""Savings recommendations (SPEC §7, issue 13): the opportunities engine (reporting.opportunities)
run for a caller, joined with what people decided about each, and the tracking of accepted ones.

A recommendation is keyed by what it is about: kind | dimension | target | its scope (the
narrowest team / project holding all its evidence). `recommendations_list` computes them live
for the caller's scope and range, stores or refreshes a row per recommendation seen (its `id`
is that row's), and hides the dismissed ones unless asked. An accepted one is tracked: at
acceptance its saving per day over its window becomes the baseline; later the same waste is
measured the same way from the acceptance on, and `realized_savings` is (baseline per day -
current waste per day) x days since acceptance. The beat job (`recommendations_refresh`) does
the same organisation-wide and marks the rows nobody would see any more (`evidence.stale`).

Turned off with the manager settings' `optimization_enabled`: the endpoint answers 409 and the
beat job does nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field

from reporting import opportunities
from reporting.models import Recommendation
from reporting.params import Filters, QueryInt
from tokenmgr_project.core.actions import validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import GLOBAL, PROJECT, TEAM, Principal, in_scope
from usage import rollups
from usage.pricing import money
from usage.selectors import aggregate_for, parse_range
from usage.services import manager_config

KINDS = opportunities.ALL_KINDS
DIMENSIONS = (*opportunities.DIMENSIONS, "budget")
STATUSES = ("open", "dismissed", "accepted", "all")
DEFAULT_RANGE = timedelta(days=30)
MIN_RANGE = timedelta(days=1)
MAX_RANGE = timedelta(days=400)
MAX_ITEMS = 500
MAX_GROUPS = 50_000
MIN_TRACKED = timedelta(hours=1)  # an acceptance younger than this is not measured yet
FILTERS = ("provider", "model", *rollups.FINE_DIMENSIONS)
KEY_LENGTH = Recommendation._meta.get_field("key").max_length or 400
TARGET_LENGTH = Recommendation._meta.get_field("target").max_length or 300
ACTION_LENGTH = Recommendation._meta.get_field("action").max_length or 500
Status = Recommendation.Status


class RecommendationsIn(Filters):
    """GET /recommendations parameters (query string or /signals data); every name is checked."""

    model_config = ConfigDict(extra="forbid")

    since: str | None = Field(None, description="ISO 8601; default: 30 days before until.")
    until: str | None = Field(None, description="ISO 8601; default: the current hour's start.")
    kind: str | list[str] | None = Field(None, description=f"Comma-separated: {', '.join(KINDS)}.")
    status: Literal["open", "dismissed", "accepted", "all"] | None = Field(
        None, description="Default: open and accepted (dismissed ones hidden)."
    )
    dimension: Literal["model", "team", "feature", "agent", "budget"] | None = None
    limit: QueryInt = Field(100, ge=1, le=MAX_ITEMS)


class DecisionIn(BaseModel):
    """A decision about one recommendation (the id comes from the URL)."""

    model_config = ConfigDict(extra="forbid")

    rec_id: int = Field(strict=True, ge=1)
    note: str = Field("", strict=True, max_length=500)


@dataclass(frozen=True, slots=True)
class Query:
    principal: Principal
    since: datetime
    until: datetime
    kinds: tuple[str, ...]
    status: str | None
    dimension: str | None
    limit: int
    filters: dict[str, str]


def parse(principal: Principal, data: Any, *, now: datetime | None = None) -> Query:
    params = validate(RecommendationsIn, data)
    since, until = parse_range({"since": params.since, "until": params.until})
    current_hour = (now or timezone.now()).replace(minute=0, second=0, microsecond=0)
    until = until or current_hour
    since = since or until - DEFAULT_RANGE
    if since >= until:
        raise ApiError("Invalid time range.", fields={"since": ["Must be before until."]})
    if until - since < MIN_RANGE:
        raise ApiError(
            "Not enough history.",
            fields={
                "since": [
                    "Recommendations need at least 1 day of usage to extrapolate a month from: "
                    "start the range a day or more before until (default: 30 days)."
                ]
            },
        )
    if until - since > MAX_RANGE:
        raise ApiError(
            "Range too long.", fields={"since": [f"At most {MAX_RANGE.days} days before until."]}
        )
    return Query(
        principal=principal,
        since=since,
        until=until,
        kinds=_kinds(params.kind),
        status=params.status,
        dimension=params.dimension,
        limit=params.limit,
        filters={n: v for n in FILTERS if (v := getattr(params, n)) not in (None, "")},
    )


def _kinds(raw: str | list[str] | None) -> tuple[str, ...]:
    names = raw.split(",") if isinstance(raw, str) else list(raw or [])
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in KINDS:
            raise ApiError(
                "Unknown recommendation kind.",
                fields={"kind": [f"Unknown kind {name!r}; use {', '.join(KINDS)}."]},
            )
        out.append(name)
    return tuple(dict.fromkeys(out)) or KINDS


def require_enabled() -> None:
    if not manager_config().optimization_enabled:
        raise ApiError(
            "Recommendations are turned off (optimization_enabled is off in the manager settings).",
            status_code=409,
            code="optimization_disabled",
            fields={
                "optimization_enabled": [
                    "Turn it on in the admin's manager settings to compute recommendations."
                ]
            },
        )


# --- computing ---------------------------------------------------------------------------------


def _aggregate(principal: Principal, filters: dict[str, str]) -> opportunities.Aggregate:
    def run(group_by: Sequence[str], *, since: datetime, until: datetime) -> rollups.Result:
        return aggregate_for(
            principal,
            filters=filters,
            group_by=group_by,
            since=since,
            until=until,
            limit=MAX_GROUPS,
        )

    return run


def compute(
    principal: Principal,
    *,
    since: datetime,
    until: datetime,
    filters: dict[str, str],
    kinds: Iterable[str] = KINDS,
    dims: Sequence[str] = opportunities.DIMENSIONS,
    min_requests: int = opportunities.MIN_REQUESTS,
) -> list[opportunities.Opportunity]:
    """The recommendations the caller's data holds (no writes): rollups over [since, until),
    the ledger over its bounded sample window (opportunities.sample_window)."""
    return opportunities.find(
        principal,
        _aggregate(principal, filters),
        since=since,
        until=until,
        filters=filters,
        kinds=kinds,
        dims=dims,
        min_requests=min_requests,
        sample=True,
    ).items


def key_for(item: opportunities.Opportunity) -> str:
    key = "|".join([item.kind, item.dimension, item.target, item.team_id, item.project_id])
    if len(key) <= KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: KEY_LENGTH - len(digest) - 1]}#{digest}"


def _about(item: opportunities.Opportunity) -> dict[str, Any]:
    """What a stored row needs to be shown (and tracked) without computing it again."""
    window = item.window
    return {
        "value": item.value,
        "provider": item.provider,
        "model": item.model,
        "requests": item.requests,
        "savings": money(item.savings),
        "saves_money": item.saves_money,
        "window": {**window.evidence(), "seconds": window.seconds} if window else None,
    }


def store(
    items: Sequence[opportunities.Opportunity], *, refresh: bool = True
) -> dict[str, Recommendation]:
    """Create or (`refresh`: the beat job) update a row per item, its decision left alone; the
    rows by key. A read only creates: a stored row's figures are its scope's whole traffic,
    refreshed by the job."""
    rows = {}
    for item in items:
        key = key_for(item)
        rows[key] = Recommendation(
            key=key,
            kind=item.kind,
            dimension=item.dimension,
            target=item.target[:TARGET_LENGTH],
            team_id=item.team_id,
            project_id=item.project_id,
            monthly_savings=item.monthly_savings,
            confidence=item.confidence,
            action=item.action[:ACTION_LENGTH],
            evidence={**item.evidence, "about": _about(item)},
        )
    if not refresh:
        # Reads only create what is new (the beat job refreshes the figures): a GET writes
        # nothing when every recommendation it sees is already stored.
        stored = _stored(list(rows))
        missing = [rows[k] for k in sorted(rows) if k not in stored]
        if missing:
            Recommendation.objects.bulk_create(missing, batch_size=500, ignore_conflicts=True)
            stored.update(_stored([row.key for row in missing]))
        return stored
    if rows:
        Recommendation.objects.bulk_create(
            [rows[k] for k in sorted(rows)],  # one lock order: concurrent upserts never deadlock
            batch_size=500,
            update_conflicts=True,
            unique_fields=["key"],
            update_fields=[
                "kind",
                "dimension",
                "target",
                "team_id",
                "project_id",
                "monthly_savings",
                "confidence",
                "action",
                "evidence",
                "last_seen",
            ],
        )
    return _stored(list(rows))


def _stored(keys: list[str]) -> dict[str, Recommendation]:
    stored: dict[str, Recommendation] = {}
    for start in range(0, len(keys), 500):
        for row in Recommendation.objects.filter(key__in=keys[start : start + 500]):
            stored[row.key] = row
    return stored


# --- the list ----------------------------------------------------------------------------------


def recommendations_list(
    principal: Principal, data: Any, *, now: datetime | None = None
) -> dict[str, Any]:
    """GET /recommendations: live recommendations in the caller's scope joined with their
    stored decisions (each stored when first seen; the beat job refreshes stored figures),
    plus decided ones no longer seen."""
    require_enabled()
    now = now or timezone.now()
    query = parse(principal, data, now=now)
    live = compute(principal, since=query.since, until=query.until, filters=query.filters)
    stored = store(live, refresh=False)
    shown: list[tuple[Recommendation, opportunities.Opportunity | None]] = []
    for item in live:
        row = stored[key_for(item)]
        if _wanted(query, row):
            shown.append((row, item))
    if query.status != Status.OPEN:
        # Decided rows stay listed when no longer computed (open ones too with status=all).
        kept = Recommendation.objects.filter(kind__in=query.kinds)
        if query.status != "all":
            kept = kept.exclude(status=Status.OPEN)
        if query.dimension:
            kept = kept.filter(dimension=query.dimension)
        order = (F("decided_at").desc(nulls_last=True), "-last_seen", "pk")
        for row in in_scope(kept, principal).order_by(*order)[: query.limit + len(stored)]:
            if row.key not in stored and _wanted(query, row) and _matches(row, query.filters):
                shown.append((row, None))
    truncated = len(shown) > query.limit
    shown = shown[: query.limit]
    tracked = track([r for r, _i in shown if r.status == Status.ACCEPTED], until=now)
    items = [item_out(row, item, tracked.get(row.pk)) for row, item in shown]
    by_dimension: dict[str, Decimal] = {}
    for out in items:
        if out["live"]:
            dim = out["dimension"]
            by_dimension[dim] = by_dimension.get(dim, Decimal(0)) + Decimal(out["monthly_savings"])
    return {
        "since": query.since.isoformat(),
        "until": query.until.isoformat(),
        "currency": "USD",
        "filters": query.filters,
        "kinds": list(query.kinds),
        "status": query.status or "open,accepted",
        "count": len(items),
        "truncated": truncated,
        "monthly_savings_by_dimension": {d: money(v) for d, v in sorted(by_dimension.items())},
        "results": items,
    }


def _wanted(query: Query, row: Recommendation) -> bool:
    if row.kind not in query.kinds:
        return False
    if query.dimension and row.dimension != query.dimension:
        return False
    if query.status is None:
        return row.status != Status.DISMISSED
    return query.status in ("all", row.status)


def _matches(row: Recommendation, filters: dict[str, str]) -> bool:
    """A stored row not computed now, against the attribution filters it can be told by."""
    about = row.evidence.get("about") or {}
    for name, value in filters.items():
        if name in ("team_id", "project_id"):
            if getattr(row, name) != value:
                return False
        elif name in ("provider", "model"):
            if about.get(name) != value:
                return False
        elif name in ("feature", "agent"):
            if (row.dimension, about.get("value")) != (name, value):
                return False
        else:
            return False  # user_id, task_type: not what a stored row records
    return True


def item_out(
    row: Recommendation,
    item: opportunities.Opportunity | None,
    tracking: dict[str, Any] | None,
) -> dict[str, Any]:
    """One item: the figures computed now when it is live (the stored ones otherwise), and the
    stored row's id and decision."""
    if item is not None:
        about, evidence = _about(item), item.evidence
        monthly, confidence, action = item.monthly_savings, item.confidence, item.action
    else:
        about = row.evidence.get("about") or {}
        evidence = {k: v for k, v in row.evidence.items() if k != "about"}
        monthly, confidence, action = row.monthly_savings, row.confidence, row.action
    return {
        "id": row.pk,
        "key": row.key,
        "kind": row.kind,
        "dimension": row.dimension,
        "target": row.target,
        "value": about.get("value", ""),
        "provider": about.get("provider", ""),
        "model": about.get("model", ""),
        "team_id": row.team_id,
        "project_id": row.project_id,
        "savings": about.get("savings", "0"),
        "monthly_savings": money(monthly),
        "saves_money": bool(about.get("saves_money", True)),
        "confidence": confidence,
        "requests": int(about.get("requests", 0)),
        "window": about.get("window"),
        "evidence": evidence,
        "action": action,
        "status": row.status,
        "live": item is not None,
        "first_seen": row.first_seen.isoformat(),
        "last_seen": row.last_seen.isoformat(),
        "decided_at": row.decided_at.isoformat() if row.decided_at else None,
        "decided_by": row.decided_by,
        "note": row.note,
        "tracking": tracking,
    }


# --- decisions -----------------------------------------------------------------------------------


def recommendation_for_principal(
    principal: Principal, rec_id: int, *, lock: bool = False
) -> Recommendation:
    """The one gate onto stored recommendations: a 404 outside the caller's scope."""
    rows = in_scope(Recommendation.objects.all(), principal)
    if lock:
        rows = rows.select_for_update()
    row = rows.filter(pk=rec_id).first()
    if row is None:
        raise ApiError(
            "Recommendation not found.",
            fields={"rec_id": ["No such recommendation in your scope."]},
            status_code=404,
            code="not_found",
        )
    return row


def _who(principal: Principal) -> str:
    if principal.user_id is not None:
        name = (
            get_user_model()
            .objects.filter(pk=principal.user_id)
            .values_list("username", flat=True)
            .first()
        )
        return f"{name} ({principal.label})" if name else principal.label
    return principal.label


def baseline(row: Recommendation, *, now: datetime) -> tuple[int, int]:
    """(saving per day in 1e-10 USD units, days of its window): measured as tracking measures
    it, over the 30 days before the current hour in the row's own scope; from the row's last
    evidence when that finds it no more."""
    until = now.replace(minute=0, second=0, microsecond=0)
    found = compute(
        scope_principal(row.team_id, row.project_id),
        since=until - DEFAULT_RANGE,
        until=until,
        filters={},
        kinds=[row.kind],
        dims=["model"] if row.dimension in ("team", "budget") else [row.dimension],
        min_requests=1,
    )
    for item in found:
        if (item.kind, item.dimension, item.target[:TARGET_LENGTH]) == _measured_as(row):
            measured = item.window.seconds if item.window else 86400
            return item.daily_units, max(1, round(measured / 86400))
    about = row.evidence.get("about") or {}
    window = about.get("window") or {}
    seconds = int(window.get("seconds") or 86400)
    units = rollups.money_to_units(Decimal(str(about.get("savings", "0"))))
    return round(Decimal(units) * 86400 / seconds), max(1, round(seconds / 86400))


def _same_decision(row: Recommendation, status: str) -> None:
    if row.status == status:
        raise ApiError(
            f"Already {status}.",
            status_code=409,
            code="conflict",
            fields={"rec_id": [f"This recommendation was {status} on {row.decided_at}."]},
        )


def recommendation_decide(
    *,
    principal: Principal,
    rec_id: int,
    status: str,
    note: str = "",
    now: datetime | None = None,
) -> Recommendation:
    """Dismiss or accept a recommendation inside the caller's scope, recording who and when;
    accepting stores the baseline it is tracked against. The same decision twice is a 409."""
    require_enabled()
    now = now or timezone.now()
    _same_decision(recommendation_for_principal(principal, rec_id), status)
    # Measured before the row is locked (an engine run): the baseline of an acceptance.
    measured = None
    if status == Status.ACCEPTED:
        measured = baseline(recommendation_for_principal(principal, rec_id), now=now)
    with transaction.atomic():
        row = recommendation_for_principal(principal, rec_id, lock=True)
        _same_decision(row, status)
        row.status = status
        row.decided_at = now
        row.decided_by = _who(principal)[:200]
        row.note = note
        fields = ["status", "decided_at", "decided_by", "note"]
        if measured is not None:
            row.baseline_daily_units, row.baseline_days = measured
            fields += ["baseline_daily_units", "baseline_days"]
        row.save(update_fields=fields)
    return row


def decision_out(row: Recommendation) -> dict[str, Any]:
    return {
        "id": row.pk,
        "key": row.key,
        "kind": row.kind,
        "dimension": row.dimension,
        "target": row.target,
        "team_id": row.team_id,
        "project_id": row.project_id,
        "status": row.status,
        "decided_at": row.decided_at.isoformat() if row.decided_at else None,
        "decided_by": row.decided_by,
        "note": row.note,
        "baseline_daily_savings": (
            None
            if row.baseline_daily_units is None
            else rollups.units_text(row.baseline_daily_units)
        ),
        "baseline_days": row.baseline_days,
    }


# --- tracking ---------------------------------------------------------------------------------


def scope_principal(team_id: str, project_id: str) -> Principal:
    """Who sees exactly one scope's usage: the measurement of a stored recommendation."""
    scope = PROJECT if project_id else TEAM if team_id else GLOBAL
    return Principal(scope=scope, team_id=team_id, project_id=project_id)


def track(rows: Sequence[Recommendation], *, until: datetime) -> dict[int, dict[str, Any]]:
    """Each accepted row's realized saving up to `until`: its waste measured the same way from
    the acceptance on (over at most its baseline's window), against the baseline. One engine
    run per scope and start hour."""
    runs: dict[tuple[str, str, datetime], list[Recommendation]] = {}
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.decided_at is None or row.baseline_daily_units is None:
            continue
        window = timedelta(days=row.baseline_days or 30)
        since = _ceil_hour(max(row.decided_at, until - window))
        if until - row.decided_at < MIN_TRACKED or since >= until:
            out[row.pk] = _tracking(row, None, None, until)
            continue
        runs.setdefault((row.team_id, row.project_id, since), []).append(row)
    for (team, project, since), group in runs.items():
        found = compute(
            scope_principal(team, project),
            since=since,
            until=until,
            filters={},
            kinds={r.kind for r in group},
            dims=sorted({r.dimension for r in group if r.dimension != "budget"}) or ["model"],
            min_requests=1,
        )
        current = {(o.kind, o.dimension, o.target[:TARGET_LENGTH]): o for o in found}
        for row in group:
            item = current.get(_measured_as(row))
            out[row.pk] = _tracking(row, item.daily_units if item else 0, since, until)
    return out


def _measured_as(row: Recommendation) -> tuple[str, str, str]:
    """What a row is found as when its own scope is measured: a team target of a team-scoped
    row is that scope's whole traffic on its model (the engine gives a team's key no team
    targets)."""
    if row.dimension == "team" and row.team_id:
        about = row.evidence.get("about") or {}
        provider, model = about.get("provider", ""), about.get("model", "")
        return row.kind, "model", f"{provider}/{model}" if provider else model
    return row.kind, row.dimension, row.target


def _ceil_hour(at: datetime) -> datetime:
    floor = at.replace(minute=0, second=0, microsecond=0)
    return floor if floor == at else floor + timedelta(hours=1)


def _tracking(
    row: Recommendation, current: int | None, since: datetime | None, until: datetime
) -> dict[str, Any]:
    accepted_at = row.decided_at or until
    baseline_units = row.baseline_daily_units or 0
    elapsed = Decimal((until - accepted_at).total_seconds())
    realized = None
    if current is not None:
        realized = round((baseline_units - current) * elapsed / 86400)
    return {
        "accepted_at": accepted_at.isoformat(),
        "baseline_daily_savings": rollups.units_text(baseline_units),
        "baseline_days": row.baseline_days,
        "current_daily_waste": None if current is None else rollups.units_text(current),
        "measured_since": since.isoformat() if since else None,
        "measured_until": until.isoformat(),
        "days_since_acceptance": f"{elapsed / 86400:.2f}",
        "realized_savings": None if realized is None else rollups.units_text(realized),
        "method": "(baseline per day - current waste per day) x days since acceptance; the "
        "current waste measured as the baseline was, from the acceptance on",
    }


def accepted_section(principal: Principal, *, until: datetime) -> list[dict[str, Any]]:
    """The optimization report's "accepted": what each accepted recommendation in the
    caller's scope saved so far (up to the report's end)."""
    rows = list(
        in_scope(Recommendation.objects.filter(status=Status.ACCEPTED), principal)
        .filter(decided_at__lt=until)
        .order_by("-decided_at")[:MAX_ITEMS]
    )
    tracked = track(rows, until=until)
    return [
        {
            "id": row.pk,
            "kind": row.kind,
            "dimension": row.dimension,
            "target": row.target,
            "team_id": row.team_id,
            "project_id": row.project_id,
            "decided_by": row.decided_by,
            **{k: v for k, v in tracked.get(row.pk, {}).items() if k != "method"},
        }
        for row in rows
    ]


# --- the beat job --------------------------------------------------------------------------------


def recommendations_refresh(*, now: datetime | None = None) -> dict[str, int]:
    """Organisation-wide: compute every recommendation over the last 30 days, store or refresh
    its row, recompute the scopes of stored rows the organisation-wide run did not see, and mark
    the rest `evidence.stale`. Idempotent; nothing when optimization_enabled is off."""
    if not manager_config().optimization_enabled:
        return {"skipped": 1}
    now = now or timezone.now()
    until = now.replace(minute=0, second=0, microsecond=0)
    since = until - DEFAULT_RANGE
    seen = set(store(compute(scope_principal("", ""), since=since, until=until, filters={})))
    rest = Recommendation.objects.values_list("key", "team_id", "project_id")
    scopes = {(t, p) for k, t, p in rest if k not in seen and (t or p)}
    for team, project in sorted(scopes):
        found = compute(scope_principal(team, project), since=since, until=until, filters={})
        seen |= set(store(found))
    stale = 0
    for row in Recommendation.objects.only("id", "key", "evidence").iterator(chunk_size=500):
        if row.key in seen or row.evidence.get("stale"):
            continue
        row.evidence = {**row.evidence, "stale": True, "stale_since": until.isoformat()}
        row.save(update_fields=["evidence"])
        stale += 1
    return {"seen": len(seen), "stale": stale, "scopes": len(scopes) + 1}
