"""/api/v1/agent-profiles: the per-run token budgets the guard applies, managed over the API."""

from __future__ import annotations

from typing import Any

import pytest

from budgets.models import AgentProfile
from tests.conftest import Persona

pytestmark = pytest.mark.django_db
PROFILES = "/api/v1/agent-profiles"


def _create(who: Persona, **fields: Any) -> Any:
    body = {"name": "researcher", "model": "gpt-4o-mini", "token_budget": 20_000, **fields}
    return who.client.post(PROFILES, body, format="json")


def _guard(who: Persona, **body: Any) -> dict[str, Any]:
    response = who.client.post("/api/v1/guard", {"prompt": "hi", **body}, format="json")
    assert response.status_code == 200, response.json()
    result: dict[str, Any] = response.json()
    return result


@pytest.fixture
def researcher(platform: Persona) -> dict[str, Any]:
    response = _create(platform, warning_threshold=18_000)
    assert response.status_code == 201, response.json()
    body: dict[str, Any] = response.json()
    return body


def test_a_profile_created_over_the_api_is_what_the_guard_applies(
    platform: Persona, researcher: dict[str, Any]
) -> None:
    assert (researcher["name"], researcher["model"], researcher["token_budget"]) == (
        "researcher",
        "gpt-4o-mini",
        20_000,
    )
    guarded = _guard(platform, agent="researcher")
    assert (guarded["profile"], guarded["model"]) == ("researcher", "gpt-4o-mini")
    assert guarded["budget_context"]["budget"] == 20_000
    assert guarded["budget_context"]["warning_threshold"] == 18_000


def test_it_lists_and_retrieves_profiles(
    platform: Persona, member: Persona, researcher: dict[str, Any]
) -> None:
    _create(platform, name="summarizer", model="gpt-4o")
    listed = member.client.get(PROFILES).json()["results"]
    assert [p["name"] for p in listed] == ["researcher", "summarizer"]
    assert member.client.get(f"{PROFILES}?name=summarizer").json()["results"][0]["model"] == (
        "gpt-4o"
    )
    one = member.client.get(f"{PROFILES}/{researcher['id']}")
    assert one.status_code == 200
    assert one.json() == researcher


def test_a_change_applies_to_the_next_guard_call(
    platform: Persona, researcher: dict[str, Any]
) -> None:
    url = f"{PROFILES}/{researcher['id']}"
    changed = platform.client.patch(
        url, {"token_budget": 5_000, "warning_threshold": None}, format="json"
    )
    assert changed.status_code == 200, changed.json()
    assert (changed.json()["token_budget"], changed.json()["warning_threshold"]) == (5_000, None)
    context = _guard(platform, agent="researcher")["budget_context"]
    assert (context["budget"], context["warning_threshold"]) == (5_000, 4_000)  # 80 % default


def test_a_deleted_profile_no_longer_applies(platform: Persona, researcher: dict[str, Any]) -> None:
    deleted = platform.client.delete(f"{PROFILES}/{researcher['id']}")
    assert deleted.status_code == 200
    assert deleted.json()["name"] == "researcher"
    assert platform.client.get(f"{PROFILES}/{researcher['id']}").status_code == 404
    assert _guard(platform, agent="researcher", model="gpt-4o")["profile"] is None


def test_scoped_keys_read_profiles_but_only_global_keys_and_staff_change_them(
    member: Persona, team_lead: Persona, admin: Persona, researcher: dict[str, Any]
) -> None:
    url = f"{PROFILES}/{researcher['id']}"
    for key in (member, team_lead):
        assert _create(key, name=f"{key.name}'s").status_code == 403
        assert key.client.patch(url, {"token_budget": 1}, format="json").status_code == 403
        assert key.client.delete(url).status_code == 403
    assert AgentProfile.objects.get(pk=researcher["id"]).token_budget == 20_000
    assert admin.client.patch(url, {"token_budget": 19_000}, format="json").status_code == 200


def test_a_taken_name_is_a_conflict(platform: Persona, researcher: dict[str, Any]) -> None:
    response = _create(platform)
    assert response.status_code == 409
    assert "name" in response.json()["error"]["fields"]


def test_the_profiles_are_reachable_as_signals(platform: Persona) -> None:
    created = platform.client.post(
        "/api/v1/signals",
        {
            "type": "create_agent_profile",
            "data": {"name": "triage", "model": "gpt-4o", "token_budget": 1_000},
        },
        format="json",
    )
    assert created.status_code == 201
    listed = platform.client.post(
        "/api/v1/signals", {"type": "list_agent_profiles", "data": {}}, format="json"
    )
    assert [p["name"] for p in listed.json()["result"]["results"]] == ["triage"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"token_budget": 0}, "token_budget"),
        ({"token_budget": "1000"}, "token_budget"),
        ({"token_budget": 2**31}, "token_budget"),
        ({"warning_threshold": 20_001}, "warning_threshold"),
        ({"name": ""}, "name"),
        ({"name": "a" * 129}, "name"),
        ({"name": "bad\x00name"}, "name"),
        ({"model": None}, "model"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_input_is_refused_with_field_errors(
    platform: Persona, changes: dict[str, Any], field: str
) -> None:
    response = _create(platform, **changes)
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"token_budget": 10}, "warning_threshold"),  # below the profile's 18,000 threshold
        ({"name": None}, "name"),
        ({"profile_id": 12345}, "profile_id"),
    ],
)
def test_bad_changes_are_refused_with_field_errors(
    platform: Persona, researcher: dict[str, Any], changes: dict[str, Any], field: str
) -> None:
    url = f"{PROFILES}/{researcher['id']}"
    response = platform.client.patch(url, changes, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert AgentProfile.objects.get(pk=researcher["id"]).token_budget == 20_000
