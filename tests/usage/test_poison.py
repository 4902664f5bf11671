"""Input PostgreSQL cannot store is refused at the door, and a poison entry that reached the
buffer anyway (an older server, a database-side rule) is parked as a dead letter instead of
holding back the valid events read with it."""

from __future__ import annotations

import json
from datetime import datetime
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from tests.conftest import Persona, event, rows, settle
from tokenmgr_project.core import redis as tm_redis
from usage import buffer, selectors
from usage import rows as rows_codec
from usage.models import TokenUsage

NUL, SURROGATE = "\x00", "\ud800"
TEXT_FIELDS = (
    "provider", "model", "team_id", "project_id", "user_id", "feature", "agent", "task_type",
    "conversation_id", "workflow_id", "error_type", "reservation_id",
)  # fmt: skip
PROVENANCE_FIELDS = (
    "parent_request_id", "root_request_id", "intent", "input_hash", "output_hash", "input_text",
)  # fmt: skip


def _post(client: APIClient, path: str, body: Any) -> Any:
    # json.dumps escapes a lone surrogate as \ud800, as a client's JSON encoder would send it.
    return client.post(path, data=json.dumps(body), content_type="application/json")


def _fields(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 400, response.content
    return response.json()["error"]["fields"]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", ["request_id", *TEXT_FIELDS])
def test_it_rejects_text_postgresql_cannot_store(platform: Persona, field: str, bad: str) -> None:
    body = event(f"a{bad}b") if field == "request_id" else event("p-1", **{field: f"a{bad}b"})
    response = _post(platform.client, "/api/v1/usage", body)
    assert field in _fields(response)
    assert rows() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", PROVENANCE_FIELDS)
def test_it_rejects_bad_text_in_provenance(platform: Persona, field: str, bad: str) -> None:
    response = _post(platform.client, "/api/v1/usage", event("p-2", provenance={field: f"x{bad}"}))
    assert f"provenance.{field}" in _fields(response)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "metadata",
    [
        {"note": f"a{NUL}"},
        {f"k{NUL}": 1},
        {"deep": [{"x": {"y": f"z{SURROGATE}"}}]},
        {f"k{SURROGATE}": "v"},
    ],
    ids=["nul-value", "nul-key", "nested-surrogate", "surrogate-key"],
)
def test_it_rejects_metadata_postgresql_cannot_store(
    platform: Persona, metadata: dict[str, Any]
) -> None:
    response = _post(platform.client, "/api/v1/usage", event("p-3", metadata=metadata))
    assert "metadata" in _fields(response)
    assert rows() == 0


@pytest.mark.django_db
def test_it_accepts_metadata_that_only_looks_like_an_escape(platform: Persona) -> None:
    metadata = {"path": "C:\\u0000\\x", "emoji": "\U0001f600", "escaped": "\\ud800"}
    response = _post(platform.client, "/api/v1/usage", event("p-4", metadata=metadata))
    assert response.status_code == 201, response.content
    assert rows(request_id="p-4") == 1
    assert TokenUsage.objects.get(request_id="p-4").metadata == metadata


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw", [{"prompt_tokens": 1, f"x{NUL}": 2}, {"prompt_tokens": 1, "m": SURROGATE}]
)
def test_it_rejects_a_raw_usage_object_with_bad_text(
    platform: Persona, raw: dict[str, Any]
) -> None:
    body = {"request_id": "p-5", "model": "gpt-4o", "usage": raw}
    assert "usage" in _fields(_post(platform.client, "/api/v1/usage", body))


@pytest.mark.django_db
@pytest.mark.parametrize("offset", ["+20:00", "-16:00", "+16:00"])
def test_it_rejects_a_utc_offset_postgresql_rejects(platform: Persona, offset: str) -> None:
    body = event("p-6", occurred_at=f"2025-06-01T12:00:00{offset}")
    assert "occurred_at" in _fields(_post(platform.client, "/api/v1/usage", body))


@pytest.mark.django_db
def test_it_accepts_the_widest_offset_postgresql_stores(platform: Persona) -> None:
    body = event("p-7", occurred_at="2025-06-01T12:00:00+15:59")
    assert _post(platform.client, "/api/v1/usage", body).status_code == 201
    assert rows(request_id="p-7") == 1


