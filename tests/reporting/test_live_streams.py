"""Live status streams (issue 10): batch shape and counts, the status.broadcasted group, the
queue's bound, error frames, the staff dashboard stream (who may join, what it carries, how it
coalesces) and the broadcaster's metrics — on the in-memory channel layer and on Redis's."""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.utils import timezone

from budgets.overrides import override_request
from budgets.services import budget_create
from reporting import services
from reporting.broadcaster import DashboardStream, StatusBroadcaster
from reporting.publisher import publisher
from reporting.routing import websocket_urlpatterns
from tests.conftest import Persona, event, settle
from tokenmgr_project.core.principal import Principal

pytestmark = pytest.mark.django_db(transaction=True)
ORG = {"team_id": "", "project_id": ""}
MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture(
    params=["memory", pytest.param("redis", marks=pytest.mark.services)], ids=["memory", "redis"]
)
def layer(request: pytest.FixtureRequest, settings: Any) -> str:
    """Each test on both channel layers (Redis's only in the PostgreSQL + Redis pass)."""
    if request.param == "memory":
        settings.CHANNEL_LAYERS = MEMORY
    else:
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                "CONFIG": {"hosts": [django_settings.REDIS_URL], "prefix": "test-live"},
            }
        }
    return str(request.param)


def _client(path: str, *, key: str = "", user: Any = None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    client = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path, headers=headers)
    if user is not None:
        client.scope["user"] = user
    return client


async def _frames(client: WebsocketCommunicator, wait: float = 1.0) -> list[dict[str, Any]]:
    frames = []
    while not await client.receive_nothing(timeout=wait):
        frames.append(await client.receive_json_from())
    return frames


async def _broadcast(broadcaster: StatusBroadcaster | None = None) -> StatusBroadcaster:
    broadcaster = broadcaster or StatusBroadcaster()
    while await broadcaster.tick(flush_all=True):
        pass
    return broadcaster


def _publish(n: int, conversation_id: str, category: str = "progress", **extra: Any) -> None:
    for i in range(n):
        services.status_publish(
            conversation_id=conversation_id,
            category=category,
            message=f"m{i}",
            metadata={"i": i},
            agent_id="planner",
            **ORG,
            **extra,
        )


# --- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 30])
def test_n_messages_leave_in_ceil_n_over_batch_size_batches_with_the_seeds_fields(
    layer: str, platform: Persona, settings: Any, n: int
) -> None:
    settings.TOKENMGR_STATUS_BATCH_SIZE = 7
    _publish(n, "conv-b")

    async def scenario() -> list[dict[str, Any]]:
        client = _client("/ws/status/conv-b/", key=platform.raw_key)
        assert (await client.connect())[0]
        await _broadcast()
        frames = await _frames(client)
        await client.disconnect()
        return frames

    batches = async_to_sync(scenario)()

    assert len(batches) == math.ceil(n / 7)
    assert [b["count"] for b in batches] == [min(7, n - 7 * i) for i in range(len(batches))]
    assert all(b["count"] == len(b["messages"]) for b in batches)
    assert len({b["batch_id"] for b in batches}) == len(batches)
    messages = [m for b in batches for m in b["messages"]]
    assert [m["message"] for m in messages] == [f"m{i}" for i in range(n)]
    first = messages[0]
    assert set(first) == {"id", "message", "metadata", "timestamp", "agent_id", "correlation_id"}
    assert first["metadata"] == {"i": 0}
    assert first["agent_id"] == "planner"
    assert first["correlation_id"] == first["id"]
    assert len({m["id"] for m in messages}) == n
    for batch in batches:
        assert batch["conversation_id"] == "conv-b"
        assert batch["category"] == "progress"
        assert batch["timestamp"] >= first["timestamp"]


