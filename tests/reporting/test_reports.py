"""GET /api/v1/reports/{usage|cost|optimization}: exact figures on known data, the same numbers
in JSON, CSV and Markdown, scopes, and a named 4xx for every bad parameter."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Sum
from django.utils import timezone

from tests.conftest import Persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(minute=0, second=0, microsecond=0)
RANGE = {"since": (NOW - timedelta(days=2)).isoformat(), "until": NOW.isoformat()}


def _post(persona: Persona, events: list[dict[str, Any]]) -> None:
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code in (200, 201, 207), response.content
    settle()


def _ago(hours: float) -> str:
    return (NOW - timedelta(hours=hours)).isoformat()


def _known(persona: Persona) -> None:
    events = []
    for i in range(30):
        events.append(
            event(
                f"a{i}",
                team_id="search",
                model="gpt-4o",
                input_tokens=1000,
                output_tokens=50,
                occurred_at=_ago(1 + i),
            )
        )
        events.append(
            event(
                f"b{i}",
                team_id="ads",
                model="gpt-4o-mini",
                input_tokens=200,
                output_tokens=900,
                occurred_at=_ago(2 + i),
            )
        )
    events.append(event("u1", team_id="ads", model="mystery-model", occurred_at=_ago(3)))
    _post(persona, events)


def _get(persona: Persona, kind: str, **params: Any) -> Any:
    return persona.client.get(f"/api/v1/reports/{kind}", {**RANGE, **params})


def _ledger_cost(**filters: Any) -> Decimal:
    return Decimal(str(TokenUsage.objects.filter(**filters).aggregate(c=Sum("cost"))["c"] or 0))


def test_the_usage_report_totals_equal_the_ledger(platform: Persona) -> None:
    _known(platform)
    body = _get(platform, "usage", group_by="team_id").json()
    assert body["source"] == "rollups"
    totals = body["totals"]
    assert totals["requests"] == 61
    assert totals["input_tokens"] == 30 * 1000 + 30 * 200 + 100
    assert Decimal(totals["cost"]) == _ledger_cost()
    assert totals["unpriced_requests"] == 1  # shown apart; its cost is 0
    rows = {r["team_id"]: r for r in body["rows"]}
    assert Decimal(rows["search"]["cost"]) == _ledger_cost(team_id="search")
    assert rows["search"]["output_input_ratio"] == "0.0500"
    assert body["unpriced"] == [
        {"provider": "openai", "model": "mystery-model", "requests": 1, "tokens": 120}
    ]


def test_top_consumers_rank_by_cost(platform: Persona) -> None:
    _known(platform)
    body = _get(platform, "usage", top=1, top_by="model").json()
    top = body["top_consumers"]["model"]
    assert top[0]["model"] == "gpt-4o"
    assert Decimal(top[0]["cost"]) == _ledger_cost(model="gpt-4o")
    assert top[1]["model"] == "(other 2)"
    assert top[1]["requests"] == 31


def test_json_csv_and_markdown_carry_the_same_numbers(platform: Persona) -> None:
    _known(platform)
    params = {"group_by": "team_id,model", "interval": "day"}
    body = _get(platform, "usage", **params).json()
    raw_csv = b"".join(_get(platform, "usage", format="csv", **params).streaming_content)
    from_csv = list(csv.DictReader(io.StringIO(raw_csv.decode())))
    expected = [
        {c: "" if r[c] is None else str(r[c]) for c in body["columns"]} for r in body["rows"]
    ]
    assert from_csv == expected
    md = b"".join(_get(platform, "usage", format="md", **params).streaming_content).decode()
    header = "| " + " | ".join(body["columns"]) + " |"
    table = md.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    from_md = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert from_md == [[row[c] for c in body["columns"]] for row in expected]


def test_csv_downloads_as_an_attachment(platform: Persona) -> None:
    _known(platform)
    response = _get(platform, "cost", format="csv")
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert lines[0] == "team_id,cost,previous_cost,change,change_pct,share_of_cost,requests"


def test_a_team_key_reports_only_its_team(platform: Persona, team_lead: Persona) -> None:
    _known(platform)
    body = _get(team_lead, "usage", group_by="team_id").json()
    assert [r["team_id"] for r in body["rows"]] == ["search"]
    assert Decimal(body["totals"]["cost"]) == _ledger_cost(team_id="search")


def test_the_cost_report_compares_with_the_previous_period(platform: Persona) -> None:
    _post(
        platform,
        [
            event("p1", team_id="search", occurred_at=_ago(60)),
            event("c1", team_id="search", occurred_at=_ago(5)),
            event("c2", team_id="search", occurred_at=_ago(6)),
        ],
    )
    body = _get(platform, "cost").json()
    row = body["rows"][0]
    one = _ledger_cost(request_id="p1")
    assert (Decimal(row["cost"]), Decimal(row["previous_cost"])) == (2 * one, one)
    assert row["change_pct"] == "100.00"


def test_the_cost_report_lists_budget_utilisation_with_a_projection(platform: Persona) -> None:
    created = platform.client.post(
        "/api/v1/budgets",
        {
            "name": "search monthly",
            "scope": "team",
            "scope_id": "search",
            "period": "monthly",
            "cost_limit": "100",
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    _post(platform, [event("x", team_id="search", occurred_at=timezone.now().isoformat())])
    budgets = _get(platform, "cost").json()["budgets"]
    assert [b["name"] for b in budgets] == ["search monthly"]
    assert Decimal(budgets[0]["cost_spent"]) == _ledger_cost(team_id="search")
    assert budgets[0]["projected_cost"] is not None


def test_the_optimization_report_finds_a_planted_cheaper_model(platform: Persona) -> None:
    _known(platform)  # gpt-4o with 50-token outputs: short traffic; gpt-4o-mini outputs are long
    body = _get(platform, "optimization").json()
    found = [r for r in body["rows"] if r["kind"] == "cheaper_model"]
    assert [r["target"] for r in found] == ["openai/gpt-4o"]
    detail = body["details"][body["rows"].index(found[0])]
    assert detail["cheaper_model"] == "gpt-4o-mini"
    saving = Decimal(detail["cost_now"]) - Decimal(detail["cost_on_cheaper_model"])
    assert Decimal(found[0]["savings"]) == saving > 0
    assert Decimal(detail["cost_now"]) == _ledger_cost(model="gpt-4o")


def test_the_optimization_report_stays_quiet_without_evidence(platform: Persona) -> None:
    _post(
        platform,
        [
            event(f"l{i}", model="gpt-4o", output_tokens=2000, occurred_at=_ago(2))
            for i in range(30)
        ],
    )
    assert _get(platform, "optimization").json()["rows"] == []


def test_the_optimization_report_prices_repeated_inputs(platform: Persona) -> None:
    events = [
        event(
            f"d{i}",
            model="gpt-4o-mini",
            output_tokens=900,
            occurred_at=_ago(1 + i / 10),
            provenance={"input_hash": "same-prompt"},
        )
        for i in range(25)
    ]
    _post(platform, events)
    rows = [r for r in _get(platform, "optimization").json()["rows"] if r["kind"] == "caching"]
    assert len(rows) == 1
    assert rows[0]["requests"] == 24  # every repeat after the first
    assert Decimal(rows[0]["savings"]) == _ledger_cost() - _ledger_cost(request_id="d0")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"}, "until"),
        ({"since": "yesterday"}, "since"),
        ({"group_by": "team_id,colour"}, "group_by"),
        ({"format": "xlsx"}, "format"),
        ({"interval": "minute"}, "interval"),
        ({"since": "2020-01-01T00:00:00Z", "interval": "hour"}, "interval"),
        ({"tz": "Mars/Olympus"}, "tz"),
        ({"top": "0"}, "top"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(
    platform: Persona, params: dict[str, str], field: str
) -> None:
    response = platform.client.get("/api/v1/reports/usage", params)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_an_unknown_report_is_a_404(platform: Persona) -> None:
    response = platform.client.get("/api/v1/reports/weather")
    assert response.status_code == 404
    assert "kind" in response.json()["error"]["fields"]


def test_generate_report_runs_through_signals(platform: Persona) -> None:
    _known(platform)
    response = platform.client.post(
        "/api/v1/signals",
        {"type": "generate_report", "data": {"report": "usage", **RANGE, "format": "csv"}},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["result"]["content"].splitlines()[0].startswith("requests,input_tokens")


def test_aggregate_usage_groups_rollups(platform: Persona) -> None:
    _known(platform)
    response = platform.client.post(
        "/api/v1/signals",
        {"type": "aggregate_usage", "data": {**RANGE, "group_by": "model"}},
        format="json",
    )
    rows = {r["model"]: r for r in response.json()["result"]["rows"]}
    assert Decimal(rows["gpt-4o"]["cost"]) == _ledger_cost(model="gpt-4o")
    assert rows["mystery-model"]["unpriced_requests"] == 1
