"""The Redis buffer against the real PostgreSQL, Redis and Celery processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from tests.conftest import Persona, child_database_url, event, rows
from tokenmgr_project.core import redis as tm_redis
from usage import buffer, services
from usage.models import TokenUsage

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]


def _child_env() -> dict[str, str]:
    """Environment for a child process that uses this test's database and Redis."""
    return {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    script = "import django; django.setup()\n" + code
    return subprocess.run(
        [sys.executable, "-c", script],
        env=_child_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_api_answers_after_the_buffer_write_and_the_flush_commits(platform: Persona) -> None:
    batch = {"events": [event(f"buf-{i}") for i in range(250)]}
    assert (
        platform.client.post("/api/v1/usage/batch", batch, format="json").json()["created"] == 250
    )
    assert TokenUsage.objects.count() == 0
    assert platform.client.get("/api/v1/health").json()["buffer"]["depth"] == 250
    result = services.usage_flush()
    assert (result.events, result.inserted) == (250, 250)
    health = platform.client.get("/api/v1/health").json()
    assert (health["buffer"]["depth"], health["buffer"]["last_flush_count"]) == (0, 250)
    assert TokenUsage.objects.count() == 250


def test_a_worker_killed_after_commit_before_ack_double_counts_nothing(platform: Persona) -> None:
    platform.client.post(
        "/api/v1/usage/batch", {"events": [event(f"k-{i}") for i in range(120)]}, format="json"
    )
    child = _run_child(
        "import os\n"
        "from usage import buffer, services\n"
        "entries = buffer.read_new('victim', 50)\n"
        "lines = [line for e in entries for line in e.lines]\n"
        "services.usage_lines_insert(lines)\n"
        "os._exit(9)  # dies after the commit, before acknowledging\n"
    )
    assert child.returncode == 9, child.stderr
    assert TokenUsage.objects.count() == 120
    assert buffer.pending_entries() == 1
    result = services.usage_flush(reclaim_idle_ms=0)
    assert (result.events, result.inserted) == (120, 0)
    assert (TokenUsage.objects.count(), buffer.depth(), buffer.pending_entries()) == (120, 0, 0)


def test_a_worker_killed_before_commit_loses_nothing(platform: Persona) -> None:
    platform.client.post(
        "/api/v1/usage/batch", {"events": [event(f"l-{i}") for i in range(80)]}, format="json"
    )
    child = _run_child(
        "import os\nfrom usage import buffer\nbuffer.read_new('victim', 50)\nos._exit(9)\n"
    )
    assert child.returncode == 9, child.stderr
    assert services.usage_flush(reclaim_idle_ms=60_000).inserted == 0  # not idle long enough yet
    assert services.usage_flush(reclaim_idle_ms=0).inserted == 80
    assert (TokenUsage.objects.count(), buffer.depth()) == (80, 0)


def test_a_repeat_older_than_the_redis_claim_is_judged_by_the_ledger(platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("aged"), format="json")
    services.usage_flush()
    tm_redis.client().delete(buffer.dedupe_prefix() + "aged")  # the claim's TTL ran out
    again = platform.client.post("/api/v1/usage", event("aged"), format="json")
    assert again.json()["duplicate"] is True
    assert rows(request_id="aged") == 1


def test_it_writes_straight_to_the_database_when_redis_is_unreachable(platform: Persona) -> None:
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        response = platform.client.post("/api/v1/usage", event("no-redis"), format="json")
        assert response.status_code == 201
        assert TokenUsage.objects.filter(request_id="no-redis").exists()
        health = platform.client.get("/api/v1/health").json()
        assert (health["status"], health["redis"]["reachable"]) == ("degraded", False)
        again = platform.client.post("/api/v1/usage", event("no-redis"), format="json")
        assert again.json()["duplicate"] is True


def test_celery_beat_and_worker_flush_the_buffer_on_their_own(
    platform: Persona, tmp_path: Path
) -> None:
    services.manager_config_update(flush_interval=1.0)
    env = {**_child_env(), "TOKENMGR_DATA_DIR": str(tmp_path)}
    celery = [sys.executable, "-m", "celery", "-A", "tokenmgr_project"]
    procs = [
        subprocess.Popen(
            [*celery, "worker", "--concurrency", "1", "--loglevel", "WARNING"], env=env, cwd=ROOT
        ),
        subprocess.Popen(
            [*celery, "beat", "--loglevel", "WARNING", "-s", str(tmp_path / "beat")],
            env=env,
            cwd=ROOT,
        ),
    ]
    try:
        platform.client.post(
            "/api/v1/usage/batch", {"events": [event(f"c-{i}") for i in range(30)]}, format="json"
        )
        deadline = time.monotonic() + 30
        while TokenUsage.objects.count() < 30 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert TokenUsage.objects.count() == 30
        assert buffer.depth() == 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def test_without_redis_a_large_batch_meeting_stored_rows_stores_only_the_new_ones(
    platform: Persona,
) -> None:
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        first = [event(f"m-{i}") for i in range(0, 100, 2)]
        assert (
            platform.client.post("/api/v1/usage/batch", {"events": first}, format="json").json()[
                "created"
            ]
            == 50
        )
        both = {"events": [event(f"m-{i}") for i in range(100)]}
        body = platform.client.post("/api/v1/usage/batch", both, format="json").json()
    assert (body["created"], body["duplicates"]) == (50, 50)
    assert [r["status"] for r in body["results"][:2]] == ["duplicate", "created"]
    assert TokenUsage.objects.count() == 100
