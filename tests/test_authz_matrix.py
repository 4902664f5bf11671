"""The authorisation matrix (issue 8): every REST endpoint in the URLconf and every websocket
route, against every kind of caller. The endpoint list is read from the URL patterns, so a new
endpoint without a row here fails `test_it_has_a_row_for_every_endpoint`.

Each cell is the status the caller gets. Lists, summaries, budgets, overrides and live messages
are also checked to hold nothing of another scope (`SCOPED_READS`, the websocket test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient

from budgets.models import AgentProfile, Budget, BudgetAlert, BudgetOverride
from budgets.overrides import override_request
from budgets.services import budget_create
from reporting.routing import websocket_urlpatterns
from reporting.services import status_publish
from tests.conftest import Persona, event, settle
from usage import services
from usage.auth import principal_for_key
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

# Column order of the matrix. member: project key (search/ranker); outsider: another project's
# key (ads/bidder); team_lead: team key (search); platform: global key; admin: superuser.
PERSONAS = (
    "anonymous",
    "revoked",
    "member",
    "outsider",
    "team_lead",
    "platform",
    "staff_noperm",
    "staff_viewer",
    "approver",
    "admin",
)
# The scope each persona's rows must stay inside ("" = any).
SCOPE = {"member": ("search", "ranker"), "outsider": ("ads", "bidder"), "team_lead": ("search", "")}

# fmt: off
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    # (method, route)                          anon rev  proj other team glob s-no s-vw appr super
    ("POST", "usage"):                         (401, 401, 201, 201, 201, 201, 403, 403, 403, 201),
    ("GET", "usage"):                          (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("POST", "usage/batch"):                   (401, 401, 200, 200, 200, 200, 403, 403, 403, 200),
    ("GET", "usage/summary"):                  (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("GET", "health"):                         (200, 200, 200, 200, 200, 200, 200, 200, 200, 200),
    ("POST", "tokenize"):                      (401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    ("POST", "truncate"):                      (401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    ("GET", "pricing"):                        (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("POST", "pricing"):                       (401, 401, 403, 403, 403, 201, 403, 403, 403, 201),
    ("POST", "pricing/quote"):                 (401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    ("POST", "pricing/compare"):               (401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    # Re-pricing past usage (issue 12) rewrites ledger costs: global keys and price editors.
    ("POST", "pricing/reprice"):               (401, 401, 403, 403, 403, 200, 403, 403, 403, 200),
    ("POST", "signals"):                       (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("POST", "status"):                        (401, 401, 202, 403, 202, 202, 403, 202, 403, 202),
    ("POST", "status/batch"):                  (401, 401, 202, 403, 202, 202, 403, 202, 403, 202),
    ("GET", "budgets"):                        (401, 401, 200, 200, 200, 200, 403, 200, 200, 200),
    ("POST", "budgets"):                       (401, 401, 201, 201, 201, 201, 403, 403, 403, 201),
    ("POST", "budgets/check"):                 (401, 401, 200, 200, 200, 200, 403, 200, 200, 200),
    ("POST", "reservations/cancel"):           (401, 401, 200, 404, 200, 200, 403, 403, 403, 200),
    ("GET", "budgets/<int:budget_id>"):        (401, 401, 200, 404, 200, 200, 403, 200, 200, 200),
    ("PATCH", "budgets/<int:budget_id>"):      (401, 401, 200, 404, 200, 200, 403, 403, 403, 200),
    ("DELETE", "budgets/<int:budget_id>"):     (401, 401, 200, 404, 200, 200, 403, 403, 403, 200),
    ("GET", "budgets/<int:budget_id>/status"): (401, 401, 200, 404, 200, 200, 403, 200, 200, 200),
    ("POST", "guard"):                         (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("GET", "alerts"):                         (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    # Profiles are organisation-wide: every key reads them, global keys and staff change them.
    ("GET", "agent-profiles"):                 (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("POST", "agent-profiles"):                (401, 401, 403, 403, 403, 201, 403, 403, 403, 201),
    ("GET", "agent-profiles/<int:profile_id>"):
                                               (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("PATCH", "agent-profiles/<int:profile_id>"):
                                               (401, 401, 403, 403, 403, 200, 403, 403, 403, 200),
    ("DELETE", "agent-profiles/<int:profile_id>"):
                                               (401, 401, 403, 403, 403, 200, 403, 403, 403, 200),
    ("GET", "budgets/<int:budget_id>/overrides"):
                                               (401, 401, 200, 404, 200, 200, 403, 200, 200, 200),
    ("POST", "budgets/<int:budget_id>/overrides"):
                                               (401, 401, 201, 404, 201, 201, 403, 403, 201, 201),
    # Only a person holding the approve permission decides; no API key ever does.
    ("POST", "overrides/<int:override_id>/approve"):
                                               (401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    ("POST", "overrides/<int:override_id>/reject"):
                                               (401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    # Provenance (issue 11): reads are scoped like usage (another project's request is a 404);
    # relating requests needs the add permission, and both ends in the caller's scope.
    ("POST", "relationships"):                 (401, 401, 201, 404, 201, 201, 403, 403, 403, 201),
    ("GET", "provenance/<path:request_id>"):    (401, 401, 200, 404, 200, 200, 403, 200, 403, 200),
    ("GET", "lineage/<path:request_id>"):       (401, 401, 200, 404, 200, 200, 403, 200, 403, 200),
    ("GET", "workflows/<path:workflow_id>/usage"):
                                               (401, 401, 200, 404, 200, 200, 403, 200, 403, 200),
    ("GET", "analysis/task-costs"):            (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("GET", "analysis/patterns"):              (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("GET", "analysis/questions"):             (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    # Reports (issue 12), scoped like usage; the matrix asks for the cost report, which also reads
    # budgets (staff need both view permissions: the approver has only budgets').
    ("GET", "reports/<str:kind>"):             (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    # Analytics (issue 13): trends and anomalies, scoped like usage.
    ("GET", "trends"):                         (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("GET", "anomalies"):                      (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    # Analytics: forecasts.
    # Scoped like usage; reads budgets too (staff need both view permissions, like the cost report).
    ("GET", "forecast"):                       (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    # Analytics: recommendations.
    # Scoped like usage; deciding needs reporting.change_recommendation (staff) or a key whose
    # scope holds the recommendation (another scope's is a 404).
    ("GET", "recommendations"):                (401, 401, 200, 200, 200, 200, 403, 200, 403, 200),
    ("POST", "recommendations/<int:rec_id>/dismiss"):
                                               (401, 401, 200, 404, 200, 200, 403, 403, 403, 200),
    ("POST", "recommendations/<int:rec_id>/accept"):
                                               (401, 401, 200, 404, 200, 200, 403, 403, 403, 200),
    # Analytics: reconciliation with provider bills. Organisation-wide: global keys and staff with
    # the bill permissions only (no scoped key: a bill and the ledger beside it span every team).
    ("POST", "reconciliations"):               (401, 401, 403, 403, 403, 201, 403, 403, 403, 201),
    ("GET", "reconciliations"):                (401, 401, 403, 403, 403, 200, 403, 403, 403, 200),
    ("GET", "reconciliations/<int:bill_id>"):  (401, 401, 403, 403, 403, 200, 403, 403, 403, 200),
    # The schema and docs are public; a presented key is still authenticated, and a dead one fails.
    ("GET", "api/schema/"):                    (200, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    ("GET", "api/docs/"):                      (200, 401, 200, 200, 200, 200, 200, 200, 200, 200),
}
# Websocket routes: 1 = may join (a scoped key only a conversation with usage in its scope).
WS_MATRIX: dict[str, tuple[int, ...]] = {
    # route                                        anon rev proj othr team glob s-no s-vw appr supr
    "^ws/status/(?P<conversation_id>.{1,128})/$":    (0,  0,  1,   0,   1,   1,   0,   1,   0,   1),
    "^ws/dashboard/$":                               (0,  0,  0,   0,   0,   0,   0,   1,   0,   1),
}
# The live admin pages (issue 10): 302 = sent to the admin's login (an API key is no session);
# 403 = a staff session without usage.view_tokenusage.
#        anon rev  proj other team glob s-no s-vw appr super
_PAGE = (302, 302, 302, 302, 302, 302, 403, 200, 403, 200)
PAGE_MATRIX: dict[str, tuple[int, ...]] = {
    "admin/live/":                                        _PAGE,
    "admin/live/snapshot.json":                           _PAGE,
    "admin/live/conversations/":                          _PAGE,
    "admin/live/conversations/<path:conversation_id>/":   _PAGE,
    # The provenance pages (issue 11): a usage row's lineage, the workflows.
    "admin/provenance/lineage/<int:pk>/":                 _PAGE,
    "admin/provenance/workflows/":                        _PAGE,
    "admin/provenance/workflows/<path:workflow_id>/":     _PAGE,
    # The Reports page (issue 12).
    "admin/reports/":                                     _PAGE,
}
# fmt: on


# --- the world every cell runs in ---------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    method: str
    route: str
    who: str
    status: int


@dataclass
class World:
    budget: Budget  # project "ranker" (team "search"): the member's
    override: BudgetOverride  # pending on that budget, asked for by the member's key
    reservation_id: str  # held by the member
    profile: AgentProfile  # organisation-wide
    conversation_id: str = "conv-ranker"  # has usage of the member only


@pytest.fixture
def anonymous() -> Persona:
    return Persona("anonymous", APIClient())


@pytest.fixture
def world(member: Persona, outsider: Persona) -> World:
    assert member.key is not None
    assert outsider.key is not None
    as_member, as_outsider = principal_for_key(member.key), principal_for_key(outsider.key)
    services.usage_ingest(principal=as_member, events=[event("m-1", conversation_id="conv-ranker")])
    services.usage_ingest(
        principal=as_member,
        events=[event("m-2", workflow_id="wf-ranker", provenance={"parent_request_id": "m-1"})],
    )
    services.usage_ingest(principal=as_outsider, events=[event("o-1", conversation_id="conv-ads")])
    settle()
    budget = budget_create(
        principal=as_member,
        name="ranker monthly",
        scope="project",
        scope_id="ranker",
        cost_limit=Decimal(100),
    )
    bidder = budget_create(
        principal=as_outsider,
        name="bidder",
        scope="project",
        scope_id="bidder",
        cost_limit=Decimal(100),
    )
    override = override_request(
        budget=budget,
        principal=as_member,
        extra_cost=Decimal(10),
        extra_tokens=None,
        unlimited=False,
        reason="launch week",
        expires_at=timezone.now() + timedelta(days=7),
    )
    check = {"model": "gpt-4o", "input_tokens": 10, "max_output_tokens": 10, "reserve": True}
    reserved = member.client.post("/api/v1/budgets/check", check, format="json").json()
    for crossed in (budget, bidder):
        BudgetAlert.objects.create(
            budget=crossed,
            period_start=crossed.window_at(timezone.now()).start,
            kind=BudgetAlert.Kind.THRESHOLD,
            metric=BudgetAlert.Metric.COST,
            threshold=Decimal(50),
            spent=Decimal(50),
            limit=Decimal(100),
            percent=Decimal(50),
            message=f"{crossed.name}: 50 % of the cost limit",
        )
    profile = AgentProfile.objects.create(name="triage", model="gpt-4o", token_budget=10_000)
    return World(budget, override, reserved["reservation_id"], profile)


def _persona(request: pytest.FixtureRequest, name: str) -> Persona:
    persona: Persona = request.getfixturevalue(name)
    return persona


# --- what each cell sends ----------------------------------------------------------------------

Request = Callable[[World, str], tuple[str, Any]]  # (world, persona name) → (path, JSON body)
_ID: dict[str, Callable[[World], Any]] = {
    "path:request_id": lambda w: "m-1",
    "path:workflow_id": lambda w: "wf-ranker",
    "int:budget_id": lambda w: w.budget.pk,
    "int:override_id": lambda w: w.override.pk,
    "int:profile_id": lambda w: w.profile.pk,
    "str:kind": lambda w: "cost",
    "int:bill_id": lambda w: _bill_id(),
    "int:rec_id": lambda w: _recommendations()["search/ranker"],
}
_LATER = (timezone.now() + timedelta(days=7)).isoformat()

BODIES: dict[tuple[str, str], Callable[[World, str], Any]] = {
    ("POST", "usage"): lambda w, who: event(f"{who}-1"),
    ("POST", "usage/batch"): lambda w, who: {"events": [event(f"{who}-1"), event(f"{who}-2")]},
    ("POST", "tokenize"): lambda w, who: {"text": "hello world"},
    ("POST", "truncate"): lambda w, who: {"text": "hello world", "max_tokens": 1},
    ("POST", "pricing"): lambda w, who: {
        "provider": "openai",
        "model": f"self-hosted-{who}",
        "input_per_mtok": "0",
        "output_per_mtok": "0",
    },
    ("POST", "pricing/quote"): lambda w, who: {"model": "gpt-4o", "input_tokens": 10},
    ("POST", "pricing/compare"): lambda w, who: {"models": ["gpt-4o"], "input_tokens": 10},
    ("POST", "signals"): lambda w, who: {"type": "get_usage", "data": {}},
    ("POST", "status"): lambda w, who: {
        "conversation_id": w.conversation_id,
        "category": "info",
        "message": "hi",
    },
    ("POST", "status/batch"): lambda w, who: {
        "messages": [
            {"conversation_id": w.conversation_id, "category": "info", "message": "hi"},
            {"conversation_id": w.conversation_id, "category": "tool", "message": "there"},
        ]
    },
    ("POST", "budgets"): lambda w, who: {
        "name": f"{who}'s",
        "scope": "user",
        "scope_id": f"user-{who}",
        "cost_limit": "5",
    },
    ("POST", "budgets/check"): lambda w, who: {
        "model": "gpt-4o",
        "input_tokens": 10,
        "max_output_tokens": 10,
    },
    ("POST", "reservations/cancel"): lambda w, who: {"reservation_id": w.reservation_id},
    ("PATCH", "budgets/<int:budget_id>"): lambda w, who: {"name": "renamed"},
    ("POST", "guard"): lambda w, who: {"agent": "triage", "model": "gpt-4o", "prompt": "hi"},
    ("POST", "budgets/<int:budget_id>/overrides"): lambda w, who: {
        "extra_cost": "5",
        "reason": "more traffic",
        "expires_at": _LATER,
    },
    ("POST", "overrides/<int:override_id>/approve"): lambda w, who: {"reason": "fine"},
    ("POST", "agent-profiles"): lambda w, who: {
        "name": f"agent-{who}",
        "model": "gpt-4o",
        "token_budget": 1_000,
    },
    ("PATCH", "agent-profiles/<int:profile_id>"): lambda w, who: {"token_budget": 5_000},
    ("POST", "overrides/<int:override_id>/reject"): lambda w, who: {"reason": "no"},
    ("POST", "pricing/reprice"): lambda w, who: {
        "since": (timezone.now() - timedelta(days=1)).isoformat(),
        "until": timezone.now().isoformat(),
    },
    # A GET's "body" is its query: the stored rows of every scope, all statuses.
    ("GET", "recommendations"): lambda w, who: _recommendations_query(),
    ("POST", "recommendations/<int:rec_id>/dismiss"): lambda w, who: {"note": f"by {who}"},
    ("POST", "recommendations/<int:rec_id>/accept"): lambda w, who: {"note": f"by {who}"},
    ("POST", "relationships"): lambda w, who: {
        "from_request_id": "m-2",
        "to_request_id": "m-1",
        "type": "follow_up_of",
    },
    ("POST", "reconciliations"): lambda w, who: {"provider": "openai", "content": _bill_csv()},
}
QUERIES = {
    ("GET", "usage/summary"): "?group_by=team_id,project_id",
    ("GET", "reports/<str:kind>"): "?group_by=team_id,project_id",
    # A week with nothing before it would be "not enough history" (400) for any caller.
    ("GET", "anomalies"): "?since=2020-01-01T00:00:00Z&until=2020-01-08T00:00:00Z",
}


def _bill_csv() -> str:
    """An OpenAI cost export (reporting.reconcile) of today's gpt-4o-mini usage."""
    start = int(timezone.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    return (
        "start_time,end_time,amount_value,amount_currency,line_item,project_id\n"
        f'{start},{start + 86400},0.01,usd,"gpt-4o-mini-2024-07-18, input",\n'
    )


def _recommendations() -> dict[str, int]:
    """A stored recommendation per scope (made on first use; the member's open, to be decided),
    which a list with status=all shows though nothing computes it: scope -> id."""
    from reporting.models import Recommendation

    out = {}
    for team, project in (("search", "ranker"), ("ads", "bidder"), ("search", "")):
        row, _ = Recommendation.objects.get_or_create(
            key=f"caching|model|openai/gpt-4o|{team}|{project}",
            defaults={
                "kind": "caching",
                "dimension": "model",
                "target": "openai/gpt-4o",
                "team_id": team,
                "project_id": project,
                "status": Recommendation.Status.DISMISSED if project != "ranker" else "open",
            },
        )
        out[f"{team}/{project}"] = row.pk
    return out


def _recommendations_query() -> dict[str, str]:
    _recommendations()
    return {"status": "all"}


def _bill_id() -> int:
    """An imported provider bill (made on first use: every path is filled in for every cell)."""
    from reporting.models import BillImport

    bill = BillImport.objects.order_by("pk").first()
    if bill is None:
        today = timezone.now().date()
        bill = BillImport.objects.create(
            provider="openai",
            source_format="openai_costs_csv",
            sha256="0" * 64,
            first_day=today,
            last_day=today,
            rows=0,
            billed=Decimal(0),
            ledger=Decimal(0),
            tolerance_pct=Decimal("0.5"),
        )
    return bill.pk


def _path(route: str, world: World) -> str:
    path = route if route.startswith("api/") else f"api/v1/{route}"
    for name, value in _ID.items():
        path = path.replace(f"<{name}>", str(value(world)))
    return "/" + path


# --- the endpoint list, from the URLconf ---------------------------------------------------------


def _rest_endpoints() -> set[tuple[str, str]]:
    """(method, route) of every API view in the URLconf (routes under api/v1/ without that
    prefix). The admin and the root redirect are Django's own pages, not API endpoints."""
    found: set[tuple[str, str]] = set()

    def walk(patterns: list[Any], prefix: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                if not route.startswith("admin/"):
                    walk(p.url_patterns, route)
            elif isinstance(p, URLPattern) and route.startswith("api/"):
                view = p.callback.view_class  # type: ignore[attr-defined]
                for method in ("get", "post", "put", "patch", "delete"):
                    if hasattr(view, method):
                        found.add((method.upper(), route.removeprefix("api/v1/")))

    walk(get_resolver().url_patterns, "")
    return found


def _live_pages() -> set[str]:
    """Every route of the staff pages mounted before the admin (admin/live/, admin/provenance/,
    admin/reports/)."""
    found: set[str] = set()
    mounts = ("admin/live/", "admin/provenance/", "admin/reports/")
    for p in get_resolver().url_patterns:
        if isinstance(p, URLResolver) and str(p.pattern) in mounts:
            found |= {f"{p.pattern}{q.pattern}" for q in p.url_patterns}
    return found


def test_it_has_a_row_for_every_endpoint() -> None:
    assert set(MATRIX) == _rest_endpoints()
    assert set(PAGE_MATRIX) == _live_pages()
    assert set(WS_MATRIX) == {str(p.pattern) for p in websocket_urlpatterns}
    assert all(len(cells) == len(PERSONAS) for cells in [*MATRIX.values(), *WS_MATRIX.values()])


# --- the cells ----------------------------------------------------------------------------------


def _cells() -> Iterator[Any]:
    for (method, route), statuses in MATRIX.items():
        for who, status in zip(PERSONAS, statuses, strict=True):
            yield pytest.param(Cell(method, route, who, status), id=f"{method} {route} {who}")


@pytest.mark.parametrize("cell", list(_cells()))
def test_it_answers_each_caller_as_the_matrix_says(
    request: pytest.FixtureRequest, world: World, cell: Cell
) -> None:
    method, route, who, status = cell.method, cell.route, cell.who, cell.status
    persona = _persona(request, who)
    body = BODIES.get((method, route), lambda w, who: None)(world, who)
    path = _path(route, world) + QUERIES.get((method, route), "")
    call = getattr(persona.client, method.lower())
    response = call(path, body, format="json") if body is not None else call(path)

    assert response.status_code == status, getattr(response, "data", response)
    if status >= 400:
        assert set(response.json()["error"]) == {"code", "message", "fields"}
    if status < 300 and who in SCOPE and (method, route) in SCOPED_READS:
        rows = SCOPED_READS[(method, route)](response.json())
        team, project = SCOPE[who]
        assert rows, "the caller's own rows are missing"
        assert all((not team or t == team) and (not project or p == project) for t, p in rows)


def test_staff_are_refused_with_the_permission_they_lack(staff_noperm: Persona) -> None:
    response = staff_noperm.client.get("/api/v1/usage")
    assert response.status_code == 403
    assert response.json()["error"]["fields"] == {"permission": ["usage.view_tokenusage"]}
    assert "usage.view_tokenusage" in response.json()["error"]["message"]


# --- never another scope's rows -------------------------------------------------------------------


def _team_project(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["team_id"], r["project_id"]) for r in rows]


# Reads that return rows: (method, route) → the (team_id, project_id) of each returned row.
SCOPED_READS: dict[tuple[str, str], Callable[[Any], list[tuple[str, str]]]] = {
    ("GET", "usage"): lambda body: _team_project(body["results"]),
    ("GET", "usage/summary"): lambda body: _team_project(body["rows"]),
    ("GET", "reports/<str:kind>"): lambda body: (
        _team_project(body["rows"]) + _team_project(body["budgets"])
    ),
    ("GET", "forecast"): lambda body: _team_project(body["budgets"]),
    ("GET", "recommendations"): lambda body: _team_project(body["results"]),
    ("POST", "signals"): lambda body: _team_project(body["result"]["results"]),
    ("GET", "budgets"): lambda body: _team_project(body["results"]),
    ("GET", "budgets/<int:budget_id>"): lambda body: _team_project([body]),
    ("GET", "alerts"): lambda body: _team_project(body["results"]),
    ("GET", "budgets/<int:budget_id>/overrides"): lambda body: [
        ("search", "ranker")
        for _ in body["results"]  # the budget's; 404 for other scopes
    ],
}


@pytest.mark.django_db(transaction=True)  # the consumer reads the database from its own thread
@pytest.mark.parametrize("who", PERSONAS)
def test_it_lets_only_the_matrixs_callers_join_live_status_and_shows_them_their_scope_only(
    request: pytest.FixtureRequest, world: World, who: str
) -> None:
    persona = _persona(request, who)
    may_join = dict(zip(PERSONAS, WS_MATRIX[str(websocket_urlpatterns[0].pattern)], strict=True))
    headers = [(b"authorization", f"Bearer {persona.raw_key}".encode())] if persona.raw_key else []

    async def scenario() -> tuple[bool, list[tuple[str, str]]]:
        from reporting.broadcaster import StatusBroadcaster

        client = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns), f"/ws/status/{world.conversation_id}/", headers
        )
        if getattr(persona, "user", None) is not None or who == "admin":
            client.scope["user"] = await database_sync_to_async(_user_of)(persona, who)
        connected, _code = await client.connect()
        if not connected:
            return False, []
        for team, project in (("search", "ranker"), ("ads", "bidder"), ("", "")):
            await database_sync_to_async(status_publish)(
                conversation_id=world.conversation_id,
                category="info",
                message=f"{team}/{project}",
                team_id=team,
                project_id=project,
            )
        broadcaster = StatusBroadcaster()
        while await broadcaster.tick(flush_all=True):
            pass
        seen = []
        while not await client.receive_nothing(timeout=1.0):
            batch = await client.receive_json_from()
            seen.extend((batch["team_id"], batch["project_id"]) for _ in batch["messages"])
        await client.disconnect()
        return True, seen

    joined, seen = async_to_sync(scenario)()

    assert joined == bool(may_join[who])
    if joined:
        team, project = SCOPE.get(who, ("", ""))
        expected = {
            s
            for s in (("search", "ranker"), ("ads", "bidder"), ("", ""))
            if (not team or s[0] == team) and (not project or s[1] == project)
        }
        assert set(seen) == expected


