"""The database unreachable while Redis is up (issue 8 item 7): known keys keep recording usage
from caches and the buffer, what cannot be decided is a 503 with Retry-After and the JSON error
shape (never a 500), and the backlog drains exactly once when the database is back.

In-process, the outage is a query wrapper that fails every statement the way a dead server does
(tests/test_faults_postgres.py stops a real PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any
from unittest import mock

import psycopg
import pytest
from django.conf import settings
from django.db import OperationalError, connection
from django.utils import timezone

from budgets import selectors as budget_selectors
from budgets.models import Budget
from tests.conftest import Persona, event
from tokenmgr_project.core import redis as tm_redis
from usage import auth, buffer, pricing, services, tasks
from usage.auth import KEY_CACHE_SECONDS, KEY_OUTAGE_SECONDS, key_cache
from usage.models import TokenUsage

_CONTROL = ("SAVEPOINT", "RELEASE", "ROLLBACK")  # the test's own transaction keeps working


def _refuse(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    if sql.lstrip().upper().startswith(_CONTROL):
        return execute(sql, params, many, context)
    raise OperationalError("connection to server failed: Connection refused")


@contextlib.contextmanager
def database_down() -> Iterator[None]:
    # The flush COPYs through psycopg's own cursor, beneath Django's query wrappers.
    refused = psycopg.OperationalError("consuming input failed: server closed the connection")
    with (
        connection.execute_wrapper(_refuse),
        mock.patch.object(psycopg.Cursor, "copy", side_effect=refused),
    ):
        yield


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The key cache's time, moved by the test instead of sleeping through TTLs."""
    now = [1_000_000.0]
    monkeypatch.setattr(key_cache, "clock", lambda: now[0])
    return now


def _assert_unavailable(response: Any) -> None:
    assert response.status_code == 503
    assert response["Retry-After"].isdigit()
    assert response.json()["error"]["code"] == "unavailable"
    assert set(response.json()["error"]) == {"code", "message", "fields"}


def _tokenize(persona: Persona) -> Any:
    # Needs the caller's key and nothing else from the database.
    return persona.client.post("/api/v1/tokenize", {"text": "hello"}, format="json")


def test_it_answers_a_read_with_503_and_retry_after_when_the_database_is_down(
    member: Persona,
) -> None:
    assert member.client.get("/api/v1/usage").status_code == 200
    with database_down():
        response = member.client.get("/api/v1/usage")
        summary = member.client.get("/api/v1/usage/summary")
    _assert_unavailable(response)
    _assert_unavailable(summary)


def test_it_answers_an_unknown_key_with_503_on_the_fast_path_when_the_database_is_down(
    member: Persona,
) -> None:
    _key, raw = services.api_key_create(name="never used", scope="global")
    with database_down():
        response = member.client.post(
            "/api/v1/usage",
            event("r-1"),
            format="json",
            HTTP_AUTHORIZATION=f"Bearer {raw}",
        )
    _assert_unavailable(response)


def test_it_answers_503_from_the_hot_path_when_the_database_is_down(db: None) -> None:
    from tokenmgr_project.core.hotpath import run_action

    _key, raw = services.api_key_create(name="bridge", scope="global")
    with database_down():
        answer = run_action("track_usage", f"Bearer {raw}", b'{"model": "x"}')
    assert answer is not None
    code, body, headers = answer
    assert code == 503
    assert headers == {"Retry-After": "5"}
    assert body["error"]["code"] == "unavailable"


def test_it_answers_the_admin_with_503_json_when_the_database_is_down(admin: Persona) -> None:
    assert admin.client.get("/admin/").status_code == 200
    with database_down():
        response = admin.client.get("/admin/usage/tokenusage/")
    _assert_unavailable(response)


def test_it_reports_the_database_down_in_health_without_querying_it(platform: Persona) -> None:
    with database_down():
        response = platform.client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert (body["database"]["reachable"], body["database"]["status"]) == (False, "down")
    assert body["status"] == "down"
    assert body["unpriced_requests"] is None
    assert body["status_messages"] == {"queued": None, "dropped": None, "connected_clients": None}


def test_it_serves_a_known_key_from_its_cache_while_the_database_is_down(
    member: Persona, clock: list[float]
) -> None:
    assert _tokenize(member).status_code == 200  # looked up in the database
    clock[0] += KEY_CACHE_SECONDS + 1  # the cached copy has expired: the database is asked
    with database_down():
        assert _tokenize(member).status_code == 200
        clock[0] += 2
        assert _tokenize(member).status_code == 200


def test_it_answers_503_for_a_key_not_validated_recently_while_the_database_is_down(
    member: Persona, clock: list[float]
) -> None:
    assert _tokenize(member).status_code == 200
    clock[0] += KEY_OUTAGE_SECONDS + 1
    if settings.REDIS_URL:  # the shared copy would have expired by now too
        assert member.key is not None
        tm_redis.client().delete(auth._shared_key(member.key.key_hash))
    with database_down():
        _assert_unavailable(_tokenize(member))


