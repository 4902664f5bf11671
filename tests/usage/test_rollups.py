"""Hourly rollups: kept with the ledger in the same statement, read by the summary and the budget
counters, surviving retention, rebuilt on demand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F, Sum
from django.utils import timezone

from tests.conftest import Persona, event, settle
from usage import rollups, services
from usage.migrations._rollups_0007 import SQL
from usage.models import LedgerPurge, ModelDayRollup, ModelRollup, TokenUsage, UsageRollup

pytestmark = pytest.mark.django_db

# A fixed hour well inside retention, so the test data's hours are known.
BASE = (timezone.now() - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)


def _at(hours: float) -> str:
    return (BASE + timedelta(hours=hours)).isoformat()


def _post(persona: Persona, events: list[dict[str, Any]]) -> None:
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code in (200, 201, 207), response.content
    settle()


def _ledger_totals(**filters: Any) -> tuple[int, int, Decimal]:
    agg = TokenUsage.objects.filter(**filters).aggregate(i=Sum("input_tokens"), c=Sum("cost"))
    count = TokenUsage.objects.filter(**filters).count()
    return count, agg["i"] or 0, Decimal(str(agg["c"] or 0))


def _rollup_totals(model: Any = UsageRollup) -> tuple[int, int, Decimal]:
    agg = model.objects.aggregate(r=Sum("requests"), i=Sum("input_tokens"), c=Sum("cost_units"))
    return agg["r"] or 0, agg["i"] or 0, rollups.units_to_money(agg["c"] or 0)


def _mixed(n: int = 40) -> list[dict[str, Any]]:
    models = ("gpt-4o", "gpt-4o-mini", "no-such-model")
    return [
        event(
            f"m{i}",
            model=models[i % 3],
            team_id=f"t{i % 2}",
            user_id=f"u{i % 5}",
            input_tokens=1000 + i,
            output_tokens=10 * i,
            status="error" if i % 7 == 0 else "success",
            occurred_at=_at(i * 0.37),
        )
        for i in range(n)
    ]


def test_it_keeps_both_rollups_equal_to_the_ledger_after_ingestion(platform: Persona) -> None:
    _post(platform, _mixed())
    assert _rollup_totals(UsageRollup) == _ledger_totals()
    assert _rollup_totals(ModelRollup) == _ledger_totals()
    assert _rollup_totals(ModelDayRollup) == _ledger_totals()
    unpriced = UsageRollup.objects.aggregate(n=Sum("unpriced_requests"))["n"]
    assert unpriced == TokenUsage.objects.filter(unpriced=True).count()
    assert unpriced > 0


def test_a_repeated_request_id_is_not_counted_twice_in_the_rollups(platform: Persona) -> None:
    _post(platform, _mixed(10))
    _post(platform, _mixed(10))  # every id again: duplicates
    assert _rollup_totals() == _ledger_totals() == (10, *_ledger_totals()[1:])


def test_each_hour_holds_its_own_rows(platform: Persona) -> None:
    _post(platform, [event("a", occurred_at=_at(0.1)), event("b", occurred_at=_at(0.9)),
                     event("c", occurred_at=_at(1.0))])  # fmt: skip
    by_hour = dict(ModelRollup.objects.values_list("bucket", "requests"))
    assert by_hour == {BASE: 2, BASE + timedelta(hours=1): 1}


def test_the_frozen_migration_sql_is_what_the_code_generates() -> None:
    # Changing MEASURES or the dimensions needs a new migration that installs the new trigger.
    vendor = connection.vendor
    assert SQL[vendor]["trigger"] == rollups.trigger_sql(vendor)


def test_the_summary_reads_rollups_for_whole_hours(platform: Persona) -> None:
    _post(platform, _mixed())
    params = {"since": _at(0), "until": _at(24), "group_by": "team_id"}
    body = platform.client.get("/api/v1/usage/summary", params).json()
    assert body["source"] == "rollups"
    for row in body["rows"]:
        count, tokens, cost = _ledger_totals(team_id=row["team_id"])
        assert (row["requests"], row["input_tokens"], Decimal(row["cost"])) == (count, tokens, cost)


def test_a_sub_hour_range_adds_the_ledger_for_its_edges(platform: Persona) -> None:
    _post(platform, _mixed())
    since, until = BASE + timedelta(minutes=20), BASE + timedelta(hours=5, minutes=10)
    body = platform.client.get(
        "/api/v1/usage/summary", {"since": since.isoformat(), "until": until.isoformat()}
    ).json()
    assert body["source"] == "rollups+ledger"
    count, tokens, cost = _ledger_totals(occurred_at__gte=since, occurred_at__lt=until)
    row = body["rows"][0]
    assert (row["requests"], row["input_tokens"], Decimal(row["cost"])) == (count, tokens, cost)


def test_days_in_a_half_hour_time_zone_match_the_ledger(platform: Persona) -> None:
    _post(platform, _mixed())
    body = platform.client.get(
        "/api/v1/usage/summary",
        {"since": _at(-24), "until": _at(48), "interval": "day", "tz": "Asia/Kolkata"},
    ).json()
    assert body["source"] == "rollups+ledger"  # the hours cut at local midnight: from the ledger
    for row in body["rows"]:
        start = datetime.fromisoformat(row["period"])
        expected = _ledger_totals(occurred_at__gte=start, occurred_at__lt=start + timedelta(1))
        assert (row["requests"], row["input_tokens"], Decimal(row["cost"])) == expected


def test_a_dimension_rollups_lack_is_answered_from_the_ledger(platform: Persona) -> None:
    _post(platform, [event("w1", workflow_id="wf", occurred_at=_at(1))])
    body = platform.client.get("/api/v1/usage/summary", {"group_by": "workflow_id"}).json()
    assert body["source"] == "ledger"
    assert body["rows"][0]["workflow_id"] == "wf"


def test_retention_deletes_raw_rows_and_reports_still_answer_from_rollups(
    platform: Persona,
) -> None:
    old = timezone.now() - timedelta(days=200)
    _post(platform, [event("old", occurred_at=old.isoformat(), input_tokens=777),
                     event("new", input_tokens=5)])  # fmt: skip
    services.manager_config_update(retention_days=90)
    assert services.usage_purge_expired() == 1
    assert list(TokenUsage.objects.values_list("request_id", flat=True)) == ["new"]
    assert LedgerPurge.objects.get().deleted == 1
    day = old.replace(minute=0, second=0, microsecond=0)
    since, until = day - timedelta(days=1), day + timedelta(days=1)
    body = platform.client.get(
        "/api/v1/usage/summary", {"since": since.isoformat(), "until": until.isoformat()}
    ).json()
    assert body["source"] == "rollups"
    assert body["rows"][0]["input_tokens"] == 777


def test_a_sub_hour_range_over_purged_usage_is_a_400_naming_since(platform: Persona) -> None:
    old = timezone.now() - timedelta(days=200)
    _post(platform, [event("old", occurred_at=old.isoformat())])
    services.manager_config_update(retention_days=90)
    services.usage_purge_expired()
    response = platform.client.get(
        "/api/v1/usage/summary", {"since": (old - timedelta(minutes=5)).isoformat()}
    )
    assert response.status_code == 400
    assert "deleted by retention" in response.json()["error"]["fields"]["since"][0]


def test_rebuild_corrects_a_drifted_rollup_and_reports_the_difference(platform: Persona) -> None:
    _post(platform, _mixed())
    UsageRollup.objects.filter(team_id="t0").update(requests=F("requests") + 3)
    ModelRollup.objects.filter(team_id="t1").delete()
    out = StringIO()
    call_command("rollups", "rebuild", since=_at(-1), until=_at(24), stdout=out)
    text = out.getvalue()
    assert "usage_usagerollup: 20 groups corrected, requests -60" in text
    assert "usage_modelrollup: 20 groups corrected, requests +20" in text
    assert _rollup_totals(UsageRollup) == _ledger_totals() == _rollup_totals(ModelRollup)
    again = rollups.rebuild(since=BASE - timedelta(hours=1), until=BASE + timedelta(hours=24))
    assert [r.groups_changed for r in again] == [0, 0, 0]


def test_rebuild_refuses_an_inverted_range() -> None:
    with pytest.raises(CommandError, match="since"):
        call_command("rollups", "rebuild", since=_at(5), until=_at(1), stdout=StringIO())


def test_adjust_moves_the_rollups_as_the_trigger_would(platform: Persona) -> None:
    _post(platform, _mixed(12))
    rows = list(TokenUsage.objects.values(*rollups.ADJUST_COLUMNS))
    after = [{**r, "cost": Decimal(str(r["cost"])) * 2, "unpriced": False} for r in rows]
    rollups.adjust(before=rows, after=after)
    TokenUsage.objects.update(cost=F("cost") * 2, unpriced=False)
    again = rollups.rebuild(since=BASE - timedelta(hours=1), until=BASE + timedelta(hours=24))
    assert [r.groups_changed for r in again] == [0, 0, 0]


def test_budget_spend_counts_usage_that_retention_purged(platform: Persona) -> None:
    old = datetime.now(UTC) - timedelta(days=120)
    _post(platform, [event("old", team_id="t9", occurred_at=old.isoformat()),
                     event("new", team_id="t9")])  # fmt: skip
    both = rollups.totals(
        filters={"team_id": "t9"}, since=old - timedelta(days=1), until=timezone.now()
    )
    services.manager_config_update(retention_days=90)
    services.usage_purge_expired()
    after = rollups.totals(
        filters={"team_id": "t9"}, since=old - timedelta(days=1), until=timezone.now()
    )
    assert after == both
    assert after[2] == 2


def test_a_summary_without_groups_is_one_row_even_of_nothing(platform: Persona) -> None:
    body = platform.client.get("/api/v1/usage/summary", {"since": _at(0)}).json()
    assert [(r["requests"], r["cost"]) for r in body["rows"]] == [(0, "0")]


@pytest.mark.parametrize("interval", [None, "hour", "day"])
def test_a_subset_of_measures_sums_the_same_as_all(platform: Persona, interval: str | None) -> None:
    """aggregate(measures=...) reads only those sums, rollup and ledger halves alike."""
    _post(platform, _mixed())
    since, until = BASE + timedelta(minutes=20), BASE + timedelta(hours=15, minutes=10)
    common: dict[str, Any] = {
        "ledger": TokenUsage.objects.all(),
        "filters": {},
        "group_by": ["team_id"],
        "since": since,
        "until": until,
        "interval": interval,
    }
    everything = rollups.aggregate(**common)
    some = rollups.aggregate(**common, measures=("output_tokens", "cost_units"))
    assert some.plan.source == "rollups+ledger"
    assert some.rows
    assert some.rows == {
        key: {"output_tokens": v["output_tokens"], "cost_units": v["cost_units"]}
        for key, v in everything.rows.items()
    }
    with pytest.raises(ValueError, match="unknown measures"):
        rollups.aggregate(**common, measures=("cost",))


def test_a_filter_outside_the_scope_matches_nothing(platform: Persona) -> None:
    _post(platform, _mixed())
    common: dict[str, Any] = {
        "ledger": TokenUsage.objects.all(),
        "group_by": ["team_id"],
        "since": BASE,
        "until": BASE + timedelta(hours=20),
        "scope": {"team_id": "t0"},
    }
    assert rollups.aggregate(**common, filters={"team_id": "t1"}).rows == {}
    inside = rollups.aggregate(**common, filters={"team_id": "t0"}).rows
    assert list(inside) == [("t0",)]
    assert inside == rollups.aggregate(**common, filters={}).rows
