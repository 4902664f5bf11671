"""Live status (SPEC §8): publish → bounded queue → broadcaster batches → websocket clients."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from reporting.broadcaster import StatusBroadcaster
from reporting.publisher import publisher
from reporting.routing import websocket_urlpatterns
from reporting.services import queue_limit, status_publish
from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db(transaction=True)
ORG = {"team_id": "", "project_id": ""}  # an organisation-wide message: global viewers only


def _client(path: str, key: str = "", user: Any = None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path, headers=headers)
    if user is not None:
        communicator.scope["user"] = user
    return communicator


async def _drain(communicator: WebsocketCommunicator) -> list[dict[str, Any]]:
    batches = []
    while not await communicator.receive_nothing(timeout=1.0):  # generous: CI may be loaded
        batches.append(await communicator.receive_json_from())
    return batches


async def _broadcast_everything() -> None:
    broadcaster = StatusBroadcaster()
    while await broadcaster.tick(flush_all=True):
        pass


def _received_by(path: str, key: str) -> list[dict[str, Any]]:
    """Connect a client, broadcast everything queued, return the batches it got."""

    async def scenario() -> list[dict[str, Any]]:
        client = _client(path, key=key)
        assert (await client.connect())[0]
        await _broadcast_everything()
        batches = await _drain(client)
        await client.disconnect()
        return batches

    return async_to_sync(scenario)()


def test_messages_reach_a_client_in_batches_per_category(platform: Persona) -> None:
    for i in range(120):
        status_publish(conversation_id="conv-1", category="progress", message=f"step {i}", **ORG)
    for i in range(3):
        status_publish(conversation_id="conv-1", category="tool", message=f"tool {i}", **ORG)
    status_publish(conversation_id="conv-other", category="tool", message="elsewhere", **ORG)

    batches = _received_by("/ws/status/conv-1/", platform.raw_key)
    sizes = Counter((b["category"], len(b["messages"])) for b in batches)
    assert sizes == {("progress", 50): 2, ("progress", 20): 1, ("tool", 3): 1}
    assert {b["conversation_id"] for b in batches} == {"conv-1"}
    progress = [m["message"] for b in batches if b["category"] == "progress" for m in b["messages"]]
    assert progress == [f"step {i}" for i in range(120)]


def test_a_client_receives_only_the_categories_it_subscribes_to(
    admin: Persona, django_user_model: Any
) -> None:
    staff = django_user_model.objects.get(username="admin")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        client = _client("/ws/status/conv-2/", user=staff)
        assert (await client.connect())[0]
        await client.send_json_to({"action": "unsubscribe", "categories": ["tool", "info"]})
        subscriptions = await client.receive_json_from()
        from channels.db import database_sync_to_async

        for category in ("tool", "progress", "info"):
            await database_sync_to_async(status_publish)(
                conversation_id="conv-2", category=category, message=category, **ORG
            )
        await _broadcast_everything()
        batches = await _drain(client)
        await client.send_json_to({"action": "subscribe", "categories": ["colour"]})
        error = await client.receive_json_from()
        await client.disconnect()
        return subscriptions, batches, error

    subscriptions, batches, error = async_to_sync(scenario)()
    assert "tool" not in subscriptions["categories"]
    assert "progress" in subscriptions["categories"]
    assert [b["category"] for b in batches] == ["progress"]
    assert error["type"] == "error"


def test_the_queue_keeps_the_newest_1000_and_counts_what_it_dropped(platform: Persona) -> None:
    for i in range(queue_limit() + 5):
        status_publish(conversation_id="conv-3", category="info", message=str(i), **ORG)

    received = _received_by("/ws/status/conv-3/", platform.raw_key)
    delivered = [m["message"] for b in received for m in b["messages"]]
    assert delivered == [str(i) for i in range(5, queue_limit() + 5)]
    assert platform.client.get("/api/v1/health").json()["status_messages"]["dropped"] == 5


def test_a_client_without_credentials_is_refused(db: None) -> None:
    async def scenario() -> tuple[bool, int | None]:
        connected, code = await _client("/ws/status/conv-4/").connect()
        return connected, code

    assert async_to_sync(scenario)() == (False, 4403)


def test_a_scoped_key_joins_only_conversations_with_usage_in_its_scope(member: Persona) -> None:
    member.client.post("/api/v1/usage", event("ws-1", conversation_id="mine"), format="json")
    settle()

    async def scenario() -> tuple[bool, bool]:
        mine = await _client("/ws/status/mine/", key=member.raw_key).connect()
        theirs = await _client("/ws/status/theirs/", key=member.raw_key).connect()
        return mine[0], theirs[0]

    assert async_to_sync(scenario)() == (True, False)


def test_publishing_through_the_api_validates_and_checks_the_conversation(
    platform: Persona, member: Persona
) -> None:
    ok = {
        "conversation_id": "c9",
        "category": "progress",
        "message": "halfway",
        "metadata": {"pct": 50},
    }
    assert platform.client.post("/api/v1/status", ok, format="json").status_code == 202
    assert member.client.post("/api/v1/status", ok, format="json").status_code == 403
    for bad, field in (
        ({**ok, "category": "colour"}, "category"),
        ({**ok, "message": ""}, "message"),
        ({**ok, "metadata": [1]}, "metadata"),
        ({**ok, "conversation_id": "c" * 129}, "conversation_id"),
    ):
        response = platform.client.post("/api/v1/status", bad, format="json")
        assert response.status_code == 400
        assert field in response.json()["error"]["fields"]
    assert platform.client.get("/api/v1/health").json()["status_messages"]["queued"] == 1


def test_messages_published_while_redis_is_down_are_delivered_later(
    platform: Persona, settings: Any
) -> None:
    real_redis = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0" if real_redis else ""
    status_publish(conversation_id="conv-5", category="error", message="while down", **ORG)
    health = platform.client.get("/api/v1/health")
    assert health.status_code == 200
    settings.REDIS_URL = real_redis
    from tokenmgr_project.core import redis as tm_redis

    tm_redis.reset()

    received = _received_by("/ws/status/conv-5/", platform.raw_key)
    assert [m["message"] for b in received for m in b["messages"]] == ["while down"]


# --- scope: a socket receives only messages inside its own scope ---------------------------------


def _received_by_each(path: str, viewers: dict[str, Persona]) -> dict[str, list[dict[str, Any]]]:
    """Connect every viewer at once, broadcast everything queued, return each one's batches."""

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        clients = {}
        for name, persona in viewers.items():
            user = getattr(persona, "user", None)
            clients[name] = _client(path, key=persona.raw_key, user=user)
            assert (await clients[name].connect())[0], name
        await _broadcast_everything()
        received = {name: await _drain(client) for name, client in clients.items()}
        for client in clients.values():
            await client.disconnect()
        return received

    return async_to_sync(scenario)()


