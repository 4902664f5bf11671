"""The admin's Reports page (issue 12): the reports' figures as tables and charts, who may see
which sections, the API's message for a bad parameter, every export linked with the page's
parameters; and in a real browser (Debian's chromium through Playwright) at 1366 x 768: charts
drawn, no horizontal scroll, a screenshot in the run's artifacts (tests.conftest.ARTIFACTS)."""

from __future__ import annotations

import html as html_lib
import json
import re
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from budgets.services import budget_create
from tests.conftest import ARTIFACTS, Persona, StaffSession, _staff_persona, event, settle
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

PAGE = "/admin/reports/"
TODAY = timezone.now().date()  # UTC: the tests' dates are UTC days unless they say otherwise
VIEWPORT = {"width": 1366, "height": 768}
PASSWORD = "pw-reports-page-1"


@pytest.fixture
def usage_viewer(db: None, django_user_model: Any) -> StaffSession:
    """Staff who may view usage but not budgets: the cost report is not theirs."""
    return _staff_persona(django_user_model, "usage_viewer", ("usage.view_tokenusage",))


def _post(persona: Persona, events: list[dict[str, Any]]) -> None:
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert [r["status"] for r in response.json()["results"]] == ["created"] * len(events)
    settle()


def _at(day: date, hour: int, minute: int = 0) -> str:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC).isoformat()


def _known(persona: Persona) -> None:
    """Three days of two teams on two priced models."""
    events = []
    for i in range(3):
        day = TODAY - timedelta(days=i + 1)
        events += [
            event(f"s{i}", team_id="search", model="gpt-4o", occurred_at=_at(day, 10)),
            event(f"a{i}", team_id="ads", input_tokens=2000, occurred_at=_at(day, 11)),
        ]
    # And two today at 00:00 UTC (already past, and today in Berlin too, whenever the test
    # runs): an error, and a model the catalogue has no price for.
    events.append(event("e1", team_id="ads", status="error", occurred_at=_at(TODAY, 0)))
    events.append(event("u1", team_id="ads", model="mystery-model", occurred_at=_at(TODAY, 0)))
    _post(persona, events)


def _range(**params: Any) -> dict[str, Any]:
    days = {"since": (TODAY - timedelta(days=3)).isoformat(), "until": TODAY.isoformat()}
    return {**days, "tz": "UTC", **params}


def _page(persona: Persona, status: int = 200, **params: Any) -> str:
    response = persona.client.get(PAGE, _range(**params))
    assert response.status_code == status, response.content[:2000]
    return response.content.decode()


def _card(html: str, card: str) -> str:
    found = re.search(rf'id="tm-total-{card}".*?class="tm-value">([^<]*)<', html, re.S)
    assert found, f"no {card} card"
    return found[1]


def _charts(html: str) -> Any:
    found = re.search(r'<script id="tm-report-charts" type="application/json">(.*?)</script>', html)
    assert found, "no chart figures in the page"
    return json.loads(found[1])


def _links(html: str) -> list[str]:
    box = re.search(r'id="tm-downloads">(.*?)</div>', html, re.S)
    assert box, "no download links"
    return [html_lib.unescape(href) for href in re.findall(r'href="([^"]+)"', box[1])]


def _cost(**filters: Any) -> Decimal:
    return Decimal(str(TokenUsage.objects.filter(**filters).aggregate(c=Sum("cost"))["c"] or 0))


def test_it_shows_the_totals_of_the_ledger_with_unpriced_usage_apart(
    admin: Persona, platform: Persona
) -> None:
    _known(platform)
    html = _page(admin)
    assert Decimal(_card(html, "cost").replace(",", "")) == _cost() > 0
    assert _card(html, "requests") == "8"
    assert _card(html, "tokens") == f"{3 * 120 + 3 * 2020 + 2 * 120:,}"
    assert _card(html, "unpriced") == "1"
    assert _card(html, "errors") == "12.50 %"
    assert 'id="tm-report-source">rollups<' in html
    charts = _charts(html)
    assert charts["top"]["labels"] == ["search", "ads"]  # gpt-4o costs more than -mini
    assert [Decimal(c) for c in charts["top"]["cost"]] == [
        _cost(team_id="search"),
        _cost(team_id="ads"),
    ]
    assert "mystery-model" in html  # in the unpriced table


