"""Shared personas and helpers. Every ingestion test runs on whichever path the pass configures:
buffered (PostgreSQL + Redis) or direct (SQLite); `settle()` makes buffered rows visible."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings
from django.db import connection, connections
from rest_framework.test import APIClient

from budgets import alerts as budget_alerts
from budgets import selectors as budget_selectors
from reporting import selectors as live_selectors
from reporting import services as live_services
from reporting.publisher import publisher as live_publisher
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from usage import pricing, services
from usage.auth import key_cache
from usage.models import ApiKey, TokenUsage

CI = os.environ.get("CI") == "true"
# Debian's chromium, driven by Playwright (browser tests); TOKENMGR_CHROMIUM to use another.
CHROMIUM = Path(os.environ.get("TOKENMGR_CHROMIUM", "/usr/bin/chromium"))
# Where tests leave what a person should look at (screenshots); a test run's artifacts.
ARTIFACTS = Path(
    os.environ.get("TOKENMGR_TEST_ARTIFACTS")
    or Path(__file__).resolve().parents[1] / "var" / "test-artifacts"
)
T = TypeVar("T")


def settle() -> None:
    """Flush the Redis buffer (if any) so accepted usage is in the ledger."""
    services.usage_flush(reclaim_idle_ms=0)


def child_database_url() -> str:
    """A DATABASE_URL that points a child process at this test run's database."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user, host, port = db["USER"] or "postgres", db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


def rows(**filters: Any) -> int:
    settle()
    return TokenUsage.objects.filter(**filters).count()


def event(request_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": request_id,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 20,
    }
    base.update(fields)
    return base


def run_concurrently(fn: Callable[[], T], times: int) -> list[T]:
    """Run fn in `times` threads released together; each thread closes its DB connection."""
    barrier = threading.Barrier(times)
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            barrier.wait()
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def chromium() -> str:
    """The browser for Playwright tests. Missing chromium or playwright: skipped, except with
    CI=true, where that is a failure (CI must look at the pages)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401 - only asks whether it is installed
    except ImportError:
        missing.append("python playwright (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    return str(CHROMIUM)


@dataclass
class Persona:
    name: str
    client: APIClient
    key: ApiKey | None = None
    raw_key: str = ""


def _key_persona(name: str, **scope: str) -> Persona:
    key, raw = services.api_key_create(name=name, **scope)  # type: ignore[arg-type]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return Persona(name, client, key, raw)


@pytest.fixture
def platform(db: None) -> Persona:
    """The platform team's global (admin) API key."""
    return _key_persona("platform", scope="global")


@pytest.fixture
def team_lead(db: None) -> Persona:
    """A team-scoped key for team "search"."""
    return _key_persona("team lead", scope="team", team_id="search")


@pytest.fixture
def member(db: None) -> Persona:
    """A project-scoped key: team "search", project "ranker"."""
    return _key_persona("member", scope="project", team_id="search", project_id="ranker")


@pytest.fixture
def outsider(db: None) -> Persona:
    """A project-scoped key for another team's project."""
    return _key_persona("outsider", scope="project", team_id="ads", project_id="bidder")


@pytest.fixture
def admin(db: None, django_user_model: Any) -> Persona:
    """A staff superuser logged in (browsable API and admin)."""
    user = django_user_model.objects.create_superuser("admin", "admin@example.com", "pw-admin-123")
    client = APIClient()
    client.force_login(user)
    return StaffSession("admin", client, user=user)


@pytest.fixture(autouse=True)
def _isolated_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fresh Redis keyspace and fresh per-process caches for every test."""
    needs_services = request.node.get_closest_marker("services") is not None
    if needs_services and not (
        settings.REDIS_URL and "postgresql" in settings.DATABASES["default"]["ENGINE"]
    ):
        message = "needs PostgreSQL and Redis (DATABASE_URL / REDIS_URL)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    if settings.REDIS_URL:
        try:
            tm_redis.client().flushdb()
        except tm_redis.REDIS_ERRORS as exc:
            pytest.fail(f"Redis at {settings.REDIS_URL} is unreachable: {exc}")
    tm_redis.reset()
    unavailable.reset()  # a database outage simulated by an earlier test is over
    key_cache.clear()
    pricing.overrides.invalidate()
    services.config._config_cache = None
    budget_selectors.invalidate_rules()
    budget_alerts._soon_last.clear()
    # The live publisher hands its events to a broadcaster in this process (as in the embedded
    # server), so a test's broadcaster tick takes them, and no thread leaks them into the next.
    live_publisher.taken_locally = True
    live_publisher.discard()
    live_selectors.seen_conversations.clear()
    live_services.local_drops.count = 0
    live_services.metrics.reset()
    live_services.clients.counts = {"status": 0, "dashboard": 0}
    yield
    tm_redis.reset()


# --- more personas (authorisation matrix) --------------------------------------------------------


@dataclass
class StaffSession(Persona):
    """A logged-in staff user; `user` is the Django user."""

    user: Any = None


def _staff_persona(
    django_user_model: Any, name: str, perms: tuple[str, ...], *, superuser: bool = False
) -> StaffSession:
    from django.contrib.auth.models import Permission

    # No password (force_login needs none): hashing one costs more than the rest of a test.
    if superuser:
        user = django_user_model.objects.create_superuser(name, f"{name}@example.com", None)
    else:
        user = django_user_model.objects.create_user(name, f"{name}@example.com", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    client = APIClient()
    client.force_login(user)
    return StaffSession(name, client, user=user)


# What "staff with view permission" holds: the admin's view permissions on the models the API reads.
VIEW_PERMISSIONS = (
    "usage.view_tokenusage",
    "usage.view_modelprice",
    "budgets.view_budget",
    "budgets.view_budgetoverride",
    "budgets.view_budgetalert",
    "budgets.view_agentprofile",
)


@pytest.fixture
def revoked(db: None) -> Persona:
    """A global key that has been revoked."""
    persona = _key_persona("revoked", scope="global")
    assert persona.key is not None
    services.api_key_revoke(key=persona.key)
    return persona


@pytest.fixture
def staff_noperm(db: None, django_user_model: Any) -> StaffSession:
    """A staff user without any permission: may log in to the admin, sees nothing there."""
    return _staff_persona(django_user_model, "staff_noperm", ())


@pytest.fixture
def staff_viewer(db: None, django_user_model: Any) -> StaffSession:
    """A staff user with the view permissions (usage, prices, budgets, overrides, alerts,
    agents)."""
    return _staff_persona(django_user_model, "staff_viewer", VIEW_PERMISSIONS)


@pytest.fixture
def approver(db: None, django_user_model: Any) -> StaffSession:
    """A staff user who decides budget overrides (and may view budgets and their overrides)."""
    return _staff_persona(
        django_user_model,
        "approver",
        (
            "budgets.approve_budgetoverride",
            "budgets.view_budget",
            "budgets.view_budgetoverride",
            "budgets.add_budgetoverride",
        ),
    )