def test_every_batch_is_announced_to_the_status_broadcasted_group(
    layer: str, platform: Persona
) -> None:
    _publish(3, "conv-c", category="tool")
    _publish(2, "conv-d", category="info")

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        channel_layer = get_channel_layer()
        listener = await channel_layer.new_channel()
        await channel_layer.group_add(services.BROADCASTED_GROUP, listener)
        client = _client("/ws/status/conv-c/", key=platform.raw_key)
        assert (await client.connect())[0]
        await _broadcast()
        announced = []
        for _ in range(2):
            announced.append(await asyncio.wait_for(channel_layer.receive(listener), 5))
        batches = await _frames(client)
        await client.disconnect()
        return announced, batches

    announced, batches = async_to_sync(scenario)()

    assert {(a["conversation_id"], a["category"]) for a in announced} == {
        ("conv-c", "tool"),
        ("conv-d", "info"),
    }
    assert all(a["type"] == "status.broadcasted" for a in announced)
    [tool] = [a for a in announced if a["category"] == "tool"]
    assert tool["payload"]["batch_id"] == batches[0]["batch_id"]
    assert [m["message"] for m in tool["payload"]["messages"]] == ["m0", "m1", "m2"]


def test_an_overflowing_queue_drops_the_oldest_counts_them_and_says_so_in_each_batch(
    layer: str, platform: Persona, settings: Any
) -> None:
    settings.TOKENMGR_STATUS_QUEUE_LIMIT = 20
    _publish(25, "conv-o", category="info")

    async def scenario() -> list[dict[str, Any]]:
        client = _client("/ws/status/conv-o/", key=platform.raw_key)
        assert (await client.connect())[0]
        await _broadcast()
        frames = await _frames(client)
        await client.disconnect()
        return frames

    batches = async_to_sync(scenario)()

    assert [m["message"] for b in batches for m in b["messages"]] == [f"m{i}" for i in range(5, 25)]
    assert {b["dropped"] for b in batches} == {5}
    health = platform.client.get("/api/v1/health").json()["status_messages"]
    assert health["dropped"] == 5
    assert health["queue_limit"] == 20


# --- what a client sends -------------------------------------------------------------------------


def test_bad_frames_get_an_error_frame_and_the_socket_stays_open(
    layer: str, platform: Persona
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        client = _client("/ws/status/conv-e/", key=platform.raw_key)
        assert (await client.connect())[0]
        replies = []
        for frame in (
            "not json",
            "[1, 2]",
            '{"action": "dance"}',
            '{"action": "subscribe", "categories": "tool"}',
            '{"action": "subscribe", "categories": [1]}',
            '{"action": "unsubscribe", "categories": ["colour"]}',
            '{"action": "unsubscribe_category", "category": "tool"}',
            '{"action": "get_subscriptions"}',
        ):
            await client.send_to(text_data=frame)
            replies.append(await client.receive_json_from(timeout=5))
        await client.send_to(bytes_data=b"\x00")
        replies.append(await client.receive_json_from(timeout=5))
        await client.disconnect()
        return replies

    replies = async_to_sync(scenario)()

    assert [r["type"] for r in replies] == ["error"] * 6 + ["subscriptions"] * 2 + ["error"]
    assert "JSON" in replies[0]["message"]
    assert replies[5]["known"][:2] == ["engine", "tool"]
    assert "tool" not in replies[6]["categories"]
    assert replies[7]["categories"] == replies[6]["categories"]


# --- the staff dashboard stream ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "admitted"),
    [
        ("admin", True),
        ("staff_viewer", True),
        ("staff_noperm", False),
        ("approver", False),
        ("platform", False),  # even a global key: the stream is for people in the admin
        ("anonymous", False),
    ],
)
def test_only_staff_who_may_view_usage_join_the_dashboard_stream(
    request: pytest.FixtureRequest, layer: str, who: str, admitted: bool
) -> None:
    persona: Persona | None = None if who == "anonymous" else request.getfixturevalue(who)
    user = getattr(persona, "user", None)
    key = persona.raw_key if persona is not None else ""

    async def scenario() -> tuple[bool, int | None]:
        connected, code = await _client("/ws/dashboard/", key=key, user=user).connect()
        return connected, code

    connected, code = async_to_sync(scenario)()
    assert connected is admitted
    if not admitted:
        assert code == 4403


