"""The live admin pages' server side (issue 10): what the pages start from, escaping, links,
the vendored chart library, and what POST /status refuses."""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from budgets.services import budget_create
from reporting import services
from reporting.selectors import dashboard_snapshot
from tests.conftest import Persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "reporting" / "static" / "reporting" / "vendor"
HOSTILE = '<script>alert("x")</script>'


def _json_script(html: str, element_id: str) -> Any:
    found = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html)
    assert found, f"no {element_id} in the page"
    return json.loads(found[1])


def test_the_dashboard_starts_from_the_same_figures_as_the_usage_summary(
    admin: Persona, platform: Persona
) -> None:
    events = [
        event(f"p-{i}", input_tokens=1000 + i, status="error" if i == 0 else "success")
        for i in range(5)
    ]
    assert (
        platform.client.post("/api/v1/usage/batch", {"events": events}, format="json").status_code
        == 200
    )
    budget_create(principal=None, name=HOSTILE, scope="global", scope_id="", cost_limit=Decimal(1))
    # Accepted but (with Redis) still in the buffer: counted once, before and after the flush.
    assert dashboard_snapshot()["today"]["requests"] == 5
    settle()
    day_start = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    summary = platform.client.get("/api/v1/usage/summary", {"since": day_start.isoformat()}).json()[
        "rows"
    ][0]

    page = admin.client.get(reverse("live:dashboard"))
    assert page.status_code == 200
    html = page.content.decode()
    snapshot = _json_script(html, "tm-snapshot")

    # Buffered or in the ledger, the page starts from what the API says.
    assert snapshot["today"]["requests"] == summary["requests"] == 5
    assert Decimal(snapshot["today"]["cost"]) == Decimal(summary["cost"])
    assert snapshot["today"]["input_tokens"] == summary["input_tokens"]
    assert snapshot["today"]["errors"] == summary["errors"] == 1
    assert sum(snapshot["minutes"].values()) == 5
    [bar] = snapshot["budgets"]
    assert bar["name"] == HOSTILE
    assert HOSTILE not in html  # escaped inside the JSON (\u003C…), never markup
    refetched = admin.client.get(reverse("live:snapshot")).json()
    assert refetched["today"] == snapshot["today"]
    assert "/static/reporting/vendor/uplot/uPlot.iife.min.js" in html
    assert reverse("live:conversations") in html


def test_the_conversation_pages_escape_ids_and_link_rows_to_their_feed(
    admin: Persona, platform: Persona
) -> None:
    platform.client.post("/api/v1/usage", event("c-1", conversation_id=HOSTILE), format="json")
    settle()

    listing = admin.client.get(reverse("live:conversations")).content.decode()
    feed_url = reverse("live:feed", args=[HOSTILE])
    assert HOSTILE not in listing
    assert "&lt;script&gt;" in listing
    feed = admin.client.get(feed_url)
    assert feed.status_code == 200
    assert HOSTILE not in feed.content.decode()
    assert _json_script(feed.content.decode(), "tm-conversation") == HOSTILE
    row = TokenUsage.objects.get(request_id="c-1")
    change = admin.client.get(reverse("admin:usage_tokenusage_change", args=[row.pk])).content
    assert f'href="{feed_url}">live feed</a>'.encode() in change
    assert admin.client.get(reverse("live:feed", args=["x" * 129])).status_code == 404


def test_the_admin_links_to_the_live_pages(admin: Persona, staff_noperm: Persona) -> None:
    index = admin.client.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse("live:dashboard")}"' in index
    assert f'href="{reverse("live:conversations")}"' in index
    # Staff who may not view usage get no Live module on the index.
    assert (
        'id="live-module"' not in staff_noperm.client.get(reverse("admin:index")).content.decode()
    )


def test_the_chart_library_is_the_vendored_npm_package_and_no_page_loads_a_cdn() -> None:
    for manifest_path in VENDOR.glob("*/VENDORED.json"):
        manifest = json.loads(manifest_path.read_text())
        assert manifest["integrity"].startswith("sha512-")
        for source, digest in manifest["files"].items():
            data = (manifest_path.parent / Path(source).name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, source
    assert (VENDOR / "uplot" / "VENDORED.json").exists()
    for template in (ROOT / "templates").rglob("*.html"):
        text = template.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), template


# --- POST /status: bad input changes nothing ----------------------------------------------------