@pytest.mark.django_db
def test_a_batch_rejects_bad_items_one_by_one_and_stores_the_rest(platform: Persona) -> None:
    events = [
        event("b-1"),
        event("b-2", team_id=f"t{NUL}"),
        event("b-3", metadata={"x": SURROGATE}),
        event("b-4", occurred_at="2025-06-01T12:00:00+20:00"),
        event("b-5"),
    ]
    body = _post(platform.client, "/api/v1/usage/batch", {"events": events}).json()
    assert (body["created"], body["rejected"]) == (2, 3)
    assert [r["status"] for r in body["results"]] == [
        "created", "rejected", "rejected", "rejected", "created",
    ]  # fmt: skip
    assert "team_id" in body["results"][1]["errors"]
    assert rows() == 2


@pytest.mark.django_db
def test_signals_reject_bad_text_with_the_error_shape(platform: Persona) -> None:
    single = {"type": "track_usage", "data": event("s-1", feature=f"f{NUL}")}
    assert "feature" in _fields(_post(platform.client, "/api/v1/signals", single))
    batch = {
        "type": "track_usage_batch",
        "data": {"events": [event("s-2", agent=SURROGATE), event("s-3")]},
    }
    response = _post(platform.client, "/api/v1/signals", batch)
    assert response.status_code == 200
    assert [r["status"] for r in response.json()["result"]["results"]] == ["rejected", "created"]
    assert rows() == 1


# --- the flush isolates a poison entry ---------------------------------------------------------


def _poison_line(template: str, **changes: Any) -> str:
    """A buffer line as an unvalidating writer would have made it from `template`."""
    values = list(rows_codec.decode_line(template))
    for name, value in changes.items():
        values[rows_codec.ROW_INDEX[name]] = value
    return rows_codec.encode_line(tuple(values))


def _buffered_line() -> str:
    raw: Any = tm_redis.client().xrange(buffer.stream_key(), count=1)
    return raw[0][1][b"rows"].decode().split("\n")[0]


def _inject(lines: list[str]) -> None:
    ids = [rows_codec.line_request_id(line) for line in lines]
    flags, _depth = buffer.add(ids, lines, 3600, tenant="org")
    assert flags == [buffer.NEW] * len(lines)


def _dead(persona: Persona) -> dict[str, Any]:
    return persona.client.get("/api/v1/health").json()["dead_letters"]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [2, 150], ids=["values", "copy"])
