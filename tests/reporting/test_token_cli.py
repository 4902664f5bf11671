"""manage.py token stats|export|budget|cost|reprice: exact figures on known data in tables and
--json, exports that equal the ledger in each format, budgets set through the API's rules, and
one line with a non-zero exit on bad arguments."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Sum
from django.utils import timezone

from budgets.models import AgentProfile
from reporting import exports
from tests.conftest import Persona, child_database_url, event, settle
from usage.models import LedgerPurge, TokenUsage
from usage.pricing import money

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
NOW = timezone.now()


def _ago(hours: float) -> str:
    return (NOW - timedelta(hours=hours)).isoformat()


@pytest.fixture
def known(platform: Persona) -> Persona:
    """Four requests: researcher's run-1 on two models, its run-2, and one writer request
    outside any run (another team)."""
    events = [
        event("a1", agent="researcher", workflow_id="run-1", model="gpt-4o",
              input_tokens=1000, output_tokens=200, team_id="search", occurred_at=_ago(1)),
        event("a2", agent="researcher", workflow_id="run-1", input_tokens=500,
              output_tokens=100, team_id="search", occurred_at=_ago(2)),
        event("a3", agent="researcher", workflow_id="run-2", input_tokens=400,
              output_tokens=40, team_id="search", occurred_at=_ago(3)),
        event("a4", agent="writer", input_tokens=300, output_tokens=50, team_id="ads",
              occurred_at=_ago(4)),
    ]  # fmt: skip
    response = platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code in (200, 201, 207), response.content
    settle()
    return platform


def _token(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _json(*args: str) -> Any:
    return json.loads(_token(*args, "--json")[0])


def _cost(**filters: Any) -> str:
    return money(TokenUsage.objects.filter(**filters).aggregate(c=Sum("cost"))["c"])


def _row(text: str, first: str) -> list[str]:
    """The cells of the table line whose first cell is `first`."""
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])


def _refused(*args: str) -> str:
    with pytest.raises(CommandError) as refused:
        _token(*args)
    message = str(refused.value)
    assert "\n" not in message
    return message


# --- stats -------------------------------------------------------------------------------------


def test_stats_shows_the_ledger_totals_and_a_row_per_model(known: Persona) -> None:
    out, _ = _token("stats")
    assert _row(out, "requests") == ["requests", "4"]
    assert _row(out, "total_tokens") == ["total_tokens", "2,590"]
    assert _row(out, "cost") == ["cost", _cost()]
    assert _row(out, "gpt-4o")[:7] == [
        "gpt-4o",
        "1",
        "1,000",
        "200",
        "0",
        "1,200",
        _cost(model="gpt-4o"),
    ]
    mini = _row(out, "gpt-4o-mini")
    assert mini[:6] == ["gpt-4o-mini", "3", "1,200", "190", "0", "1,390"]
    assert mini[6] == _cost(model="gpt-4o-mini")


def test_stats_json_is_the_usage_report_filtered_by_agent_and_team(known: Persona) -> None:
    body = _json("stats", "--agent", "researcher", "--by", "agent,team")
    assert body["filters"] == {"agent": "researcher"}
    assert (body["totals"]["requests"], body["totals"]["total_tokens"]) == (3, 2240)
    assert [(r["agent"], r["team_id"], r["cost"]) for r in body["rows"]] == [
        ("researcher", "search", _cost(agent="researcher"))
    ]
    assert _json("stats", "--team", "ads")["totals"]["total_tokens"] == 350


def test_stats_period_leaves_out_older_usage(known: Persona) -> None:
    assert _json("stats", "--period", "2.5")["totals"]["requests"] == 2


# --- export ------------------------------------------------------------------------------------


def _ledger_rows(**filters: Any) -> list[dict[str, Any]]:
    rows = TokenUsage.objects.filter(**filters).order_by("occurred_at", "id")
    return [
        {
            **{c: getattr(r, c) for c in exports.COLUMNS},
            "occurred_at": r.occurred_at.isoformat(),
            "cost": money(r.cost),
        }
        for r in rows
    ]


def test_export_csv_is_a_header_and_one_line_per_ledger_row_oldest_first(
    known: Persona, tmp_path: Path
) -> None:
    target = tmp_path / "usage.csv"
    out, _ = _token("export", "--format", "csv", "--output", str(target))
    assert out.startswith("Exported 4 rows (csv)")
    lines = list(csv.reader(io.StringIO(target.read_text(encoding="utf-8"), newline="")))
    assert lines[0] == list(exports.COLUMNS)
    expected = _ledger_rows()
    assert [line[0] for line in lines[1:]] == ["a4", "a3", "a2", "a1"]
    cost = exports.COLUMNS.index("cost")
    assert [line[cost] for line in lines[1:]] == [r["cost"] for r in expected]
    assert lines[1][exports.COLUMNS.index("total_tokens")] == "350"
    assert not list(tmp_path.glob("*.partial"))


def test_export_json_parses_to_the_ledger_rows(known: Persona) -> None:
    out, err = _token("export", "--format", "json")
    assert json.loads(out) == _ledger_rows()
    assert err.startswith("Exported 4 rows (json) to -")  # the summary stays out of the data


def test_export_json_of_nothing_is_an_empty_array(known: Persona) -> None:
    assert json.loads(_token("export", "--format", "json", "--agent", "nobody")[0]) == []


def test_export_md_is_a_table_of_the_agents_rows(known: Persona) -> None:
    out, _ = _token("export", "--format", "md", "--agent", "researcher")
    lines = out.splitlines()
    assert lines[0] == "| " + " | ".join(exports.COLUMNS) + " |"
    assert lines[1].startswith("|---|")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a3", "| a2", "| a1"]
    assert f"| {_cost(request_id='a1')} |" in lines[-1]


def test_export_shows_a_progress_bar_when_asked(known: Persona, tmp_path: Path) -> None:
    _, err = _token("export", "--output", str(tmp_path / "x.csv"), "--progress")
    assert "4/4" in err
    summary = _json("export", "--output", str(tmp_path / "x.csv"))
    assert (summary["rows"], summary["format"]) == (4, "csv")


def _purged(hours_ago: float) -> None:
    """As if retention had deleted raw usage older than `hours_ago` hours."""
    cutoff = NOW - timedelta(hours=hours_ago)
    LedgerPurge.objects.create(cutoff=cutoff, deleted=0, purged_at=NOW)


def test_export_refuses_a_range_retention_deleted_rows_from(known: Persona) -> None:
    _purged(2.5)
    assert "Raw usage in this range was deleted by retention. --since: Start at or after" in (
        _refused("export", "--period", "3")
    )
    later = json.loads(_token("export", "--format", "json", "--period", "2.2")[0])
    assert [r["request_id"] for r in later] == ["a2", "a1"]


# --- budget ------------------------------------------------------------------------------------


@pytest.fixture
def researcher(platform: Persona) -> AgentProfile:
    body = {"name": "researcher", "model": "gpt-4o", "token_budget": 2000}
    assert platform.client.post("/api/v1/agent-profiles", body, format="json").status_code == 201
    return AgentProfile.objects.get(name="researcher")


def test_budget_shows_the_profile_and_each_runs_progress(
    known: Persona, researcher: AgentProfile
) -> None:
    out, _ = _token("budget", "researcher")
    assert "2,000 tokens per run, warning above 80 % (default)" in out
    assert _row(out, "run-1")[:7] == ["run-1", "2", "1,800", "2,000", "90.00", "200", "warning"]
    assert _row(out, "run-2")[:7] == ["run-2", "1", "440", "2,000", "22.00", "1,560", "ok"]
    runs = _json("budget", "researcher")["runs"]
    assert [r["run_id"] for r in runs] == ["run-1", "run-2"]  # most recently active first


def test_budget_set_changes_the_profile(known: Persona, researcher: AgentProfile) -> None:
    out, _ = _token("budget", "researcher", "--set", "1500")
    assert "2,000 -> 1,500" in out
    assert _row(out, "run-1")[6] == "over"
    researcher.refresh_from_db()
    assert researcher.token_budget == 1500


def test_budget_set_is_refused_by_the_profiles_own_rules(researcher: AgentProfile) -> None:
    assert "--set" in _refused("budget", "researcher", "--set", "0")
    researcher.warning_threshold = 1800
    researcher.save(update_fields=["warning_threshold"])
    assert "Must be at most the token budget (1000)" in _refused(
        "budget", "researcher", "--set", "1000"
    )
    researcher.refresh_from_db()
    assert researcher.token_budget == 2000


# --- cost --------------------------------------------------------------------------------------


def _per(cost: str, executions: int) -> str:
    return money((Decimal(cost) / executions).quantize(Decimal("1e-10"), ROUND_HALF_UP))


def test_cost_by_model_shows_the_split_and_cost_per_execution(known: Persona) -> None:
    body = _json("cost", "--by", "model")
    rows = {r["model"]: r for r in body["rows"]}
    big, mini = rows["gpt-4o"], rows["gpt-4o-mini"]
    assert (big["cost"], big["runs"], big["executions"]) == (_cost(model="gpt-4o"), 1, 1)
    # run-1 and run-2 (one run spans both models) plus the writer's request outside any run
    assert (mini["runs"], mini["executions"], mini["basis"]) == (2, 3, "runs+requests")
    assert mini["cost_per_execution"] == _per(_cost(model="gpt-4o-mini"), 3)
    assert body["executions"] == {
        "runs": 2,
        "requests_outside_runs": 1,
        "executions": 3,
        "cost_per_execution": _per(_cost(), 3),
    }
    out, _ = _token("cost", "--by", "model")
    assert _row(out, "gpt-4o-mini")[1] == _cost(model="gpt-4o-mini")


def test_cost_per_execution_is_not_guessed_where_retention_deleted_rows(
    known: Persona,
) -> None:
    _purged(2.5)
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    # Whole hours, so the cost report answers from rollups where raw rows are gone.
    since, until = hour - timedelta(hours=5), hour + timedelta(hours=1)
    hours = ("--since", since.isoformat(), "--until", until.isoformat())
    body = _json("cost", "--by", "model", *hours)
    assert body["totals"]["cost"] == _cost()
    assert body["executions"] is None
    assert {r["cost_per_execution"] for r in body["rows"]} == {None}
    out, _ = _token("cost", "--by", "model", *hours)
    assert "Cost per execution: not shown, retention deleted raw usage" in out


def test_cost_of_one_agent_by_agent(known: Persona) -> None:
    body = _json("cost", "researcher")
    assert [(r["agent"], r["executions"]) for r in body["rows"]] == [("researcher", 2)]
    assert body["rows"][0]["cost_per_execution"] == _per(_cost(agent="researcher"), 2)
    writer = _json("cost", "writer", "--by", "team")["rows"]
    assert [(r["team_id"], r["basis"]) for r in writer] == [("ads", "requests")]


# --- reprice -----------------------------------------------------------------------------------


def test_reprice_dry_run_prints_the_per_model_table(known: Persona) -> None:
    since, until = _ago(24), _ago(-1)
    out, _ = _token("reprice", "--since", since, "--until", until)
    assert out.startswith("Dry run (nothing changed)")
    assert _row(out, "openai")[:3] == ["openai", "gpt-4o", "1"]
    body = _json("reprice", "--since", since, "--until", until)
    assert (body["applied"], body["rows_seen"], body["cost_before"]) == (False, 4, _cost())


# --- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("stats", "--period", "-2"), "--period: must be a positive number of hours"),
        (("stats", "--by", "colour"), "--by: Unknown dimension 'colour'"),
        (("stats", "--since", "last tuesday"), "--since: Use an ISO 8601 date-time."),
        (("stats", "--period", "2", "--since", "2026-01-01"), "--period or --since"),
        (("cost", "--by", "colour"), "invalid choice: 'colour'"),
        (("budget", "nobody"), "No agent profile named 'nobody'."),
        (("export", "--format", "xml"), "invalid choice: 'xml'"),
        (("export", "--json"), "--json needs --output"),
        (("reprice", "--since", "2026-01-02", "--until", "2026-01-01"), "--until"),
    ],
)
def test_bad_arguments_are_one_line(args: tuple[str, ...], says: str) -> None:
    assert says in _refused(*args)


def test_a_bad_argument_exits_non_zero_with_one_line(db: None) -> None:
    env = {**os.environ, "DATABASE_URL": child_database_url()}
    manage = [sys.executable, "manage.py", "token", "stats", "--json"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*manage, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip

    bad = run("--by", "colour")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "CommandError: Unknown dimension in group_by. --by: Unknown dimension 'colour'; use "
        "team_id, project_id, user_id, feature, agent, task_type, provider, model."
    ]
    unparsed = run("--period", "soon")
    assert unparsed.returncode == 2
    assert unparsed.stderr.strip().splitlines() == [
        "manage.py token stats: error: argument --period: must be a positive number of hours, "
        "not 'soon' (see --help)"
    ]
    good = run()
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["totals"]["requests"] == 0
