"""The issue's invariant, with real concurrency against a running server: a hard budget of N
units and 10 x N concurrent reserve-then-track pairs of one unit each never records more than N,
and no hold outlives its pair."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.core.servers.basehttp import WSGIServer
from django.db.models import Sum

from budgets import selectors
from budgets.services import budget_create, reservations_expire
from tests.conftest import Persona, settle
from tokenmgr_project.core import redis as tm_redis
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)

# The live server's listen backlog (Django's default is 10) would reset some of 32 simultaneous
# connections before they are accepted.
WSGIServer.request_queue_size = 128

N = 20  # tokens; each pair reserves and then spends exactly one
ABANDONED_TTL = 2  # seconds


def _post(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _pairs(server: str, key: str, pairs: int, *, abandon_every: int = 0) -> list[str]:
    """Run reserve-then-track pairs from 32 threads; returns the outcome of each pair."""
    counter = iter(range(pairs))
    lock = threading.Lock()

    def one(_: int) -> str:
        with lock:
            n = next(counter)
        abandons = bool(abandon_every) and n % abandon_every == 0
        status, body = _post(
            f"{server}/api/v1/budgets/check",
            key,
            {
                "model": "gpt-4o-mini",
                "input_tokens": 1,
                "max_output_tokens": 0,
                "reserve": True,
                # Long enough that no pair outlives its hold even on a loaded machine (a usage
                # settled after its hold expired is still recorded: the call did happen).
                "reservation_ttl_seconds": ABANDONED_TTL if abandons else 60,
            },
        )
        assert status == 200, body
        if not body["allowed"]:
            return "blocked"
        if abandons:
            return "abandoned"  # the caller died: the hold must expire
        status, body = _post(
            f"{server}/api/v1/usage",
            key,
            {
                "request_id": f"pair-{n}",
                "model": "gpt-4o-mini",
                "input_tokens": 1,
                "output_tokens": 0,
                "reservation_id": body["reservation_id"],
            },
        )
        assert status == 201, body
        return "spent"

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, range(pairs)))


@pytest.fixture(params=["configured", "database only"])
def counters_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Redis counters when this pass has Redis; and always the database path (row locks on
    PostgreSQL, the write lock on SQLite)."""
    if request.param == "database only":
        monkeypatch.setattr(tm_redis, "available", lambda: False)
    return str(request.param)


def _spent() -> int:
    settle()
    return int(TokenUsage.objects.aggregate(t=Sum("total_tokens"))["t"] or 0)


def test_concurrent_pairs_never_overspend_a_hard_budget(
    live_server: Any, member: Persona, counters_path: str
) -> None:
    budget = budget_create(
        principal=None, name="tight", scope="project", scope_id="ranker", token_limit=N
    )

    outcomes = _pairs(live_server.url, member.raw_key, 10 * N)

    assert outcomes.count("spent") == N  # every unit was used, none twice
    assert _spent() == N
    status = selectors.budget_status(budget)
    assert (status.tokens_spent, status.tokens_reserved) == (N, 0)


def test_abandoned_reservations_expire_and_leak_no_hold(
    live_server: Any, member: Persona, counters_path: str
) -> None:
    budget = budget_create(
        principal=None, name="tight", scope="project", scope_id="ranker", token_limit=N
    )

    outcomes = _pairs(live_server.url, member.raw_key, 10 * N, abandon_every=3)
    assert _spent() == outcomes.count("spent") <= N

    time.sleep(ABANDONED_TTL + 0.1)
    reservations_expire()
    status = selectors.budget_status(budget)
    assert status.tokens_reserved == 0
    assert status.tokens_spent == outcomes.count("spent")