def test_valid_events_around_poison_entries_all_land(
    platform: Persona, member: Persona, outsider: Persona, size: int
) -> None:
    member.client.post("/api/v1/usage", event("tpl"), format="json")
    template = _buffered_line()
    poisons = [
        {"team_id": f"t{NUL}"},
        {"cache_read_tokens": 10**6},  # breaks a check constraint
        {"metadata": {"k": f"v{NUL}"}},
        {"metadata": {"k": SURROGATE}},
        {"occurred_at": datetime.fromisoformat("2025-06-01T12:00:00+20:00")},
    ]
    for n, change in enumerate(poisons):
        member.client.post(
            "/api/v1/usage/batch",
            {"events": [event(f"b{n}-{i}") for i in range(size)]},
            format="json",
        )
        # One entry mixing good lines and a bad one, then an entry that is only the bad line.
        good = [_poison_line(template, request_id=f"g{n}-{i}") for i in range(size)]
        _inject([*good[: size // 2], _poison_line(template, request_id=f"x{n}", **change)])
        _inject(good[size // 2 :])
        outsider.client.post(
            "/api/v1/usage/batch",
            {"events": [event(f"o{n}-{i}") for i in range(size)]},
            format="json",
        )

    settle()

    valid = 1 + len(poisons) * 3 * size
    assert TokenUsage.objects.count() == valid
    assert not TokenUsage.objects.filter(request_id__startswith="x").exists()
    health = platform.client.get("/api/v1/health").json()
    assert (health["buffer"]["depth"], health["buffer"]["pending_entries"]) == (0, 0)
    assert health["dead_letters"]["count"] == len(poisons)
    assert health["dead_letters"]["oldest_at"]
    assert health["status"] == "degraded"
    out = StringIO()
    call_command("deadletters", "list", stdout=out)
    listing = out.getvalue()
    assert all(f"x{n}" in listing for n in range(len(poisons)))


_BLOCK = "ALTER TABLE usage_tokenusage ADD CONSTRAINT tmp_block CHECK (model <> 'blocked-model')"


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_replays_once_the_cause_is_fixed(platform: Persona) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_BLOCK)
    try:
        for rid in ("ok-1", "blocked", "ok-2"):
            model = "blocked-model" if rid == "blocked" else "gpt-4o-mini"
            assert (
                platform.client.post(
                    "/api/v1/usage", event(rid, model=model), format="json"
                ).status_code
                == 201
            )
        settle()
        assert sorted(TokenUsage.objects.values_list("request_id", flat=True)) == ["ok-1", "ok-2"]
        assert _dead(platform)["count"] == 1
        call_command("deadletters", "replay", "--all", stdout=StringIO())
        assert _dead(platform)["count"] == 1  # still refused: it stays parked
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE usage_tokenusage DROP CONSTRAINT IF EXISTS tmp_block")

    out = StringIO()
    call_command("deadletters", "replay", "--all", stdout=out)
    assert "1 replayed" in out.getvalue()
    assert TokenUsage.objects.filter(request_id="blocked", tenant="org").count() == 1
    assert _dead(platform) == {"count": 0, "oldest_id": None, "oldest_at": None}
    settle()
    assert TokenUsage.objects.count() == 3


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_can_be_discarded(platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("tpl"), format="json")
    _inject([_poison_line(_buffered_line(), request_id="bad", model=f"m{NUL}")])
    settle()
    [letter] = selectors.usage_dead_letters()
    assert (letter.request_id, letter.tenant) == ("bad", "org")
    assert "NUL" in letter.error or "0x00" in letter.error
    call_command("deadletters", "discard", letter.dead_id, stdout=StringIO())
    assert _dead(platform)["count"] == 0
    assert TokenUsage.objects.count() == 1


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_staff_see_and_replay_dead_letters_in_the_admin(
    admin: Persona, platform: Persona, django_user_model: Any
) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_BLOCK)
    platform.client.post("/api/v1/usage", event("blocked", model="blocked-model"), format="json")
    settle()
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE usage_tokenusage DROP CONSTRAINT tmp_block")
    page = admin.client.get("/admin/usage/deadletter/")
    assert page.status_code == 200
    assert "blocked" in page.content.decode()
    [letter] = selectors.usage_dead_letters()

    viewer = django_user_model.objects.create_user(
        "viewer", password="pw-viewer-123", is_staff=True
    )
    viewer.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client = APIClient()
    client.force_login(viewer)
    assert client.get("/admin/usage/deadletter/").status_code == 200
    refused = client.post("/admin/usage/deadletter/", {"action": "replay", "ids": [letter.dead_id]})
    assert refused.status_code == 403
    nobody = django_user_model.objects.create_user(
        "nobody", password="pw-nobody-123", is_staff=True
    )
    client.force_login(nobody)
    assert client.get("/admin/usage/deadletter/").status_code == 403

    done = admin.client.post(
        "/admin/usage/deadletter/", {"action": "replay", "ids": [letter.dead_id]}
    )
    assert done.status_code == 302
    assert TokenUsage.objects.filter(request_id="blocked").count() == 1
    assert selectors.usage_dead_letters() == []


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_line_is_parked_once_when_its_entry_is_acknowledged_twice(platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("twice"), format="json")
    [entry] = buffer.read_new("flusher-a", 10)
    dead = [buffer.DeadLine(entry.entry_id, entry.lines[0], "refused")]
    assert buffer.ack([entry], dead, "2026-01-01T00:00:00+00:00") == 1
    # A second flusher that re-claimed the entry before the first acknowledged it:
    assert buffer.ack([entry], dead, "2026-01-01T00:00:01+00:00") == 0
    assert _dead(platform)["count"] == 1