def _dashboard_updates(user: Any, work: Any) -> list[dict[str, Any]]:
    """Connect a dashboard socket, run `work` (sync, in a thread), broadcast, return updates."""

    async def scenario() -> list[dict[str, Any]]:
        client = _client("/ws/dashboard/", user=user)
        assert (await client.connect())[0]
        await database_sync_to_async(work)()
        broadcaster = await _broadcast()
        frames = await _frames(client)
        # A second look once the state read (on its own thread) has come back.
        await broadcaster.tick(flush_all=True)
        frames += await _frames(client)
        await client.disconnect()
        return frames

    return async_to_sync(scenario)()


def test_the_dashboard_stream_adds_up_exactly_the_usage_recorded(
    layer: str, admin: Persona, platform: Persona
) -> None:
    costs: list[Decimal] = []

    def record() -> None:
        for i in range(3):
            body = {"events": [event(f"d-{i}-{j}", output_tokens=10 + j) for j in range(40)]}
            answer = platform.client.post("/api/v1/usage/batch", body, format="json").json()
            costs.extend(Decimal(r["cost"]) for r in answer["results"])
        settle()

    updates = _dashboard_updates(admin.user, record)

    assert updates, "no dashboard update"
    assert all(u["type"] == "dashboard.update" for u in updates)
    today = timezone.localdate().isoformat()
    days = [u["usage"]["days"][today] for u in updates if today in u["usage"]["days"]]
    assert sum(d["requests"] for d in days) == 120
    assert sum(d["input_tokens"] for d in days) == 120 * 100
    assert sum(d["output_tokens"] for d in days) == 3 * sum(10 + j for j in range(40))
    assert sum(Decimal(d["cost"]) for d in days) == sum(costs)
    assert sum(n for u in updates for n in u["usage"]["minutes"].values()) == 120
    [state] = [u["state"] for u in updates if u["state"]][-1:]
    assert {"budgets", "overrides_pending", "buffer", "status_messages"} <= set(state)
    assert [u["seq"] for u in updates] == sorted(u["seq"] for u in updates)


def test_the_dashboard_stream_carries_alerts_overrides_and_moving_budget_bars(
    layer: str, admin: Persona, member: Persona
) -> None:
    from budgets.alerts import alerts_evaluate

    budget = budget_create(
        principal=None,
        name="ranker",
        scope="project",
        scope_id="ranker",
        team_id="search",
        cost_limit=Decimal("0.0001"),
    )

    def work() -> None:
        member.client.post("/api/v1/usage", event("al-1", input_tokens=1000), format="json")
        settle()
        alerts_evaluate(budget_id=budget.pk)
        assert member.key is not None
        override_request(
            budget=budget,
            extra_cost=Decimal(1),
            extra_tokens=None,
            unlimited=False,
            reason="launch",
            expires_at=timezone.now() + timedelta(days=1),
            principal=Principal.for_staff(admin.user),
        )

    updates = _dashboard_updates(admin.user, work)

    events = [e for u in updates for e in u["events"]]
    kinds = {e["kind"] for e in events}
    assert {"alert", "override"} <= kinds
    alert = next(e["alert"] for e in events if e["kind"] == "alert")
    assert alert["budget"]["id"] == budget.pk
    override = next(e for e in events if e["kind"] == "override")
    assert override["change"] == "requested"
    state = [u["state"] for u in updates if u["state"]][-1]
    [bar] = [b for b in state["budgets"] if b["id"] == budget.pk]
    assert bar["percent"] >= 100
    assert state["overrides_pending"] == 1