def test_the_stacked_chart_has_a_bar_per_day_and_a_segment_per_team(
    admin: Persona, platform: Persona
) -> None:
    _known(platform)
    series = _charts(_page(admin, interval="day"))["series"]
    assert len(series["labels"]) == 4  # every day of the range
    by_team = {d["label"]: [Decimal(v) for v in d["data"]] for d in series["datasets"]}
    assert set(by_team) == {"search", "ads"}
    assert sum(by_team["search"]) == _cost(team_id="search")
    assert sum(by_team["ads"]) == _cost(team_id="ads")
    assert by_team["search"][0] == _cost(request_id="s2")  # three days ago
    assert by_team["search"][3] == 0  # today: ads only


def test_it_counts_days_in_the_chosen_time_zone(admin: Persona, platform: Persona) -> None:
    day = TODAY - timedelta(days=5)
    # 23:30 UTC the evening before: already `day` in Berlin (UTC+1 or +2).
    _post(platform, [event("late", occurred_at=_at(day - timedelta(days=1), 23, 30))])
    one_day = {"since": day.isoformat(), "until": day.isoformat()}
    assert _card(_page(admin, **one_day, tz="Europe/Berlin"), "requests") == "1"
    assert _card(_page(admin, **one_day, tz="UTC"), "requests") == "0"


def test_the_download_links_are_every_export_with_the_page_parameters(
    admin: Persona, platform: Persona
) -> None:
    _known(platform)
    html = _page(admin, tz="Europe/Berlin", group_by="model", interval="week", team_id="ads")
    links = _links(html)
    assert sorted(urlsplit(u).path for u in links) == sorted(
        f"/api/v1/reports/{kind}" for kind in ("usage", "cost", "optimization") for _ in range(3)
    )
    since = datetime.combine(TODAY - timedelta(days=3), time(0))
    for url in links:
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert query["group_by"] == "model"
        assert (query["interval"], query["tz"], query["team_id"]) == (
            "week",
            "Europe/Berlin",
            "ads",
        )
        assert datetime.fromisoformat(query["since"]).replace(tzinfo=None) == since
        assert query["since"].endswith(("+01:00", "+02:00"))  # midnight in Berlin
        assert query["format"] in ("json", "csv", "md")
        response = admin.client.get(url)
        assert response.status_code == 200, url
    usage = next(u for u in links if "/usage" in u and "format=json" in u)
    assert Decimal(admin.client.get(usage).json()["totals"]["cost"]) == _cost(team_id="ads")
    assert Decimal(_card(html, "cost").replace(",", "")) == _cost(team_id="ads")


def test_a_bad_range_shows_the_api_field_message(admin: Persona) -> None:
    inverted = _page(admin, 400, since=TODAY.isoformat(), until=(TODAY - timedelta(1)).isoformat())
    assert "Invalid time range." in inverted
    assert "<strong>until</strong>: Must be after since." in inverted
    years = _page(admin, 400, since="2020-01-01", until="2024-01-01", interval="hour")
    assert "<strong>interval</strong>: The range holds more than 10,000 hour buckets" in years
    assert "<strong>tz</strong>: Use an IANA time zone" in _page(admin, 400, tz="Mars/Olympus")
    assert "<strong>until</strong>: Out of range" in _page(admin, 400, until="9999-12-31")
    assert 'name="since" value="2020-01-01"' in years  # the form keeps what was asked


def test_it_escapes_what_the_ledger_holds_and_says_when_a_range_is_empty(
    admin: Persona, platform: Persona
) -> None:
    hostile = '<script>alert("x")</script>'
    _post(platform, [event("h1", team_id=hostile, occurred_at=_at(TODAY - timedelta(1), 9))])
    html = _page(admin)
    assert hostile not in html
    assert _charts(html)["top"]["labels"] == [hostile]  # as text, inside escaped JSON
    empty = _page(admin, since="2020-01-01", until="2020-01-02")
    assert "No priced usage in this range." in empty
    assert 'id="tm-chart-top"' not in empty
    assert _card(empty, "requests") == "0"