def _page_cells() -> Iterator[Any]:
    for route, statuses in PAGE_MATRIX.items():
        for who, status in zip(PERSONAS, statuses, strict=True):
            yield pytest.param(route, who, status, id=f"{route} {who}")


@pytest.mark.parametrize(("route", "who", "status"), list(_page_cells()))
def test_it_shows_the_live_pages_only_to_the_matrixs_callers(
    request: pytest.FixtureRequest, world: World, route: str, who: str, status: int
) -> None:
    persona = _persona(request, who)
    path = "/" + route.replace("<path:conversation_id>", world.conversation_id)
    path = path.replace("<path:workflow_id>", "wf-ranker")
    path = path.replace("<int:pk>", str(TokenUsage.objects.get(request_id="m-1").pk))
    response = persona.client.get(path)
    assert response.status_code == status
    if status == 302:
        assert response["Location"].startswith("/admin/login/")


@pytest.mark.django_db(transaction=True)  # the consumer reads the database from its own thread
@pytest.mark.parametrize("who", PERSONAS)
def test_it_lets_only_the_matrixs_callers_open_the_dashboard_stream(
    request: pytest.FixtureRequest, who: str
) -> None:
    persona = _persona(request, who)
    may_join = dict(zip(PERSONAS, WS_MATRIX["^ws/dashboard/$"], strict=True))
    headers = [(b"authorization", f"Bearer {persona.raw_key}".encode())] if persona.raw_key else []

    async def scenario() -> bool:
        client = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/dashboard/", headers)
        if getattr(persona, "user", None) is not None:
            client.scope["user"] = persona.user  # type: ignore[attr-defined]
        connected, _code = await client.connect()
        if connected:
            await client.disconnect()
        return bool(connected)

    assert async_to_sync(scenario)() == bool(may_join[who])


def _user_of(persona: Persona, who: str) -> Any:
    from django.contrib.auth import get_user_model

    user = getattr(persona, "user", None)
    return user if user is not None else get_user_model().objects.get(username=who)


def test_it_declares_only_permissions_that_exist() -> None:
    from django.contrib.auth.models import Permission

    from tokenmgr_project.core.actions import REGISTRY

    known = {
        f"{app}.{codename}"
        for app, codename in Permission.objects.values_list("content_type__app_label", "codename")
    }
    declared = {perm for entry in REGISTRY.values() for perm in entry.staff_perms}
    assert declared <= known