def test_it_keeps_a_revoked_key_refused_while_the_database_is_down(
    member: Persona, clock: list[float]
) -> None:
    assert _tokenize(member).status_code == 200
    assert member.key is not None
    services.api_key_revoke(key=member.key)
    clock[0] += KEY_CACHE_SECONDS + 1
    with database_down():
        response = _tokenize(member)
    assert response.status_code == 401


@pytest.mark.services
def test_it_shares_a_validated_key_with_processes_that_never_saw_it(member: Persona) -> None:
    assert member.key is not None
    assert _tokenize(member).status_code == 200
    ttl = tm_redis.client().ttl(auth._shared_key(member.key.key_hash))
    assert 0 < ttl <= KEY_OUTAGE_SECONDS
    key_cache.clear()  # as in another server process
    with database_down():
        assert _tokenize(member).status_code == 200


@pytest.mark.services
def test_it_removes_the_shared_copy_when_a_key_is_revoked(member: Persona) -> None:
    assert member.key is not None
    assert _tokenize(member).status_code == 200
    principal = key_cache.get(member.key.key_hash)
    assert principal is not None
    services.api_key_revoke(key=member.key)
    shared = auth._shared_key(member.key.key_hash)
    assert tm_redis.client().get(shared) == b"revoked"
    # A lookup that read the key just before the revocation cannot bring the copy back.
    auth._share(member.key.key_hash, principal)
    assert tm_redis.client().get(shared) == b"revoked"
    assert 0 < tm_redis.client().ttl(shared) <= 2 * KEY_OUTAGE_SECONDS
    key_cache.clear()
    with database_down():
        assert _tokenize(member).status_code == 401


def test_it_counts_usage_against_the_last_loaded_budget_rules_while_the_database_is_down(
    db: None,
) -> None:
    Budget.objects.create(name="everything", scope="global", cost_limit=10)
    loaded = budget_selectors.active_rules()
    budget_selectors.invalidate_rules()
    with database_down():
        rules = budget_selectors.applicable_rules({"team_id": "search"})
    assert [r.budget.pk for r in rules] == [r.budget.pk for r in loaded.everything]


def test_it_refuses_to_guess_budget_rules_it_never_loaded(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_selectors, "_rules", budget_selectors._Rules())
    monkeypatch.setattr(budget_selectors, "_rules_loaded_once", False)
    with database_down(), pytest.raises(OperationalError):
        budget_selectors.active_rules()


@pytest.mark.services
def test_it_keeps_buffering_known_keys_while_the_database_is_down_and_drains_once_after(
    member: Persona, clock: list[float]
) -> None:
    assert member.client.post("/api/v1/usage", event("before"), format="json").status_code == 201
    # Every cache has expired, so each asks the database and must do without it.
    clock[0] += KEY_CACHE_SECONDS + 1
    budget_selectors.invalidate_rules()
    pricing.overrides.invalidate()
    services.config._config_cache = None
    with database_down():
        first = member.client.post("/api/v1/usage", event("during"), format="json")
        again = member.client.post("/api/v1/usage", event("during"), format="json")
        assert tasks.usage_flush_buffer(force=True) == {"entries": 0, "events": 0, "inserted": 0}
        health = member.client.get("/api/v1/health").json()
    assert first.status_code == 201
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert health["database"]["status"] == "down"
    assert health["buffer"]["depth"] == 2
    assert health["buffer"]["pending_entries"] >= 1  # read by the failed flush, kept
    assert health["buffer"]["oldest_age_seconds"] is not None
    assert TokenUsage.objects.count() == 0
    result = tasks.usage_flush_buffer(force=True)  # the database is back
    assert result["inserted"] == 2
    assert sorted(TokenUsage.objects.values_list("request_id", flat=True)) == ["before", "during"]
    assert buffer.depth() == 0
    assert buffer.pending_entries() == 0
    assert tasks.usage_flush_buffer(force=True)["inserted"] == 0


def test_it_skips_the_last_used_write_while_the_database_is_down(
    member: Persona, clock: list[float]
) -> None:
    assert _tokenize(member).status_code == 200
    clock[0] += auth.LAST_USED_WRITE_SECONDS + 1
    with database_down():
        assert _tokenize(member).status_code == 200  # served from the last known principal
        clock[0] += 0.5  # that answer is trusted a moment; the last_used_at write is due
        assert _tokenize(member).status_code == 200


def test_it_keeps_the_last_manager_settings_while_the_database_is_down(db: None) -> None:
    services.manager_config_update(buffer_size=7)
    loaded = services.config._config_cache
    assert loaded is not None
    services.config._config_cache = (0.0, loaded[1])  # expired: the next call asks the database
    with database_down():
        assert services.manager_config().buffer_size == 7


def test_it_prices_with_the_last_read_overrides_while_the_database_is_down(db: None) -> None:
    at = timezone.now()
    services.model_price_set(
        provider="selfhosted",
        model="llama-local",
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
        effective_from=at - timedelta(days=1),
    )
    pricing.overrides.invalidate()
    assert pricing.price_choice("selfhosted", "llama-local", at).source == "override"
    pricing.overrides.invalidate()
    with database_down():
        assert pricing.price_choice("selfhosted", "llama-local", at).source == "override"
