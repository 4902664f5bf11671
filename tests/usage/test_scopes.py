from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db


@pytest.fixture
def ledger(platform: Persona) -> None:
    events = [
        event("own-1", team_id="search", project_id="ranker"),
        event("own-2", team_id="search", project_id="crawler"),
        event("other-1", team_id="ads", project_id="bidder"),
    ]
    platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    settle()


def _ids(persona: Persona, url: str = "/api/v1/usage") -> set[str]:
    return {r["request_id"] for r in persona.client.get(url).json()["results"]}


def test_a_project_key_reads_only_its_project(ledger: None, member: Persona) -> None:
    assert _ids(member) == {"own-1"}
    assert _ids(member, "/api/v1/usage?project_id=bidder") == set()


def test_a_team_key_reads_only_its_team(ledger: None, team_lead: Persona) -> None:
    assert _ids(team_lead) == {"own-1", "own-2"}


def test_a_global_key_reads_everything(ledger: None, platform: Persona) -> None:
    assert _ids(platform) == {"own-1", "own-2", "other-1"}


def test_a_project_key_cannot_write_another_project(member: Persona) -> None:
    response = member.client.post("/api/v1/usage", event("x", project_id="bidder"), format="json")
    assert response.status_code == 400
    assert "project_id" in response.json()["error"]["fields"]


def test_the_summary_is_scoped_too(ledger: None, outsider: Persona) -> None:
    body = outsider.client.get("/api/v1/usage/summary?group_by=project_id").json()
    assert [r["project_id"] for r in body["rows"]] == ["bidder"]


def test_a_staff_session_uses_the_api(ledger: None, admin: Persona) -> None:
    assert _ids(admin) == {"own-1", "own-2", "other-1"}


def test_a_non_staff_session_is_refused(ledger: None, django_user_model: type) -> None:
    user = django_user_model.objects.create_user("eve", password="pw-eve-12345")
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/usage").status_code == 403
