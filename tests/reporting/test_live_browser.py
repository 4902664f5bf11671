"""The live admin pages in a real browser (Debian's chromium through Playwright), against the
whole system started the README's way (`manage.py up`: server, worker, beat, broadcaster) on
this pass's database and Redis: PostgreSQL + Redis, or the embedded default.

Screenshots of each page go to the run's artifacts (tests.conftest.ARTIFACTS/live/).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from budgets.services import budget_create
from reporting.models import Anomaly
from tests.conftest import ARTIFACTS, child_database_url
from tests.processes import Up
from usage import services

pytestmark = pytest.mark.django_db(transaction=True)

VIEWPORT = {"width": 1366, "height": 768}
PASSWORD = "pw-live-browser-1"
WAIT_MS = 20_000  # generous: a loaded CI machine


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": child_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "TOKENMGR_DATA_DIR": str(tmp_path),
    }


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Up]:
    services.manager_config_update(flush_interval=1.0)
    up = Up(_env(tmp_path), "--workers", "1")
    try:
        up.wait_healthy()
        yield up
    finally:
        up.stop()


def _shot(page: Any, name: str) -> None:
    """Keep a screenshot; and the page fits the 1366 px screen (nothing wider than it)."""
    folder = ARTIFACTS / "live"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}-{connection.vendor}.png"), full_page=True)
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"{name} is {width[0]} px wide at {width[1]} px"


def _eventually(check: Callable[[], bool], what: str, timeout: float = WAIT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


def _usage(up: Up, key: str, request_id: str, **fields: Any) -> Decimal:
    body = {
        "request_id": request_id,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 40_000,
        "output_tokens": 10_000,
        **fields,
    }
    status, answer = up.api("usage", body, key)
    assert status == 201, answer
    return Decimal(answer["cost"])


def _status(up: Up, key: str, conversation_id: str, category: str, message: str) -> None:
    body = {"conversation_id": conversation_id, "category": category, "message": message}
    status, answer = up.api("status", body, key)
    assert status == 202, answer


def _messages(page: Any) -> list[str]:
    return list(page.locator("#tm-feed .tm-message-text").all_text_contents())


def _money(text: str) -> Decimal:
    return Decimal(text.replace("$", "").replace(",", ""))


def test_the_live_pages_update_without_a_reload_and_come_back_after_a_server_restart(
    chromium: str, system: Up, django_user_model: Any
) -> None:
    from playwright.sync_api import sync_playwright

    django_user_model.objects.create_superuser("live", "live@example.com", PASSWORD)
    _key, key = services.api_key_create(name="browser", scope="global")
    budget_create(
        principal=None,
        name="<script>alert(1)</script> hard budget",
        scope="global",
        scope_id="",
        cost_limit=Decimal(5),
        enforcement="hard",
    )
    up = system
    conversation = "browser-<b>conv</b>"
    # An open anomaly the detection job recorded (issue 13) is on the dashboard from its load.
    Anomaly.objects.create(
        dimension="team_id",
        series="<i>search</i>",
        team_id="<i>search</i>",
        granularity="hour",
        metric="cost",
        bucket=timezone.now().replace(minute=0, second=0, microsecond=0),
        value=52_000_000_000,
        expected=9_000_000_000,
        lower=0,
        upper=21_000_000_000,
        score=Decimal("14.20"),
        drivers=[
            {
                "dimension": "agent",
                "value": "runaway",
                "actual": "4.5",
                "expected": "0.2",
                "excess": "4.3",
                "share_of_excess": "100.0",
            }
        ],
    )

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox"], headless=True
        )
        try:
            context = browser.new_context(viewport=VIEWPORT)
            dashboard = context.new_page()
            dashboard.goto(f"{up.base}/admin/login/?next=/admin/live/")
            dashboard.fill("#id_username", "live")
            dashboard.fill("#id_password", PASSWORD)
            dashboard.click("input[type=submit]")
            dashboard.wait_for_selector("body[data-live-state=live]", timeout=WAIT_MS)
            dashboard.evaluate("window.__notReloaded = true")
            spent_before = _money(dashboard.text_content("#tm-cost") or "")
            bar = dashboard.locator("#tm-budgets .tm-bar-label").first
            percent_before = float(bar.get_attribute("data-percent") or 0)
            # The budget's name is shown as text, not run.
            assert "<script>" in (dashboard.text_content("#tm-budgets") or "")
            anomaly = dashboard.text_content("#tm-anomalies") or ""
            assert "team_id <i>search</i>" in anomaly
            assert "mostly agent runaway (+4.3)" in anomaly
            assert dashboard.is_hidden("#tm-anomalies-empty")

            spent = sum(_usage(up, key, f"b-{i}", conversation_id=conversation) for i in range(3))
            expected = spent_before + spent
            _eventually(
                lambda: (
                    abs(_money(dashboard.text_content("#tm-cost") or "") - expected)
                    < Decimal("0.00005")
                ),
                f"the dashboard showing {expected} spent",
            )
            _eventually(
                lambda: float(bar.get_attribute("data-percent") or 0) > percent_before,
                "the budget bar moving",
            )
            # With spend, the bar says when the budget runs out at its burn rate (issue 13).
            runs_out = dashboard.text_content("#tm-budgets .tm-bar-runout") or ""
            assert re.match(r"(runs out ~\w{3} \d+,|won't run out this period) .*rate", runs_out)
            assert dashboard.evaluate("window.__notReloaded") is True
            assert dashboard.text_content("#tm-requests") == "3"
            _shot(dashboard, "dashboard")

            feed = context.new_page()
            feed.goto(f"{up.base}/admin/live/conversations/")
            assert conversation in (feed.text_content("#tm-conversations") or "")
            _shot(feed, "conversations")
            feed.click(f"text={conversation}")
            feed.wait_for_selector("body[data-live-state=live]", timeout=WAIT_MS)
            feed.evaluate("window.__notReloaded = true")
            _status(up, key, conversation, "progress", "<script>p-1</script>")
            _status(up, key, conversation, "tool", "t-1")
            _eventually(lambda: {"<script>p-1</script>", "t-1"} <= set(_messages(feed)), "p-1, t-1")

            feed.uncheck("#tm-categories input[value=tool]")
            _eventually(
                lambda: (
                    "tool"
                    not in (feed.get_attribute("#tm-categories", "data-subscribed") or "tool")
                ),
                "the server confirming the unsubscribe",
            )
            _status(up, key, conversation, "tool", "t-2")
            _status(up, key, conversation, "progress", "p-2")
            _eventually(lambda: "p-2" in _messages(feed), "p-2 after the tool toggle")
            time.sleep(1.0)  # t-2 was published before p-2: had it come, it would be here
            assert "t-2" not in _messages(feed)
            assert _messages(feed)[0] == "p-2"  # newest on top
            assert feed.evaluate("window.__notReloaded") is True

            # Paused: what arrives is counted, not shown; on resume it is shown, newest on top.
            feed.click("#tm-pause")
            _status(up, key, conversation, "progress", "while paused 1")
            _status(up, key, conversation, "progress", "while paused 2")
            _eventually(
                lambda: (feed.text_content("#tm-paused") or "").startswith("2 new"),
                "the paused count",
            )
            assert "while paused 1" not in _messages(feed)
            _shot(feed, "feed-paused")
            feed.click("#tm-pause")
            assert _messages(feed)[:2] == ["while paused 2", "while paused 1"]
            assert feed.is_hidden("#tm-paused")
            _shot(feed, "feed")

            # The server dies; the supervisor starts it again; both pages reconnect by themselves.
            os.kill(up.child("serve"), signal.SIGKILL)
            feed.wait_for_selector("body[data-live-state=reconnecting]", timeout=WAIT_MS)
            _shot(feed, "feed-reconnecting")
            up.wait_healthy()
            for page in (feed, dashboard):
                page.wait_for_selector("body[data-live-state=live]", timeout=30_000)
                assert page.evaluate("window.__notReloaded") is True
            _status(up, key, conversation, "progress", "after the restart")
            _eventually(lambda: "after the restart" in _messages(feed), "a message after restart")
            assert "reconnected" in (feed.text_content("#tm-feed") or "")
            after = _usage(up, key, "b-after", conversation_id=conversation)
            _eventually(
                lambda: (
                    abs(_money(dashboard.text_content("#tm-cost") or "") - (expected + after))
                    < Decimal("0.00005")
                ),
                "the dashboard counting usage recorded after the restart",
            )
            _shot(feed, "feed-after-restart")
            _shot(dashboard, "dashboard-after-restart")
        finally:
            browser.close()