_OK = {"conversation_id": "c9", "category": "progress", "message": "halfway"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"category": "colour"}, "category"),
        ({"category": None}, "category"),
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": "x" * 4097}, "message"),
        ({"message": "é" * 2049}, "message"),  # 4098 bytes in UTF-8
        ({"message": 7}, "message"),
        ({"metadata": [1]}, "metadata"),
        ({"metadata": "text"}, "metadata"),
        ({"metadata": {"blob": "x" * 17_000}}, "metadata"),
        ({"metadata": {"a": 1}, "data": {"b": 2}}, "data"),
        ({"conversation_id": "c" * 129}, "conversation_id"),
        ({"conversation_id": ""}, "conversation_id"),
        ({"agent_id": "a" * 129}, "agent_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_status_gets_a_400_naming_the_field_and_queues_nothing(
    platform: Persona, change: dict[str, Any], field: str
) -> None:
    response = platform.client.post("/api/v1/status", {**_OK, **change}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert field in error["fields"]
    assert services.status_take(100) == []
    assert platform.client.get("/api/v1/health").json()["status_messages"]["queued"] == 0


def test_a_status_at_the_limits_is_accepted_whole(platform: Persona) -> None:
    body = {
        **_OK,
        "conversation_id": "c" * 128,
        "message": "x" * 4096,
        "metadata": {"blob": "y" * 16_000},
        "agent_id": "planner",
        "correlation_id": "corr-1",
    }
    assert platform.client.post("/api/v1/status", body, format="json").status_code == 202
    [queued] = services.status_take(10)
    assert queued["message"] == body["message"]
    assert queued["metadata"] == body["metadata"]
    assert (queued["agent_id"], queued["correlation_id"]) == ("planner", "corr-1")


def test_a_scoped_keys_messages_into_its_conversation_skip_the_database_after_the_first(
    member: Persona, django_assert_num_queries: Any
) -> None:
    from django.conf import settings

    from tokenmgr_project.core import actions
    from usage.auth import principal_for_key

    member.client.post("/api/v1/usage", event("s-1", conversation_id="mine"), format="json")
    settle()
    assert member.key is not None
    principal = principal_for_key(member.key)
    body = {**_OK, "conversation_id": "mine"}
    # Not admitted lately: the event loop leaves it to the thread path, which asks the ledger.
    assert actions.run_inline("publish_status", principal, body) is None
    assert actions.run("publish_status", principal, body).status == 202
    with django_assert_num_queries(0):
        again = actions.run_inline("publish_status", principal, body)
    if settings.REDIS_URL:
        assert again is not None
        assert again.status == 202
        assert [m["conversation_id"] for m in services.status_take(10)] == ["mine", "mine"]
    else:  # the embedded queue is a table: always the thread path
        assert again is None
    other = {**_OK, "conversation_id": "theirs"}
    assert actions.run_inline("publish_status", principal, other) is None


# --- POST /status/batch ---------------------------------------------------------------------------


def _batch(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{**_OK, **m} for m in messages]}


def test_a_batch_of_statuses_is_queued_whole_and_in_order(platform: Persona) -> None:
    body = _batch(*({"message": f"m{i}", "category": "tool"} for i in range(300)))
    response = platform.client.post("/api/v1/status/batch", body, format="json")
    assert response.status_code == 202
    assert response.json() == {"queued": 300}
    assert [m["message"] for m in services.status_take(500)] == [f"m{i}" for i in range(300)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_batch({}, {"category": "colour"}), "messages.1.category"),
        (_batch({}, {"message": "x" * 4097}), "messages.1.message"),
        (_batch({}, {}, {"metadata": [1]}), "messages.2.metadata"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        (_batch(*({} for _ in range(501))), "messages"),
        ({"messages": [_OK], "extra": 1}, "extra"),
    ],
)
def test_a_batch_with_one_bad_status_queues_none_of_it(
    platform: Persona, body: dict[str, Any], field: str
) -> None:
    response = platform.client.post("/api/v1/status/batch", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert services.status_take(1000) == []


def test_a_scoped_keys_batch_into_a_conversation_it_never_used_is_refused_whole(
    member: Persona,
) -> None:
    member.client.post("/api/v1/usage", event("b-1", conversation_id="mine"), format="json")
    settle()
    body = _batch({"conversation_id": "mine"}, {"conversation_id": "theirs"})
    response = member.client.post("/api/v1/status/batch", body, format="json")
    assert response.status_code == 403
    assert "messages.1.conversation_id" in response.json()["error"]["fields"]
    assert services.status_take(10) == []
    ok = member.client.post(
        "/api/v1/status/batch", _batch({"conversation_id": "mine"}), format="json"
    )
    assert ok.status_code == 202
    [queued] = services.status_take(10)
    assert (queued["team_id"], queued["project_id"]) == ("search", "ranker")