def test_it_refuses_staff_without_the_usage_permission(
    staff_noperm: StaffSession, client: Any
) -> None:
    assert staff_noperm.client.get(PAGE).status_code == 403
    anonymous = client.get(PAGE)
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))


def test_the_cost_sections_need_the_budget_permission(
    usage_viewer: StaffSession, platform: Persona
) -> None:
    _known(platform)
    html = _page(usage_viewer)
    assert 'id="tm-cost-hidden"' in html
    assert "budgets.view_budget" in html
    assert 'id="tm-chart-series"' not in html
    assert 'id="tm-budget-table"' not in html
    assert "series" not in _charts(html)
    assert not [u for u in _links(html) if "/reports/cost" in u]
    assert Decimal(_card(html, "cost").replace(",", "")) == _cost()  # usage is still theirs


def test_the_admin_links_to_the_reports_page(admin: Persona, staff_noperm: StaffSession) -> None:
    index = admin.client.get(reverse("admin:index")).content.decode()
    assert f'href="{PAGE}"' in index
    assert 'id="reports-module"' in index
    hidden = staff_noperm.client.get(reverse("admin:index")).content.decode()
    assert f'href="{PAGE}"' not in hidden


# --- in a real browser ---------------------------------------------------------------------------


def _seed_for_browser(platform: Persona) -> None:
    teams = ["search", "ads", "growth", "infra_" * 20]  # one 120-character id
    models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "mystery-model"]
    events = [
        event(
            f"b{i}",
            team_id=teams[(i // 2) % 4],  # each team on two models
            project_id=f"p{i % 3}",
            model=models[i % 4],
            provider="anthropic" if i % 4 == 2 else "openai",
            input_tokens=1000 + 37 * i,
            output_tokens=200 + i,
            occurred_at=(timezone.now() - timedelta(hours=4 * i + 1)).isoformat(),
        )
        for i in range(120)
    ]
    _post(platform, events)
    budget_create(
        principal=None, name="Whole company", scope="global", scope_id="", cost_limit=Decimal(1)
    )


@pytest.mark.django_db(transaction=True)
def test_it_draws_the_charts_within_a_1366_px_screen(
    chromium: str, live_server: Any, platform: Persona, django_user_model: Any
) -> None:
    from playwright.sync_api import sync_playwright

    django_user_model.objects.create_superuser("reports", "r@example.com", PASSWORD)
    _seed_for_browser(platform)
    # No database work from here on: the ORM refuses to run beside Playwright's event loop.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport=VIEWPORT, timezone_id="Europe/Berlin")
            page = context.new_page()
            page.goto(f"{live_server.url}/admin/login/?next={PAGE}")
            page.fill("#id_username", "reports")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            # The first visit names no zone: the page reloads itself in the browser's.
            page.wait_for_url(re.compile(r"tz=Europe%2FBerlin"))
            page.wait_for_selector("body[data-report-charts='3']")
            folder = ARTIFACTS / "reports"
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / f"reports-{connection.vendor}.png"), full_page=True)
            assert page.input_value("select[name=tz]") == "Europe/Berlin"
            drawn = page.evaluate(
                """() => ['tm-chart-series', 'tm-chart-top', 'tm-chart-mix'].map((id) => {
                  const canvas = document.getElementById(id);
                  const chart = Chart.getChart(canvas);
                  const pixels = canvas.getContext('2d')
                    .getImageData(0, 0, canvas.width, canvas.height).data;
                  let painted = 0;
                  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
                  return {id, type: chart && chart.config.type, painted,
                          datasets: chart ? chart.data.datasets.length : 0,
                          size: [canvas.clientWidth, canvas.clientHeight]};
                })"""
            )
            for chart in drawn:
                assert chart["type"] in ("bar", "doughnut"), chart
                assert chart["datasets"] >= 1, chart
                assert chart["size"][0] > 200, chart
                assert chart["size"][1] > 150, chart
                assert chart["painted"] > 1000, chart
            assert drawn[0]["datasets"] == 4  # a stack segment per team
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1] <= VIEWPORT["width"], widths
        finally:
            browser.close()
