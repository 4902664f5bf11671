"""Budget alerts (SPEC §5): thresholds once per period, exhausted, resolved, burn rate, and
delivery to the status feed, email and signed webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core import mail
from django.utils import timezone

from budgets import alerts
from budgets.alerts import alerts_evaluate
from budgets.models import AlertChannel, AlertDelivery, Budget, BudgetAlert, BudgetOverride
from budgets.services import budget_create
from budgets.tasks import alert_deliveries_send_due
from reporting.services import status_take
from tests.budgets.conftest import StaffPersona
from tests.conftest import Persona, child_database_url, event, run_concurrently, settle
from tokenmgr_project.celery import app as celery_app
from tokenmgr_project.core import redis as tm_redis
from usage import services

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
MINUTE = timedelta(minutes=1)


@pytest.fixture(autouse=True)
def _dollar_per_token(db: None) -> None:
    """Model "flat-1" costs exactly 1 USD per token, so spend is easy to read in tests."""
    services.model_price_set(
        provider="openai",
        model="flat-1",
        input_per_mtok=Decimal(1_000_000),
        output_per_mtok=Decimal(1_000_000),
        effective_from=datetime(2015, 1, 1, tzinfo=UTC),
    )


def _budget(**fields: Any) -> Budget:
    values: dict[str, Any] = {"name": "Team search", "scope": "team", "scope_id": "search"}
    values.update(fields or {"cost_limit": Decimal(100)})
    return budget_create(principal=None, **values)


def _spend(who: Persona, request_id: str, tokens: int, **fields: Any) -> None:
    """Record `tokens` tokens (= that many USD) for team "search" through the public API."""
    body = event(request_id, model="flat-1", input_tokens=tokens, output_tokens=0, team_id="search")
    body.update(fields)
    assert who.client.post("/api/v1/usage", body, format="json").status_code == 201
    settle()


def _evaluate(budget: Budget) -> list[BudgetAlert]:
    """Evaluate in the period's last minute: its spend rate then projects no overrun (burn-rate
    alerts have their own test)."""
    return alerts_evaluate(budget_id=budget.pk, now=budget.window_at(timezone.now()).end - MINUTE)


def _fired(budget: Budget) -> list[tuple[str, str, int]]:
    alerts = BudgetAlert.objects.filter(budget=budget).order_by("kind", "metric", "threshold")
    return [(a.kind, a.metric, int(a.threshold)) for a in alerts]


def _channel(kind: str, target: str, secret: str = "") -> AlertChannel:
    services.manager_config_update(alert_channels=["status", "email", "webhook"])
    return AlertChannel.objects.create(kind=kind, target=target, secret=secret)


# --- evaluation ----------------------------------------------------------------------------------


def test_it_fires_each_threshold_once_when_spend_jumps_past_several(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "big", 95)

    created = _evaluate(budget)

    assert [(a.kind, int(a.threshold)) for a in created] == [
        ("threshold", 50),
        ("threshold", 80),
        ("threshold", 90),
    ]
    assert (
        created[1].message == "Team search monthly budget at 80 % of 100.00 USD (95.00 USD spent)"
    )
    assert _evaluate(budget) == []
    assert BudgetAlert.objects.filter(budget=budget).count() == 3


def test_it_alerts_on_token_limits(platform: Persona) -> None:
    budget = _budget(token_limit=1000)
    _spend(platform, "tokens", 850)

    _evaluate(budget)

    assert _fired(budget) == [("threshold", "tokens", 50), ("threshold", "tokens", 80)]
    message = BudgetAlert.objects.get(budget=budget, threshold=80).message
    assert message == "Team search monthly budget at 80 % of 1,000 tokens (850 tokens used)"


def test_it_announces_an_exhausted_budget(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "over", 120)

    _evaluate(budget)

    exhausted = BudgetAlert.objects.get(budget=budget, kind="exhausted")
    assert (exhausted.threshold, exhausted.percent) == (100, Decimal("120.00"))
    assert exhausted.message == (
        "Team search monthly budget exhausted: 100 % of 100.00 USD (120.00 USD spent)"
    )
    assert len(_fired(budget)) == 4


def test_it_resolves_thresholds_an_approved_override_brings_it_under(
    platform: Persona, approver: StaffPersona
) -> None:
    budget = _budget()
    _spend(platform, "busy", 85)
    _evaluate(budget)
    BudgetOverride.objects.create(
        budget=budget,
        extra_cost=Decimal(100),
        reason="launch",
        expires_at=timezone.now() + timedelta(days=40),
        status="approved",
        decided_by=approver.user,
        decided_at=timezone.now(),
    )

    resolved = _evaluate(budget)

    assert [(a.kind, int(a.threshold)) for a in resolved] == [("resolved", 50), ("resolved", 80)]
    assert resolved[1].message == (
        "Team search monthly budget back under 80 % of 200.00 USD (85.00 USD spent)"
    )
    assert _evaluate(budget) == []


def test_it_warns_when_the_burn_rate_would_overrun_the_limit(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "early", 40)
    period = budget.window_at(timezone.now())
    length = period.end - period.start

    assert alerts_evaluate(budget_id=budget.pk, now=period.start + timedelta(minutes=5)) == []
    burn = alerts_evaluate(budget_id=budget.pk, now=period.start + length / 4)

    assert [a.kind for a in burn] == ["burn_rate"]
    assert burn[0].message.startswith("Team search monthly budget on pace for 160.00 USD")
    assert alerts_evaluate(budget_id=budget.pk, now=period.start + length / 3) == []


def test_a_lifetime_budget_has_no_burn_rate(platform: Persona) -> None:
    budget = _budget(cost_limit=Decimal(100), period="lifetime")
    _spend(platform, "steady", 40)

    assert alerts_evaluate(budget_id=budget.pk) == []


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_concurrent_evaluations_fire_each_alert_once(platform: Persona) -> None:
    budget = _budget()
    _spend(platform, "race", 95)

    counts = run_concurrently(lambda: len(_evaluate(budget)), 6)

    assert sum(counts) == 3
    assert _fired(budget) == [("threshold", "cost", t) for t in (50, 80, 90)]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_usage_triggers_evaluation_without_waiting_for_the_beat(
    platform: Persona, tmp_path: Path
) -> None:
    budget = _budget()
    # Creating the budget asked for an evaluation too: drop it, so only the usage can alert.
    celery_app.control.purge()
    tm_redis.client().delete(tm_redis.key("alerts", "soon", str(budget.pk)))
    alerts._soon_last.clear()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tokenmgr_project", "worker", "-c", "1"],
        env={**_child_env(), "TOKENMGR_DATA_DIR": str(tmp_path)},
        cwd=ROOT,
    )
    try:
        _spend(platform, "live", 60)
        deadline = time.monotonic() + 30  # no beat runs here: only the ingestion's request
        while not BudgetAlert.objects.filter(budget=budget, kind="threshold").exists():
            assert time.monotonic() < deadline, "no alert within 30 s"
            time.sleep(0.2)
        assert ("threshold", "cost", 50) in _fired(budget)
    finally:
        worker.terminate()
        worker.wait(timeout=20)


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }


# --- delivery ------------------------------------------------------------------------------------


def test_it_delivers_only_through_enabled_channel_kinds(platform: Persona) -> None:
    AlertChannel.objects.create(kind="email", target="oncall@example.com")
    AlertChannel.objects.create(kind="status", target="budget-feed")
    budget = _budget()
    _spend(platform, "half", 50)

    _evaluate(budget)

    kinds = AlertDelivery.objects.values_list("channel__kind", flat=True)
    assert list(kinds) == ["status"]  # the default manager setting enables the status feed only


def test_it_publishes_alerts_to_the_live_status_feed(platform: Persona) -> None:
    _channel("status", "budget-feed")
    budget = _budget()
    _spend(platform, "half", 50)
    _evaluate(budget)

    assert alert_deliveries_send_due.apply().get() == 1

    [message] = [m for m in status_take(100) if m["conversation_id"] == "budget-feed"]
    assert message["category"] == "budget"
    assert (
        message["message"] == "Team search monthly budget at 50 % of 100.00 USD (50.00 USD spent)"
    )
    assert message["metadata"]["budget"]["id"] == budget.pk


def test_it_emails_alerts(platform: Persona) -> None:
    _channel("email", "oncall@example.com")
    budget = _budget()
    _spend(platform, "half", 50)
    _evaluate(budget)

    alert_deliveries_send_due.apply().get()

    [email] = mail.outbox
    assert email.to == ["oncall@example.com"]
    assert "Team search monthly budget at 50 %" in email.subject
    assert AlertDelivery.objects.get().status == "sent"


class _Hook:
    """A real HTTP endpoint on 127.0.0.1 answering with the given statuses in turn."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append((dict(self.headers), body))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/budget"


