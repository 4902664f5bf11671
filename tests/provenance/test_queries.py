"""Provenance queries and the relationships API (issue 11): lineage, workflows, attribution,
patterns, cost per question, and what bad input gets."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from provenance.models import CycleAttempt, ProvenanceRelationship
from tests.conftest import Persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db


def ev(rid: str, parent: str = "", **fields: Any) -> dict[str, Any]:
    prov = fields.pop("provenance", {})
    if parent:
        prov["parent_request_id"] = parent
    return event(rid, **({"provenance": prov} if prov else {}), **fields)


def record(who: Persona, *events: dict[str, Any]) -> None:
    response = who.client.post("/api/v1/usage/batch", {"events": list(events)}, format="json")
    assert response.status_code == 200, response.content
    assert all(r["status"] == "created" for r in response.json()["results"]), response.json()
    settle()


def tree(who: Persona) -> None:
    """q ─┬─ plan ─┬─ s1
    │        └─ s2 (error)
    └─ answer"""
    record(
        who,
        ev("q", agent="router", input_tokens=1000, output_tokens=100),
        ev("plan", "q", agent="planner", workflow_id="wf", provenance={"workflow_step": "plan"}),
        ev("s1", "plan", agent="search", workflow_id="wf", latency_ms=900,
           provenance={"workflow_step": "search"}),
        ev("s2", "plan", agent="search", status="error", workflow_id="wf", latency_ms=100,
           provenance={"workflow_step": "search"}),
        ev("answer", "q", agent="writer", model="gpt-4o", output_tokens=500, workflow_id="wf",
           latency_ms=300, provenance={"workflow_step": "answer"}),
    )  # fmt: skip


def cost(rid: str) -> Decimal:
    return TokenUsage.objects.get(request_id=rid).cost


# --- provenance and lineage ---------------------------------------------------------------------


def test_it_answers_a_requests_provenance_with_edges_in_and_out(platform: Persona) -> None:
    tree(platform)
    body = platform.client.get("/api/v1/provenance/plan").json()
    assert (body["parent_request_id"], body["root_request_id"], body["depth"]) == ("q", "q", 1)
    assert [(e["to_request_id"], e["type"]) for e in body["edges_out"]] == [("q", "triggered_by")]
    assert sorted(e["from_request_id"] for e in body["edges_in"]) == ["s1", "s2"]


def test_it_answers_the_lineage_with_subtree_sums(platform: Persona) -> None:
    tree(platform)
    body = platform.client.get("/api/v1/lineage/plan").json()
    nodes = {n["request_id"]: n for n in body["nodes"]}
    assert set(nodes) == {"q", "plan", "s1", "s2"}  # ancestors and descendants, not "answer"
    assert (nodes["q"]["level"], nodes["s1"]["level"]) == (-1, 1)
    plan_subtree = cost("plan") + cost("s1") + cost("s2")
    assert Decimal(nodes["plan"]["subtree_cost"]) == plan_subtree
    assert Decimal(nodes["q"]["subtree_cost"]) == plan_subtree + cost("q")
    assert Decimal(body["totals"]["cost"]) == sum(Decimal(n["cost"]) for n in body["nodes"])
    assert body["totals"]["errors"] == 1


def test_it_limits_the_lineage_by_direction_and_depth(platform: Persona) -> None:
    tree(platform)
    up = platform.client.get("/api/v1/lineage/s1?direction=up").json()
    assert [n["request_id"] for n in up["nodes"]] == ["q", "plan", "s1"]
    down = platform.client.get("/api/v1/lineage/q?direction=down&max_depth=1").json()
    assert {n["request_id"] for n in down["nodes"]} == {"q", "plan", "answer"}
    assert down["cut_at_max_depth"] is True


def test_it_draws_the_lineage_as_dot_and_svg(platform: Persona) -> None:
    tree(platform)
    dot = platform.client.get("/api/v1/lineage/q?format=dot")
    assert dot["Content-Type"].startswith("text/vnd.graphviz")
    text = dot.content.decode()
    assert text.startswith("digraph")
    assert '"plan" -> "s1"' in text
    svg = platform.client.get("/api/v1/lineage/q?format=svg")
    assert svg["Content-Type"].startswith("image/svg+xml")
    root = ET.fromstring(svg.content)
    assert root.tag.endswith("svg")
    for rid in ("q", "plan", "s1", "s2", "answer"):
        assert rid in svg.content.decode()


def test_it_answers_a_bad_format_in_the_json_error_shape(platform: Persona) -> None:
    tree(platform)
    response = platform.client.get("/api/v1/lineage/q?format=png")
    assert response.status_code == 400
    assert "format" in response.json()["error"]["fields"]


def test_it_hides_another_projects_request_as_if_it_did_not_exist(
    member: Persona, outsider: Persona
) -> None:
    record(outsider, ev("secret"))
    for path in ("/api/v1/provenance/secret", "/api/v1/lineage/secret"):
        assert member.client.get(path).status_code == 404
        assert outsider.client.get(path).status_code == 200


def test_it_stops_a_lineage_where_the_callers_scope_ends(
    platform: Persona, member: Persona
) -> None:
    # The organisation's key records a tree whose branches belong to two projects.
    record(
        platform,
        ev("root", team_id="search", project_id="ranker"),
        ev("mine", "root", team_id="search", project_id="ranker"),
        ev("theirs", "root", team_id="ads", project_id="bidder"),
        ev("theirs-child", "theirs", team_id="search", project_id="ranker"),
    )
    body = member.client.get("/api/v1/lineage/root?tenant=org").json()
    assert {n["request_id"] for n in body["nodes"]} == {"root", "mine"}


@override_settings(TOKENMGR_LINEAGE_MAX_NODES=100)
def test_it_refuses_a_lineage_over_the_node_limit_naming_max_depth(platform: Persona) -> None:
    record(platform, ev("big"), *(ev(f"c{i}", "big") for i in range(120)))
    response = platform.client.get("/api/v1/lineage/big")
    assert response.status_code == 422
    assert "max_depth" in response.json()["error"]["fields"]


def test_it_marks_a_lineage_waiting_for_its_parent(platform: Persona) -> None:
    record(platform, ev("orphan", "not-yet"))
    body = platform.client.get("/api/v1/lineage/orphan").json()
    assert body["waiting_for_parent"] == "not-yet"
    assert body["nodes"][0]["depth"] is None


# --- relationships API ---------------------------------------------------------------------------


def rel(frm: str, to: str, type_: str = "derived_from") -> dict[str, str]:
    return {"from_request_id": frm, "to_request_id": to, "type": type_}


def test_it_creates_a_relationship_once(platform: Persona) -> None:
    tree(platform)
    first = platform.client.post("/api/v1/relationships", rel("answer", "s1"), format="json")
    again = platform.client.post("/api/v1/relationships", rel("answer", "s1"), format="json")
    assert (first.status_code, first.json()["created"]) == (201, True)
    assert (again.status_code, again.json()["created"]) == (200, False)
    assert ProvenanceRelationship.objects.filter(is_tree=False).count() == 1


def test_it_creates_a_batch_of_relationships(platform: Persona) -> None:
    tree(platform)
    body = {"relationships": [rel("answer", "s1"), rel("s2", "s1", "retry_of")]}
    response = platform.client.post("/api/v1/relationships", body, format="json")
    assert response.status_code == 201
    assert [r["created"] for r in response.json()["relationships"]] == [True, True]


def test_it_refuses_a_cycle_with_409_naming_the_path_and_stores_nothing(
    platform: Persona,
) -> None:
    tree(platform)
    body = {"relationships": [rel("answer", "s1"), rel("q", "s1")]}
    response = platform.client.post("/api/v1/relationships", body, format="json")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "cycle"
    assert "q → s1 → plan → q" in error["message"]
    assert error["fields"] == {"relationships.1.to_request_id": ["Cycle: q → s1 → plan → q."]}
    assert ProvenanceRelationship.objects.filter(is_tree=False).count() == 0
    assert CycleAttempt.objects.get().path == ["q", "s1", "plan", "q"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rel("q", "q"), "to_request_id"),
        (rel("q", "plan", "sibling_of"), "type"),
        (rel("q", "x" * 129), "to_request_id"),
        (rel("q", "a\nb"), "to_request_id"),
        (rel("q", " "), "to_request_id"),
        ({"from_request_id": "q", "type": "part_of"}, "to_request_id"),
        ({"relationships": []}, "relationships"),
        ({"relationships": [rel("q", "plan")] * 501}, "relationships"),
        (rel("q", "nowhere"), "to_request_id"),
    ],
)
def test_it_refuses_bad_relationships_naming_the_field(
    platform: Persona, body: dict[str, Any], field: str
) -> None:
    tree(platform)
    response = platform.client.post("/api/v1/relationships", body, format="json")
    assert 400 <= response.status_code < 500
    assert field in response.json()["error"]["fields"], response.json()
    assert ProvenanceRelationship.objects.filter(is_tree=False).count() == 0


def test_it_refuses_an_edge_to_a_request_the_caller_cannot_see(
    member: Persona, outsider: Persona
) -> None:
    record(member, ev("mine"))
    record(outsider, ev("theirs"))
    response = member.client.post("/api/v1/relationships", rel("mine", "theirs"), format="json")
    assert response.status_code == 404
    assert "to_request_id" in response.json()["error"]["fields"]
    assert not ProvenanceRelationship.objects.exists()


@override_settings(TOKENMGR_PROVENANCE_MAX_DEPTH=2)
def test_it_refuses_a_relationship_that_makes_a_chain_too_deep(platform: Persona) -> None:
    record(platform, ev("a"), ev("b", "a"), ev("c"), ev("d", "c"))
    response = platform.client.post("/api/v1/relationships", rel("c", "b"), format="json")
    assert response.status_code == 422
    assert "maximum is 2" in response.json()["error"]["fields"]["to_request_id"][0]


# --- workflows, attribution, patterns, questions -------------------------------------------------


def test_it_answers_a_workflows_steps_critical_path_and_bottleneck(platform: Persona) -> None:
    tree(platform)
    body = platform.client.get("/api/v1/workflows/wf/usage").json()
    assert body["totals"]["requests"] == 4
    assert [s["step"] for s in body["steps"]] == ["plan", "search", "answer"]
    search = next(s for s in body["steps"] if s["step"] == "search")
    assert (search["requests"], search["errors"], search["latency_ms"]) == (2, 1, 1000)
    assert [r["request_id"] for r in body["critical_path"]["requests"]] == ["plan", "s1"]
    assert body["bottleneck"]["slowest_step"] == "search"
    assert body["bottleneck"]["most_expensive_step"] == "answer"


def test_it_answers_404_for_an_unknown_workflow(platform: Persona) -> None:
    assert platform.client.get("/api/v1/workflows/none/usage").status_code == 404


def test_it_attributes_cost_by_task_type_and_agent_with_shares(platform: Persona) -> None:
    record(
        platform,
        ev("t1", task_type="summarize", agent="a", model="gpt-4o"),
        ev("t2", task_type="summarize", agent="b"),
        ev("t3", task_type="classify", agent="a"),
    )
    body = platform.client.get("/api/v1/analysis/task-costs").json()
    by_task = {g["value"]: g for g in body["breakdowns"]["task_type"]}
    assert by_task["summarize"]["requests"] == 2
    assert Decimal(by_task["summarize"]["cost"]) == cost("t1") + cost("t2")
    shares = sum(Decimal(g["cost_share_percent"]) for g in body["breakdowns"]["agent"])
    assert abs(shares - 100) < Decimal("0.02")
    assert Decimal(body["totals"]["cost"]) == cost("t1") + cost("t2") + cost("t3")


def test_it_finds_duplicates_and_the_cost_a_cache_would_save(platform: Persona) -> None:
    now = timezone.now()
    same = {"input_hash": "h1"}
    record(
        platform,
        ev("d1", provenance=dict(same), occurred_at=(now - timedelta(minutes=30)).isoformat()),
        ev("d2", provenance=dict(same), occurred_at=(now - timedelta(minutes=20)).isoformat()),
        ev("d3", provenance=dict(same), occurred_at=(now - timedelta(minutes=10)).isoformat()),
        ev("other", provenance={"input_hash": "h2"}),
    )
    dup = platform.client.get("/api/v1/analysis/patterns").json()["duplicates"]
    assert (dup["groups"], dup["duplicate_requests"]) == (1, 2)
    assert Decimal(dup["savings"]) == cost("d2") + cost("d3")
    assert dup["findings"][0]["request_ids"] == ["d1", "d2", "d3"]
    narrow = platform.client.get("/api/v1/analysis/patterns?window_seconds=60").json()
    assert narrow["duplicates"]["groups"] == 0


def test_it_finds_a_retry_storm_and_its_waste(platform: Persona) -> None:
    record(
        platform,
        ev("op", status="error"),
        ev("r1", "op", status="error", provenance={"relationship": "retry_of"}),
        ev("r2", "op", status="error", provenance={"relationship": "retry_of"}),
        ev("r3", "op", provenance={"relationship": "retry_of"}),
    )
    storms = platform.client.get("/api/v1/analysis/patterns").json()["retry_storms"]
    storm = storms["findings"][0]
    assert (storm["operation"], storm["retries"], storm["succeeded"]) == ("op", 3, True)
    assert Decimal(storm["waste"]) == cost("op") + cost("r1") + cost("r2")
    assert set(storm["request_ids"]) == {"op", "r1", "r2", "r3"}


def test_it_finds_deep_chains_fan_out_and_refused_cycles(platform: Persona) -> None:
    chain = [ev("c0")] + [ev(f"c{i}", f"c{i - 1}") for i in range(1, 6)]
    fan = [ev("hub")] + [ev(f"leaf{i}", "hub") for i in range(40)]
    pairs = [ev(f"p{i}") for i in range(30)]
    kids = [ev(f"k{i}", f"p{i}") for i in range(30)]
    record(platform, *chain, *fan, *pairs, *kids)
    platform.client.post("/api/v1/relationships", rel("c0", "c5"), format="json")
    body = platform.client.get("/api/v1/analysis/patterns?depth_limit=3").json()
    deep = body["deep_chains"]["findings"][0]
    assert (deep["root_request_id"], deep["max_depth"], deep["requests_past_limit"]) == (
        "c0",
        5,
        2,
    )
    assert body["fan_out"]["findings"][0]["request_id"] == "hub"
    assert body["fan_out"]["findings"][0]["children"] == 40
    assert body["cycles_attempted"]["findings"][0]["path"][0] == "c0"


def test_it_reports_agent_performance(platform: Persona) -> None:
    record(
        platform,
        ev("g1", agent="a", latency_ms=100, provenance={"cache_hit": True}),
        ev("g2", agent="a", latency_ms=300, status="error", provenance={"cache_hit": False}),
    )
    agents = platform.client.get("/api/v1/analysis/patterns").json()["agents"]
    a = next(x for x in agents if x["agent"] == "a")
    assert (a["requests"], a["error_rate_percent"], a["cache_hit_rate_percent"]) == (
        2,
        "50.00",
        "50.00",
    )
    assert a["mean_latency_ms"] == 200.0


def test_it_ranks_user_questions_by_tree_cost_with_retry_waste_apart(platform: Persona) -> None:
    record(
        platform,
        ev("cheap"),
        ev("dear", model="gpt-4o", output_tokens=2000),
        ev("dear-1", "dear"),
        ev("dear-retry", "dear-1", provenance={"relationship": "retry_of"}),
    )
    body = platform.client.get("/api/v1/analysis/questions?retries=once").json()
    first = body["questions"][0]
    assert (first["root_request_id"], first["requests"]) == ("dear", 3)
    assert Decimal(first["cost"]) == cost("dear") + cost("dear-1") + cost("dear-retry")
    assert Decimal(first["retry_waste"]) == cost("dear-retry")
    assert first["root"]["model"] == "gpt-4o"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
        ("since=2020-01-01T00:00:00Z&until=2026-01-01T00:00:00Z", "since"),
        ("limit=0", "limit"),
        ("window_seconds=abc", "window_seconds"),
        ("depth_limit=-1", "depth_limit"),
        ("colour=red", "colour"),
    ],
)
def test_it_refuses_bad_analysis_parameters_naming_them(
    platform: Persona, query: str, field: str
) -> None:
    response = platform.client.get(f"/api/v1/analysis/patterns?{query}")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_it_answers_for_request_and_workflow_ids_holding_slashes(platform: Persona) -> None:
    record(platform, ev("ticket/1"), ev("ticket/1/step", "ticket/1", workflow_id="flow/a"))
    assert platform.client.get("/api/v1/provenance/ticket/1/step").json()["depth"] == 1
    nodes = platform.client.get("/api/v1/lineage/ticket/1").json()["nodes"]
    assert [n["request_id"] for n in nodes] == ["ticket/1", "ticket/1/step"]
    assert platform.client.get("/api/v1/workflows/flow/a/usage").json()["totals"]["requests"] == 1