def _messages(batches: list[dict[str, Any]]) -> list[str]:
    return [m["message"] for b in batches for m in b["messages"]]


def _status(persona: Persona, conversation_id: str, message: str, **fields: Any) -> int:
    body = {"conversation_id": conversation_id, "category": "tool", "message": message, **fields}
    return int(persona.client.post("/api/v1/status", body, format="json").status_code)


def _use_conversation(
    persona: Persona, request_id: str, conversation_id: str, **fields: Any
) -> None:
    body = event(request_id, conversation_id=conversation_id, **fields)
    assert persona.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()
    publisher.take()  # the `usage` message it published: these tests look at others' messages


def test_it_does_not_deliver_another_projects_messages_to_a_key_that_used_its_conversation(
    member: Persona, outsider: Persona
) -> None:
    _use_conversation(member, "b-1", "shared-conv")
    _use_conversation(outsider, "a-1", "shared-conv")  # A only learned B's conversation id
    assert _status(member, "shared-conv", "B's secret", data={"doc": "contract.pdf"}) == 202

    received = _received_by_each("/ws/status/shared-conv/", {"a": outsider, "b": member})

    assert received["a"] == []
    assert _messages(received["b"]) == ["B's secret"]


def test_it_keeps_two_projects_feeds_apart_on_one_conversation_id(
    member: Persona, outsider: Persona, platform: Persona
) -> None:
    _use_conversation(member, "b-1", "conv-7")
    _use_conversation(outsider, "a-1", "conv-7")
    assert _status(member, "conv-7", "from ranker") == 202
    assert _status(outsider, "conv-7", "from bidder") == 202

    received = _received_by_each(
        "/ws/status/conv-7/", {"a": outsider, "b": member, "all": platform}
    )

    assert _messages(received["a"]) == ["from bidder"]
    assert _messages(received["b"]) == ["from ranker"]
    scopes = {
        (b["team_id"], b["project_id"], m["message"])
        for b in received["all"]
        for m in b["messages"]
    }
    assert scopes == {("ads", "bidder", "from bidder"), ("search", "ranker", "from ranker")}


