from __future__ import annotations

import pytest

from tests.conftest import Persona, event, rows

pytestmark = pytest.mark.django_db


def test_it_stores_valid_items_even_when_others_are_rejected(platform: Persona) -> None:
    batch = {"events": [event("b-1"), event("b-2", input_tokens=-5), event("b-3")]}
    response = platform.client.post("/api/v1/usage/batch", batch, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["created"], body["duplicates"], body["rejected"]) == (2, 0, 1)
    assert [r["status"] for r in body["results"]] == ["created", "rejected", "created"]
    assert "input_tokens" in body["results"][1]["errors"]
    assert rows() == 2


def test_it_reports_repeats_inside_and_across_batches_as_duplicates(platform: Persona) -> None:
    platform.client.post("/api/v1/usage/batch", {"events": [event("b-old")]}, format="json")
    batch = {"events": [event("b-new"), event("b-new"), event("b-old")]}
    body = platform.client.post("/api/v1/usage/batch", batch, format="json").json()
    assert [r["status"] for r in body["results"]] == ["created", "duplicate", "duplicate"]
    assert rows() == 2


def test_it_accepts_a_full_batch_of_1000(platform: Persona) -> None:
    batch = {"events": [event(f"full-{i}", team_id=f"t{i % 3}") for i in range(1000)]}
    body = platform.client.post("/api/v1/usage/batch", batch, format="json").json()
    assert body["created"] == 1000
    assert rows() == 1000
    assert rows(team_id="t0") == 334


def test_a_scoped_key_has_items_outside_its_scope_rejected(member: Persona) -> None:
    batch = {"events": [event("s-1"), event("s-2", project_id="bidder")]}
    body = member.client.post("/api/v1/usage/batch", batch, format="json").json()
    assert [r["status"] for r in body["results"]] == ["created", "rejected"]
    assert "project_id" in body["results"][1]["errors"]
    assert rows() == 1
