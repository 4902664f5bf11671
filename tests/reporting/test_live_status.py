"""Live status (SPEC §8): publish → bounded queue → broadcaster batches → websocket clients."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from reporting.broadcaster import StatusBroadcaster
from reporting.routing import websocket_urlpatterns
from reporting.services import QUEUE_LIMIT, status_publish
from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db(transaction=True)


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
        status_publish(conversation_id="conv-1", category="progress", message=f"step {i}")
    for i in range(3):
        status_publish(conversation_id="conv-1", category="tool", message=f"tool {i}")
    status_publish(conversation_id="conv-other", category="tool", message="elsewhere")

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
                conversation_id="conv-2", category=category, message=category
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
    for i in range(QUEUE_LIMIT + 5):
        status_publish(conversation_id="conv-3", category="info", message=str(i))

    received = _received_by("/ws/status/conv-3/", platform.raw_key)
    delivered = [m["message"] for b in received for m in b["messages"]]
    assert delivered == [str(i) for i in range(5, QUEUE_LIMIT + 5)]
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
        "data": {"pct": 50},
    }
    assert platform.client.post("/api/v1/status", ok, format="json").status_code == 202
    assert member.client.post("/api/v1/status", ok, format="json").status_code == 403
    for bad, field in (
        ({**ok, "category": "colour"}, "category"),
        ({**ok, "message": ""}, "message"),
        ({**ok, "data": [1]}, "data"),
        ({**ok, "conversation_id": "a/b"}, "conversation_id"),
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
    status_publish(conversation_id="conv-5", category="error", message="while down")
    health = platform.client.get("/api/v1/health")
    assert health.status_code == 200
    settings.REDIS_URL = real_redis
    from tokenmgr_project import redis as tm_redis

    tm_redis.reset()

    received = _received_by("/ws/status/conv-5/", platform.raw_key)
    assert [m["message"] for b in received for m in b["messages"]] == ["while down"]