def test_it_shows_a_team_key_its_projects_messages_only(
    member: Persona, outsider: Persona, team_lead: Persona, platform: Persona
) -> None:
    _use_conversation(member, "b-1", "conv-8")
    _use_conversation(outsider, "a-1", "conv-8")
    assert _status(member, "conv-8", "ranker's") == 202
    assert _status(outsider, "conv-8", "bidder's") == 202
    assert _status(platform, "conv-8", "org-wide") == 202
    assert _status(platform, "conv-8", "for search", team_id="search") == 202

    received = _received_by_each("/ws/status/conv-8/", {"team": team_lead, "member": member})

    assert sorted(_messages(received["team"])) == ["for search", "ranker's"]
    assert _messages(received["member"]) == ["ranker's"]


def test_it_refuses_to_publish_into_another_scope(member: Persona, team_lead: Persona) -> None:
    _use_conversation(member, "b-1", "conv-9")
    assert _status(member, "conv-9", "x", project_id="bidder") == 403
    response = team_lead.client.post(
        "/api/v1/status",
        {"conversation_id": "conv-9", "category": "tool", "message": "x", "team_id": "ads"},
        format="json",
    )
    assert response.status_code == 403
    assert "team_id" in response.json()["error"]["fields"]
    assert _status(team_lead, "conv-9", "to ranker", project_id="ranker") == 202

    assert _messages(_received_by("/ws/status/conv-9/", member.raw_key)) == ["to ranker"]


def test_it_publishes_a_budget_alert_in_the_budget_scope(
    member: Persona, outsider: Persona
) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from budgets.alerts import alerts_evaluate
    from budgets.models import AlertChannel
    from budgets.services import budget_create
    from budgets.tasks import alert_deliveries_send_due
    from usage import services

    services.model_price_set(
        provider="openai",
        model="flat-1",
        input_per_mtok=Decimal(1_000_000),
        output_per_mtok=Decimal(1_000_000),
        effective_from=datetime(2015, 1, 1, tzinfo=UTC),
    )
    AlertChannel.objects.create(kind="status", target="ranker-feed")
    budget = budget_create(
        principal=None,
        name="ranker",
        scope="project",
        scope_id="ranker",
        team_id="search",
        cost_limit=Decimal(100),
    )
    # 60 USD of a 100 USD budget: the 50 % alert fires into the status feed "ranker-feed".
    _use_conversation(member, "b-1", "ranker-feed", model="flat-1", input_tokens=60)
    _use_conversation(outsider, "a-1", "ranker-feed")
    alerts_evaluate(budget_id=budget.pk)
    assert alert_deliveries_send_due.apply().get() >= 1  # 50 %, and maybe a burn-rate alert

    received = _received_by_each("/ws/status/ranker-feed/", {"a": outsider, "b": member})

    assert received["a"] == []
    assert {b["category"] for b in received["b"]} == {"budget"}


def test_it_admits_staff_to_a_feed_only_with_the_view_usage_permission(
    staff_noperm: Any, staff_viewer: Any
) -> None:
    async def scenario() -> tuple[tuple[bool, int | None], bool]:
        refused = await _client("/ws/status/conv-10/", user=staff_noperm.user).connect()
        admitted = await _client("/ws/status/conv-10/", user=staff_viewer.user).connect()
        return refused, admitted[0]

    assert async_to_sync(scenario)() == ((False, 4403), True)
