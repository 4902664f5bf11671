"""The admin in a real browser at 1366 x 768, a common laptop screen: no list is wider than its
place beside the navigation and the filters, so no column (Status, Unpriced, …) is cut off; the
lineage and workflow pages fit too (a wide tree scrolls inside its own frame), and so does the
Reports page (its tables scroll inside their own boxes).

Needs Debian's chromium (/usr/bin/chromium, or TOKENMGR_CHROMIUM) and python playwright
(requirements-dev.txt). Where either is missing the test is skipped, except with CI=true, where
that is a failure: CI must look at the pages.
"""

from __future__ import annotations

import os
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib import admin as django_admin
from django.urls import reverse
from django.utils import timezone

from budgets.models import AgentProfile, AlertChannel, Budget, BudgetAlert, Reservation
from budgets.overrides import override_request
from budgets.services import budget_create
from reporting.models import Anomaly, BillImport, BillLine, Recommendation
from tests.conftest import Persona, event, settle
from tokenmgr_project.core.principal import Principal
from usage import services
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)

VIEWPORT = {"width": 1366, "height": 768}
PASSWORD = "pw-browser-123"
# Set to a directory to keep a screenshot of every page (to look at them).
SCREENSHOTS = os.environ.get("TOKENMGR_ADMIN_SCREENSHOTS", "")
# The widest thing on each page: the page itself, and the list's scrolling box (.results).
OVERFLOW = """() => {
  const page = document.documentElement;
  const results = document.querySelector('.results');
  return {
    page: [page.scrollWidth, page.clientWidth],
    results: results ? [results.scrollWidth, results.clientWidth] : null,
  };
}"""


def _long(word: str, length: int) -> str:
    return (word * length)[:length]


def _seed_long_values(platform: Persona, user: Any) -> None:
    """Rows with the longest values the API accepts where a list column would grow."""
    events = [
        event(_long("req_9f86d081884c7d65", 128), status="error", error_type="rate_limit"),
        event("short-id", model=_long("my_fine_tuned_model_", 128), agent=_long("agent_", 128)),
    ]
    response = platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert [item["status"] for item in response.json()["results"]] == ["created", "created"]
    settle()
    budget = budget_create(
        principal=None,
        name="Search platform: ranking, retrieval and reindexing for every region " * 2,
        scope="project",
        scope_id=_long("ranker_", 128),
        team_id=_long("search_", 128),
        project_id=_long("ranker_", 128),
        cost_limit=Decimal("1234567.891234"),
    )
    override_request(
        budget=budget,
        extra_cost=Decimal("250.5"),
        extra_tokens=10_000_000,
        unlimited=False,
        reason="Quarter-end reindex of the whole corpus in every region needs headroom " * 5,
        expires_at=timezone.now() + timedelta(days=7),
        principal=Principal.for_staff(user),
    )
    Reservation.objects.create(
        reservation_id=_long("rsv_0123456789abcdef", 64),
        cost=Decimal("0.0019500000"),
        tokens=7000,
        team_id=_long("search_", 128),
        project_id=_long("ranker_", 128),
        expires_at=timezone.now(),
    )
    BudgetAlert.objects.create(
        budget=budget,
        period_start=budget.window_at(timezone.now()).start,
        kind=BudgetAlert.Kind.THRESHOLD,
        metric=BudgetAlert.Metric.COST,
        threshold=Decimal(80),
        spent=Decimal("987654.3210000000"),
        limit=Decimal("1234567.891234"),
        percent=Decimal("80.00"),
        message="Search platform passed 80 % of its cost limit " * 8,
    )
    services.api_key_create(
        name="ranker service in production, every region " * 2,
        scope="project",
        team_id=_long("search_", 128),
        project_id=_long("ranker_", 128),
    )
    services.model_price_set(
        provider="openai",
        model=_long("gpt_4o_mini_2024_07_18_", 128),
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.6"),
        note="negotiated for the whole organisation, renewed every year " * 3,
    )
    AgentProfile.objects.create(
        name=_long("research_agent_", 128), model=_long("claude_sonnet_", 128), token_budget=10**9
    )
    AlertChannel.objects.create(
        kind=AlertChannel.Kind.WEBHOOK,
        target="https://hooks.example.com/" + _long("0123456789abcdef", 400),
        secret="s3cret",
    )
    # The analytics lists (issue 13).
    long_team, long_project = _long("search_", 128), _long("ranker_", 128)
    Recommendation.objects.create(
        key=_long("cheaper_model|model|", 400),
        kind="cheaper_model",
        dimension="model",
        target=_long("openai/gpt_4o_2024_08_06_", 300),
        team_id=long_team,
        project_id=long_project,
        monthly_savings=Decimal("123456789.12"),
        evidence={"requests": 10**9},
    )
    Anomaly.objects.create(
        dimension="project_id",
        series=long_project,
        team_id=long_team,
        project_id=long_project,
        granularity="hour",
        metric="cost",
        bucket=timezone.now().replace(minute=0, second=0, microsecond=0),
        value=10**18,
        expected=10**17,
        lower=0,
        upper=2 * 10**17,
        score=Decimal("9999999999.99"),
    )
    today = timezone.now().date()
    bill = BillImport.objects.create(
        provider="anthropic",
        source_format="anthropic_cost_report_json",
        filename=_long("anthropic-cost-report-", 255),
        sha256="0" * 64,
        first_day=today,
        last_day=today,
        rows=10**6,
        billed=Decimal("123456789.0123456789"),
        ledger=Decimal("123456789.0123456789"),
        tolerance_pct=Decimal("0.5"),
    )
    BillLine.objects.create(
        bill=bill,
        day=today,
        model=_long("claude_sonnet_", 128),
        project_id=long_project,
        billed=Decimal("123456789.0123456789"),
        ledger=Decimal(0),
        difference=Decimal("-123456789.0123456789"),
        status="missing_in_ledger",
        flagged=True,
    )
    assert Budget.objects.exists()