def test_a_flood_of_usage_is_coalesced_to_the_dashboards_rate(settings: Any, db: None) -> None:
    """However many events arrive, at most TOKENMGR_LIVE_DASHBOARD_RATE updates a second go
    out, and together they carry every event."""
    settings.TOKENMGR_LIVE_DASHBOARD_RATE = 4.0

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        async def group_send(self, group: str, message: dict[str, Any]) -> None:
            self.sent.append(message)

    recorder = Recorder()
    stream = DashboardStream(recorder)
    today = timezone.localdate().isoformat()

    async def flood() -> None:
        for step in range(1000):  # 10 s of events, one tick every 10 ms, 5 events a tick
            for _ in range(5):
                stream.add({"kind": "usage", "days": {today: {"requests": 1, "cost": "0.01"}}})
            await stream.maybe_send(step * 0.01)
        await stream.maybe_send(10.0, force=True)

    async_to_sync(flood)()

    assert len(recorder.sent) <= 4 * 10 + 2
    assert len(recorder.sent) >= 4 * 10 - 2  # and it keeps sending while events arrive
    assert sum(u["usage"]["days"][today]["requests"] for u in recorder.sent) == 5000
    assert sum(Decimal(u["usage"]["days"][today]["cost"]) for u in recorder.sent) == Decimal(50)


# --- metrics in /health --------------------------------------------------------------------------


def test_health_shows_the_broadcasters_metrics_and_the_connected_clients(
    layer: str, platform: Persona, admin: Persona
) -> None:
    _publish(60, "conv-m")

    async def scenario() -> dict[str, Any]:
        feed = _client("/ws/status/conv-m/", key=platform.raw_key)
        board = _client("/ws/dashboard/", user=admin.user)
        assert (await feed.connect())[0]
        assert (await board.connect())[0]
        await _broadcast()
        await _frames(feed)
        health: dict[str, Any] = await database_sync_to_async(
            lambda: platform.client.get("/api/v1/health").json()
        )()
        await feed.disconnect()
        await board.disconnect()
        return dict(health["status_messages"])

    during = async_to_sync(scenario)()
    after = platform.client.get("/api/v1/health").json()["status_messages"]

    assert during["processed"] == 60
    assert during["batches_sent"] == 2  # 50 + 10
    # The viewers' group per batch; status.broadcasted has no member, so nothing is sent to it.
    assert during["broadcasts"] == 2
    assert during["connected_clients"] == {"status": 1, "dashboard": 1}
    assert during["broadcaster_seen_at"]
    assert (during["batch_size"], during["batch_window_ms"]) == (50, 100)
    assert after["connected_clients"] == {"status": 0, "dashboard": 0}


# --- the project's own events never wait --------------------------------------------------------


def test_the_publisher_thread_pushes_the_projects_events_to_the_shared_queue(
    member: Persona,
) -> None:
    publisher.taken_locally = False  # as in an API process next to a broadcaster of its own
    try:
        member.client.post("/api/v1/usage", event("q-1", conversation_id="conv-q"), format="json")
        deadline = timezone.now() + timedelta(seconds=10)
        taken: list[dict[str, Any]] = []
        while timezone.now() < deadline and {t.get("stream") for t in taken} != {
            services.STATUS,
            services.DASHBOARD,
        }:
            taken += services.status_take(100)
    finally:
        publisher.taken_locally = True
    [message] = [t for t in taken if t.get("stream") == services.STATUS]
    assert message["conversation_id"] == "conv-q"
    assert message["category"] == "usage"
    assert (message["team_id"], message["project_id"]) == ("search", "ranker")
    assert message["metadata"]["request_id"] == "q-1"
    assert any(t.get("kind") == "usage" for t in taken if t.get("stream") == services.DASHBOARD)


def test_handing_over_stored_usage_touches_neither_the_database_nor_redis(
    django_assert_num_queries: Any, settings: Any, db: None
) -> None:
    from tokenmgr_project.core import redis as tm_redis

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # would fail at once if it were used
    tm_redis.reset()
    rows = [
        ("r-1", timezone.now(), *([None] * 35), "tenant"),
    ]
    with django_assert_num_queries(0):
        publisher.usage(rows)
    assert list(publisher._usage) == [rows]  # kept for the thread to sum up, later
    publisher.discard()
