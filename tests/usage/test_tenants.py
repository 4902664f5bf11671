"""request_id is unique per tenant (a project, a team, or the organisation): another scope's ids
are never revealed as duplicates nor squatted, on the buffered and the direct path alike."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import override_settings
from rest_framework.test import APIClient

from budgets.services import budget_create
from tests.conftest import Persona, event, rows, run_concurrently, settle
from tokenmgr_project.core import redis as tm_redis
from usage import buffer, services
from usage import rows as rows_codec
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)


def _project_key(team_id: str, project_id: str) -> Persona:
    key, raw = services.api_key_create(
        name=project_id, scope="project", team_id=team_id, project_id=project_id
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return Persona(project_id, client, key, raw)


def _post(persona: Persona, body: dict[str, Any]) -> tuple[int, bool | None]:
    response = persona.client.post("/api/v1/usage", body, format="json")
    return response.status_code, response.json().get("duplicate")


def test_another_projects_id_is_neither_revealed_nor_squatted(
    member: Persona, outsider: Persona
) -> None:
    budget = budget_create(
        principal=None,
        name="ranker",
        scope="project",
        scope_id="ranker",
        team_id="search",
        cost_limit=Decimal("1.00"),
    )
    assert _post(outsider, event("shared", input_tokens=5, output_tokens=0)) == (201, False)
    # B's real event, 90,000 tokens of gpt-4o-mini at 0.15 USD per million input tokens.
    assert _post(member, event("shared", input_tokens=90_000, output_tokens=0)) == (201, False)

    settle()
    mine = member.client.get("/api/v1/usage").json()["results"]
    assert [(r["request_id"], r["input_tokens"]) for r in mine] == [("shared", 90_000)]
    status = member.client.get(f"/api/v1/budgets/{budget.pk}/status").json()
    assert Decimal(status["cost_spent"]) == Decimal("0.0135")
    assert dict(TokenUsage.objects.values_list("tenant", "input_tokens")) == {
        "p:ads/bidder": 5,
        "p:search/ranker": 90_000,
    }


def test_a_repeat_inside_one_tenant_is_still_a_duplicate(member: Persona) -> None:
    assert _post(member, event("again")) == (201, False)
    assert _post(member, event("again")) == (200, True)
    settle()
    assert _post(member, event("again")) == (200, True)  # now only the ledger knows it
    batch = member.client.post(
        "/api/v1/usage/batch", {"events": [event("again"), event("fresh")]}, format="json"
    ).json()
    assert [r["duplicate"] for r in batch["results"]] == [True, False]
    assert rows(request_id="again") == 1


def test_concurrent_repeats_count_once_per_tenant(member: Persona, outsider: Persona) -> None:
    def both() -> list[tuple[int, bool | None]]:
        return [_post(member, event("race")), _post(outsider, event("race"))]

    answers = [a for pair in run_concurrently(both, 6) for a in pair]
    assert sorted(answers).count((201, False)) == 2
    assert sorted(answers).count((200, True)) == 10
    assert rows(request_id="race") == 2


def test_team_project_and_organisation_are_separate_tenants(
    member: Persona, team_lead: Persona, platform: Persona
) -> None:
    for persona in (member, team_lead, platform):
        assert _post(persona, event("same", team_id="search")) == (201, False)
    settle()
    assert sorted(TokenUsage.objects.values_list("tenant", flat=True)) == [
        "org",
        "p:search/ranker",
        "t:search",
    ]


def test_tenant_ids_that_concatenate_alike_do_not_collide(db: None) -> None:
    first, second = _project_key("a", "b"), _project_key("a", "b:c")
    assert _post(first, event("c:1")) == (201, False)
    assert _post(second, event("1")) == (201, False)
    assert _post(first, event("c:1")) == (200, True)
    assert rows() == 2


@override_settings(REDIS_URL="")
def test_the_direct_path_keeps_tenants_apart_in_small_and_bulk_inserts(
    member: Persona, outsider: Persona
) -> None:
    for size in (3, 100):  # INSERT … VALUES below the COPY threshold, staged COPY above it
        batch = {"events": [event(f"d{size}-{i}") for i in range(size)]}
        for persona in (outsider, member):
            body = persona.client.post("/api/v1/usage/batch", batch, format="json").json()
            assert (body["created"], body["duplicates"]) == (size, 0)
        body = member.client.post("/api/v1/usage/batch", batch, format="json").json()
        assert (body["created"], body["duplicates"]) == (0, size)
    racing = run_concurrently(lambda: _post(member, event("d-race")), 4)
    assert sorted(racing) == [(200, True)] * 3 + [(201, False)]
    assert TokenUsage.objects.count() == 207


def test_the_migration_assigns_existing_rows_a_tenant_by_attribution(db: None) -> None:
    executor = MigrationExecutor(connection)
    before = [("usage", "0001_initial")]
    after = [("usage", executor.loader.graph.leaf_nodes("usage")[0][1])]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("usage", "TokenUsage")
    base = {"occurred_at": "2025-01-01T00:00:00Z", "received_at": "2025-01-01T00:00:00Z"}
    for rid, team, project in (("r1", "t", "p"), ("r2", "t", ""), ("r3", "", "")):
        old.objects.create(request_id=rid, model="m", team_id=team, project_id=project, **base)
    executor = MigrationExecutor(connection)
    executor.migrate(after)
    assert dict(TokenUsage.objects.values_list("request_id", "tenant")) == {
        "r1": "p:t/p",
        "r2": "t:t",
        "r3": "org",
    }


@pytest.mark.services
def test_lines_buffered_before_tenants_existed_flush_with_their_attributions_tenant(
    member: Persona,
) -> None:
    member.client.post("/api/v1/usage", event("new"), format="json")
    raw: Any = tm_redis.client().xrange(buffer.stream_key(), count=1)
    line = raw[0][1][b"rows"].decode()
    # The layout before tenants (and lineage columns) existed; no "v" field.
    legacy = "\t".join(line.split("\t")[: rows_codec.LEGACY_COLUMNS]).replace("new", "old", 1)
    tm_redis.client().xadd(buffer.stream_key(), {"n": 1, "rows": legacy})
    tm_redis.client().incrby(buffer.depth_key(), 1)
    settle()
    assert dict(TokenUsage.objects.values_list("request_id", "tenant")) == {
        "new": "p:search/ranker",
        "old": "p:search/ranker",
    }
