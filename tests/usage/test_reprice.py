"""Re-pricing past usage (issue 12, pricing history): POST /api/v1/pricing/reprice, the ModelPrice
admin action, and what applying does to the ledger, the rollups, the audit and budget counters.

Known data: four requests in one UTC hour two days ago, priced by the catalogue when they
arrived (gpt-4o-mini: 0.15 USD per million input tokens, 0.6 per million output); then an
override of gpt-4o-mini (1 and 2 USD) that took effect ten minutes into that hour is saved.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from tests.conftest import Persona, StaffSession, event, settle
from usage import rollups, services
from usage.models import ModelPrice, Repricing, TokenUsage

pytestmark = pytest.mark.django_db

URL = "/api/v1/pricing/reprice"
HOUR = (timezone.now() - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
SINCE, UNTIL = HOUR.isoformat(), (HOUR + timedelta(hours=1)).isoformat()


def _at(minutes: int) -> str:
    return (HOUR + timedelta(minutes=minutes)).isoformat()


def _ledger(platform: Persona) -> ModelPrice:
    """The known data; returns the override."""
    events = [
        # Before the override takes effect: stays at the catalogue price (0.015).
        event("early", input_tokens=100_000, output_tokens=0, occurred_at=_at(5)),
        # 0.015 -> 0.1
        event("mini-1", input_tokens=100_000, output_tokens=0, occurred_at=_at(20)),
        # 0.0075 + 0.015 = 0.0225 -> 0.05 + 0.05 = 0.1
        event("mini-2", input_tokens=50_000, output_tokens=25_000, occurred_at=_at(30)),
        # Another model: unchanged.
        event("big", model="gpt-4o", input_tokens=1000, output_tokens=100, occurred_at=_at(40)),
    ]
    for item in events:
        item.setdefault("team_id", "search")
    response = platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert [r["status"] for r in response.json()["results"]] == ["created"] * 4
    settle()
    response = platform.client.post(
        "/api/v1/pricing",
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_per_mtok": "1",
            "output_per_mtok": "2",
            "effective_from": _at(10),
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    return ModelPrice.objects.get(pk=response.json()["id"])


def _reprice(persona: Persona, **fields: Any) -> Any:
    body = {"since": SINCE, "until": UNTIL, **fields}
    return persona.client.post(URL, body, format="json")


def _costs() -> dict[str, tuple[Decimal, str, str]]:
    return {
        r.request_id: (r.cost, r.price_source, r.price_ref)
        for r in TokenUsage.objects.order_by("request_id")
    }


def _ledger_total() -> Decimal:
    # Row by row: SQLite's own SUM adds its decimals as doubles.
    return sum(TokenUsage.objects.values_list("cost", flat=True), Decimal(0))


def test_a_dry_run_reports_exact_differences_per_model_and_changes_nothing(
    platform: Persona,
) -> None:
    _ledger(platform)
    big_cost = TokenUsage.objects.get(request_id="big").cost
    before = _costs()

    response = _reprice(platform)

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["applied"] is False
    assert body["repricing_id"] is None
    big, mini = body["models"]  # sorted by provider and model
    assert (mini["provider"], mini["model"], mini["rows"], mini["rows_changed"]) == (
        "openai",
        "gpt-4o-mini",
        3,
        2,
    )
    assert (mini["cost_before"], mini["cost_after"], mini["difference"]) == (
        "0.0525",
        "0.215",
        "0.1625",
    )
    assert (big["model"], big["rows"], big["rows_changed"], big["difference"]) == (
        "gpt-4o",
        1,
        0,
        "0",
    )
    assert (body["rows_seen"], body["rows_changed"], body["difference"]) == (4, 2, "0.1625")
    assert Decimal(body["cost_before"]) == Decimal("0.0525") + big_cost
    assert Decimal(body["cost_after"]) == Decimal("0.215") + big_cost
    assert _costs() == before
    assert not Repricing.objects.exists()


def test_applying_rewrites_costs_and_records_which_price_each_row_uses(
    platform: Persona,
) -> None:
    override = _ledger(platform)
    before = _costs()

    response = _reprice(platform, apply=True)

    assert response.status_code == 201, response.json()
    after = _costs()
    assert after["mini-1"] == (
        Decimal("0.1"),
        "override",
        f"override #{override.pk} from {override.effective_from:%Y-%m-%d}",
    )
    assert after["mini-2"][:2] == (Decimal("0.1"), "override")
    row = TokenUsage.objects.get(request_id="mini-2")
    assert (row.input_cost, row.output_cost) == (Decimal("0.05"), Decimal("0.05"))
    assert after["early"] == before["early"]
    assert after["big"] == before["big"]
    assert after["early"][1] == "catalogue"


def test_after_applying_the_rollups_equal_a_rebuild_and_the_summary_equals_the_ledger(
    platform: Persona,
) -> None:
    _ledger(platform)
    _reprice(platform, apply=True)

    summary = platform.client.get(
        "/api/v1/usage/summary", {"since": SINCE, "until": UNTIL, "group_by": "model"}
    ).json()

    assert summary["source"] == "rollups"
    by_model = {r["model"]: Decimal(r["cost"]) for r in summary["rows"]}
    ledger = {
        m: sum(TokenUsage.objects.filter(model=m).values_list("cost", flat=True), Decimal(0))
        for m in ("gpt-4o-mini", "gpt-4o")
    }
    assert by_model == ledger
    assert by_model["gpt-4o-mini"] == Decimal("0.215")
    rebuilt = rollups.rebuild(since=HOUR, until=HOUR + timedelta(hours=1))
    assert [r.groups_changed for r in rebuilt] == [0, 0, 0]


def test_the_audit_entry_holds_who_when_what_and_the_totals(platform: Persona) -> None:
    _ledger(platform)
    started = timezone.now()

    body = _reprice(platform, apply=True, model="GPT-4o-mini").json()

    entry = Repricing.objects.get(pk=body["repricing_id"])
    assert platform.key is not None
    assert entry.actor == f"api key #{platform.key.pk} (global)"
    assert started <= entry.applied_at <= timezone.now()
    assert (entry.since, entry.until) == (HOUR, HOUR + timedelta(hours=1))
    assert (entry.provider, entry.model) == ("", "GPT-4o-mini")
    assert (entry.rows_seen, entry.rows_changed) == (3, 2)
    assert (entry.cost_before, entry.cost_after) == (Decimal("0.0525"), Decimal("0.215"))
    assert entry.per_model == body["models"]
    assert entry.cost_after == _ledger_total() - TokenUsage.objects.get(request_id="big").cost


def test_applying_twice_changes_nothing_the_second_time(platform: Persona) -> None:
    _ledger(platform)
    _reprice(platform, apply=True)
    after_first = _costs()

    body = _reprice(platform, apply=True).json()

    assert (body["rows_changed"], body["difference"]) == (0, "0")
    assert _costs() == after_first
    rebuilt = rollups.rebuild(since=HOUR, until=HOUR + timedelta(hours=1))
    assert [r.groups_changed for r in rebuilt] == [0, 0, 0]


def test_a_range_walked_in_small_batches_over_empty_hours_sees_every_row_once(
    platform: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("usage.services.reprice.BATCH_ROWS", 2)
    # Three at one instant (the keyset's tie on occurred_at), then gaps of empty hours.
    minutes = [5, 5, 5, 6, 190, 190, 430]
    events = [
        event(f"w{i}", occurred_at=_at(m), input_tokens=100_000, output_tokens=0)
        for i, m in enumerate(minutes)
    ]
    platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    settle()
    services.model_price_set(
        provider="openai",
        model="gpt-4o-mini",
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        effective_from=HOUR,
    )
    until = HOUR + timedelta(hours=9)

    body = _reprice(platform, until=until.isoformat(), apply=True).json()

    assert (body["rows_seen"], body["rows_changed"]) == (7, 7)
    assert body["difference"] == str(7 * (Decimal("0.1") - Decimal("0.015")))
    assert set(TokenUsage.objects.values_list("cost", flat=True)) == {Decimal("0.1")}
    assert [r.groups_changed for r in rollups.rebuild(since=HOUR, until=until)] == [0, 0, 0]


def test_a_range_reaching_before_what_retention_deleted_is_refused_naming_since(
    platform: Persona,
) -> None:
    now = timezone.now()
    old = event("ancient", occurred_at=(now - timedelta(days=500)).isoformat())
    platform.client.post("/api/v1/usage", old, format="json")
    settle()
    services.manager_config_update(retention_days=400)
    assert services.usage_purge_expired() == 1

    response = platform.client.post(
        URL,
        {
            "since": (now - timedelta(days=400, hours=2)).isoformat(),
            "until": (now - timedelta(days=399)).isoformat(),
        },
        format="json",
    )

    assert response.status_code == 400
    assert "retention" in response.json()["error"]["fields"]["since"][0]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"since": UNTIL, "until": SINCE}, "until"),  # inverted
        ({"until": SINCE}, "until"),  # empty
        ({"since": "last tuesday"}, "since"),
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"since": "2020-01-01T00:00:00Z", "until": "2021-01-02T00:00:01Z"}, "until"),  # too long
        ({"since": None}, "since"),
        ({"apply": "yes"}, "apply"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    platform: Persona, fields: dict[str, Any], field: str
) -> None:
    response = _reprice(platform, **{"apply": True, **fields})

    assert response.status_code == 400, response.json()
    assert field in response.json()["error"]["fields"]
    assert not Repricing.objects.exists()


def test_a_scoped_key_or_staff_without_the_price_permission_may_not_reprice(
    platform: Persona, team_lead: Persona, staff_viewer: StaffSession
) -> None:
    _ledger(platform)
    before = _costs()

    assert _reprice(team_lead, apply=True).status_code == 403
    assert _reprice(staff_viewer, apply=True).status_code == 403
    assert _costs() == before


def test_the_admin_action_confirms_the_dry_run_then_applies_it(
    platform: Persona, admin: StaffSession
) -> None:
    override = _ledger(platform)
    before = _costs()
    action = {"action": "reprice_from_start", "_selected_action": [override.pk]}

    page = admin.client.post("/admin/usage/modelprice/", action)

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="reprice-models"' in html
    assert "<th>+0.1625</th>" in html  # the total difference, in the table's footer
    assert "Yes, re-price 2 requests" in html
    assert _costs() == before
    until = page.context["until_iso"]

    done = admin.client.post(
        "/admin/usage/modelprice/", {**action, "post": "yes", "until": until}, follow=True
    )

    assert "Re-priced 2 of 2 rows of openai/gpt-4o-mini" in done.content.decode()
    assert _costs()["mini-1"][:2] == (Decimal("0.1"), "override")
    entry = Repricing.objects.get()
    assert entry.actor == f"staff user #{admin.user.pk}"
    assert (entry.since, entry.provider, entry.model) == (
        override.effective_from,
        "openai",
        "gpt-4o-mini",
    )
    assert entry.cost_after - entry.cost_before == Decimal("0.1625")


def test_the_audit_list_and_entry_show_in_the_admin(platform: Persona, admin: StaffSession) -> None:
    _ledger(platform)
    entry_id = _reprice(platform, apply=True).json()["repricing_id"]

    listing = admin.client.get("/admin/usage/repricing/").content.decode()
    entry = admin.client.get(f"/admin/usage/repricing/{entry_id}/change/").content.decode()

    assert "2 of 4" in listing
    assert "0.1625" in listing
    for shown in ("gpt-4o-mini", "0.0525", "0.215", "0.1625"):
        assert shown in entry
    assert admin.client.get("/admin/usage/repricing/add/").status_code == 403


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_with_redis_the_budget_counter_follows_the_new_ledger_total(platform: Persona) -> None:
    budget = platform.client.post(
        "/api/v1/budgets",
        {
            "name": "search",
            "scope": "team",
            "scope_id": "search",
            "cost_limit": "100",
            "period": "lifetime",
        },
        format="json",
    ).json()
    # A check seeds the Redis counter, which usage then adds to as it is accepted.
    check = {"team_id": "search", "model": "gpt-4o-mini", "input_tokens": 1, "max_output_tokens": 0}
    assert platform.client.post("/api/v1/budgets/check", check, format="json").status_code == 200
    _ledger(platform)
    status_url = f"/api/v1/budgets/{budget['id']}/status"
    spent_before = Decimal(platform.client.get(status_url).json()["cost_spent"])
    assert spent_before == _ledger_total()

    assert _reprice(platform, apply=True).status_code == 201

    spent_after = Decimal(platform.client.get(status_url).json()["cost_spent"])
    assert spent_after == _ledger_total() == spent_before + Decimal("0.1625")
