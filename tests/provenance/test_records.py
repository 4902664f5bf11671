"""Provenance records (issue 11): what each usage event's links become, in order and out of order,
through the buffer or straight to the database."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.test import override_settings

from provenance.models import CycleAttempt, ProvenanceRelationship
from tests.conftest import Persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db


def linked(rid: str, parent: str = "", **prov: Any) -> dict[str, Any]:
    provenance = {"parent_request_id": parent, **prov} if parent else dict(prov)
    return event(rid, provenance=provenance) if provenance else event(rid)


def post(who: Persona, *events: dict[str, Any]) -> list[dict[str, Any]]:
    response = who.client.post("/api/v1/usage/batch", {"events": list(events)}, format="json")
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def row(rid: str) -> TokenUsage:
    settle()
    return TokenUsage.objects.get(request_id=rid)


def test_it_derives_root_and_depth_from_the_parent(platform: Persona) -> None:
    post(platform, linked("q"), linked("plan", "q"), linked("search", "plan"))
    assert (row("q").depth, row("q").root_request_id) == (0, "")
    assert (row("plan").depth, row("plan").root_request_id) == (1, "q")
    assert (row("search").depth, row("search").root_request_id) == (2, "q")


def test_it_derives_them_from_a_parent_recorded_in_an_earlier_request(platform: Persona) -> None:
    post(platform, linked("q"), linked("plan", "q"))
    settle()
    post(platform, linked("search", "plan"))
    assert (row("search").depth, row("search").root_request_id) == (2, "q")


def test_it_resolves_a_child_that_arrived_before_its_parent(platform: Persona) -> None:
    post(platform, linked("leaf", "mid"))
    settle()
    assert row("leaf").depth is None  # waiting for "mid"
    post(platform, linked("mid", "top"))
    settle()
    post(platform, linked("top"))
    assert (row("mid").depth, row("mid").root_request_id) == (1, "top")
    assert (row("leaf").depth, row("leaf").root_request_id) == (2, "top")


def test_it_records_the_events_link_as_a_tree_edge_of_its_type(platform: Persona) -> None:
    post(platform, linked("a"), linked("b", "a", relationship="retry_of"), linked("c", "a"))
    settle()
    edges = {
        (e.from_request_id, e.to_request_id, e.type, e.is_tree)
        for e in ProvenanceRelationship.objects.all()
    }
    assert edges == {("b", "a", "retry_of", True), ("c", "a", "triggered_by", True)}


def test_it_keeps_lineage_fields_on_the_ledger_row(platform: Persona) -> None:
    post(
        platform,
        linked(
            "r1",
            agent_type="planner",
            workflow_step="plan",
            system_context={"tool": "search", "k": 3},
            cache_hit=True,
            intent="answer",
        ),
    )
    r = row("r1")
    assert (r.agent_type, r.workflow_step, r.cache_hit, r.intent) == (
        "planner",
        "plan",
        True,
        "answer",
    )
    assert r.system_context == {"tool": "search", "k": 3}


def test_it_hashes_sent_text_and_does_not_store_it(platform: Persona) -> None:
    post(platform, linked("t1", input_text="What is 2+2?", output_text="4"))
    r = row("t1")
    assert r.input_hash == hashlib.sha256(b"What is 2+2?").hexdigest()
    assert r.output_hash == hashlib.sha256(b"4").hexdigest()
    assert (r.input_text, r.output_text) == ("", "")


@override_settings(TOKENMGR_PROVENANCE_STORE_TEXT=True)
def test_it_stores_the_text_when_the_setting_allows(platform: Persona) -> None:
    post(platform, linked("t2", input_text="hello", output_text="world"))
    assert (row("t2").input_text, row("t2").output_text) == ("hello", "world")


def test_it_refuses_a_parent_link_that_would_close_a_cycle(platform: Persona) -> None:
    post(platform, linked("x", "y"))
    settle()
    results = post(platform, linked("y", "x"))
    assert results[0]["status"] == "rejected"
    assert results[0]["errors"]["provenance.parent_request_id"] == [
        "Would close a cycle: y → x → y."
    ]
    assert not TokenUsage.objects.filter(request_id="y").exists()
    assert CycleAttempt.objects.get().path == ["y", "x", "y"]


def test_it_refuses_a_cycle_inside_one_batch(platform: Persona) -> None:
    results = post(platform, linked("p", "q"), linked("q", "p"))
    assert [r["status"] for r in results] == ["created", "rejected"]
    assert "Would close a cycle" in results[1]["errors"]["provenance.parent_request_id"][0]


def test_it_refuses_a_link_that_closes_a_cycle_with_a_waiting_row(
    platform: Persona,
) -> None:
    post(platform, linked("m", "n"))
    settle()
    results = post(platform, linked("n", "m"))
    assert results[0]["errors"]["provenance.parent_request_id"] == [
        "Would close a cycle: n → m → n."
    ]


@pytest.mark.services
def test_it_stores_usage_whose_cycle_only_the_flush_sees_and_refuses_the_link(
    platform: Persona,
) -> None:
    # Both wait in the buffer, so ingestion cannot see the loop; the flush refuses one link.
    post(platform, linked("m", "n"))
    post(platform, linked("n", "m"))
    settle()
    assert TokenUsage.objects.filter(request_id__in=["m", "n"]).count() == 2
    assert ProvenanceRelationship.objects.count() == 1
    assert CycleAttempt.objects.count() == 1
    assert {row("m").depth, row("n").depth} == {0, 1}


@override_settings(TOKENMGR_PROVENANCE_MAX_DEPTH=3)
def test_it_refuses_a_chain_deeper_than_the_maximum(platform: Persona) -> None:
    results = post(
        platform, linked("d0"), linked("d1", "d0"), linked("d2", "d1"), linked("d3", "d2"),
        linked("d4", "d3"),
    )  # fmt: skip
    assert [r["status"] for r in results] == ["created"] * 4 + ["rejected"]
    assert "maximum is 3" in results[4]["errors"]["provenance.parent_request_id"][0]


@pytest.mark.parametrize(
    ("provenance", "field"),
    [
        ({"parent_request_id": "self"}, "provenance.parent_request_id"),
        ({"parent_request_id": "a\tb"}, "provenance.parent_request_id"),
        ({"parent_request_id": "x" * 129}, "provenance.parent_request_id"),
        ({"relationship": "retry_of"}, "provenance.relationship"),
        ({"parent_request_id": "p", "relationship": "sibling_of"}, "provenance.relationship"),
        ({"system_context": {"blob": "x" * 5000}}, "provenance.system_context"),
        ({"input_text": "a", "input_hash": "b"}, "provenance.input_text"),
    ],
)
def test_it_refuses_bad_provenance_naming_the_field(
    platform: Persona, provenance: dict[str, Any], field: str
) -> None:
    response = platform.client.post(
        "/api/v1/usage", event("self", provenance=provenance), format="json"
    )
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not TokenUsage.objects.exists()


def test_it_answers_409_when_a_single_events_link_would_close_a_cycle(platform: Persona) -> None:
    post(platform, linked("u", "v"))
    settle()
    response = platform.client.post("/api/v1/usage", linked("v", "u"), format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "cycle"
    assert response.json()["error"]["fields"] == {
        "provenance.parent_request_id": ["Would close a cycle: v → u → v."]
    }