@pytest.fixture
def hook() -> Iterator[_Hook]:
    hook = _Hook([])
    thread = threading.Thread(target=hook.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def _webhook_alert(platform: Persona, hook: _Hook) -> Budget:
    _channel("webhook", hook.url, secret="s3cret")
    budget = _budget()
    _spend(platform, "half", 50)
    _evaluate(budget)
    return budget


def test_it_posts_webhooks_signed_with_the_channel_secret(platform: Persona, hook: _Hook) -> None:
    budget = _webhook_alert(platform, hook)

    assert alert_deliveries_send_due.apply().get() == 1

    [(headers, body)] = hook.received
    signed = headers["X-Tokenmgr-Timestamp"].encode() + b"." + body
    expected = hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()
    assert headers["X-Tokenmgr-Signature"] == f"sha256={expected}"
    payload = json.loads(body)
    assert (payload["kind"], payload["threshold"], payload["budget"]["id"]) == (
        "threshold",
        "50",
        budget.pk,
    )


def test_it_retries_a_failed_webhook_with_backoff(platform: Persona, hook: _Hook) -> None:
    hook.statuses = [500]
    _webhook_alert(platform, hook)

    assert alert_deliveries_send_due.apply().get() == 0
    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("pending", 1, "HTTP 500")
    assert delivery.next_attempt_at is not None
    assert alert_deliveries_send_due.apply().get() == 0  # not due for another 30 s

    from budgets.deliveries import alert_deliveries_send_due as send_due

    assert send_due(now=delivery.next_attempt_at + timedelta(seconds=1)) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 2, "")
    assert len(hook.received) == 2


def test_it_gives_up_on_a_webhook_after_eight_attempts(platform: Persona, hook: _Hook) -> None:
    from budgets.deliveries import alert_deliveries_send_due as send_due

    hook.statuses = [503] * 20
    _webhook_alert(platform, hook)
    now = timezone.now()

    for _ in range(10):
        send_due(now=now)
        now += timedelta(hours=2)

    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 8, "HTTP 503")
    assert len(hook.received) == 8