def _seed_lineage(platform: Persona) -> list[str]:
    """A wide tree of long ids in one long-named workflow: the provenance pages of it."""
    flow = _long("support_ticket_", 128)
    root = _long("question_", 128)
    events = [event(root, agent=_long("router_", 128), workflow_id=flow)] + [
        event(
            f"{i}-" + _long("step_", 120),
            workflow_id=flow,
            provenance={"parent_request_id": root, "workflow_step": _long("retrieve_", 128)},
        )
        for i in range(40)
    ]
    response = platform.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert {item["status"] for item in response.json()["results"]} == {"created"}
    settle()
    pk = TokenUsage.objects.get(request_id=root).pk
    return [
        reverse("lineage_pages:lineage", args=[pk]),
        reverse("lineage_pages:workflows"),
        reverse("lineage_pages:workflow", args=[flow]),
    ]


def _pages() -> list[str]:
    lists = [
        reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for model in django_admin.site._registry
    ]
    return [*sorted(lists), reverse("admin:usage_modelprice_catalogue")]


def test_it_keeps_every_admin_list_within_a_1366_px_screen(
    chromium: str,
    live_server: Any,
    platform: Persona,
    django_user_model: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    user = django_user_model.objects.create_superuser("browser", "b@example.com", PASSWORD)
    _seed_long_values(platform, user)
    # The Reports page in a named zone: without one it reloads itself in the browser's.
    reports = reverse("reports_pages:reports") + "?tz=UTC"
    analytics = [
        reverse(f"admin:reporting_{model._meta.model_name}_change", args=[model.objects.get().pk])
        for model in (Recommendation, Anomaly, BillImport)
    ]
    pages = [*_pages(), *_seed_lineage(platform), reports, *analytics]
    too_wide: dict[str, Any] = {}
    # No database work from here on: the ORM refuses to run beside Playwright's event loop.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "browser")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url(f"{live_server.url}/admin/")
        for path in pages:
            response = page.goto(live_server.url + path)
            assert response is not None, path
            assert response.ok, path
            widths = page.evaluate(OVERFLOW)
            boxes = [widths["page"], *([widths["results"]] if widths["results"] else [])]
            shot = Path(SCREENSHOTS or tmp_path) / (path.strip("/").replace("/", "_") + ".png")
            if SCREENSHOTS:
                page.screenshot(path=str(shot), full_page=True)
            if any(scroll > visible for scroll, visible in boxes):
                page.screenshot(path=str(shot), full_page=True)
                too_wide[path] = {**widths, "screenshot": str(shot)}
        browser.close()
    assert len(pages) > 10
    assert too_wide == {}
