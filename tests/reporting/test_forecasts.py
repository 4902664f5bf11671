"""GET /api/v1/forecast and `manage.py token backtest` (issue 13): projections per budget and per
dimension on seeded data whose outcome is known, their intervals, insufficient history, a named
400 for every bad parameter, scopes, the backtest's error figures computed here from the data,
and the live dashboard showing each budget's exhaustion date in a real browser."""

from __future__ import annotations

import io
import json
import random
import statistics
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from budgets.services import budget_create
from reporting.apis import ForecastOut
from reporting.forecasts import forecast_usage
from tests.conftest import ARTIFACTS, Persona, event, settle
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import GLOBAL, Principal

pytestmark = pytest.mark.django_db

ORGANISATION = Principal(scope=GLOBAL)
# One request: gpt-4o, 40,000 input and 10,000 output tokens (0.1 + 0.1 USD).
COST = Decimal("0.2")


def _post(persona: Persona, events: list[dict[str, Any]], cost: Decimal | None = COST) -> None:
    for start in range(0, len(events), 1000):
        part = events[start : start + 1000]
        response = persona.client.post("/api/v1/usage/batch", {"events": part}, format="json")
        assert [r["status"] for r in response.json()["results"]] == ["created"] * len(part)
        if cost is not None:
            assert {Decimal(r["cost"]) for r in response.json()["results"]} == {cost}
    settle()


def _requests(day: date, count: int, tag: str, **fields: Any) -> list[dict[str, Any]]:
    """`count` requests on `day` (COST each unless `fields` say otherwise), spread over its
    hours (UTC)."""
    values = {"model": "gpt-4o", "input_tokens": 40_000, "output_tokens": 10_000, **fields}
    return [
        event(
            f"{tag}-{day:%Y%m%d}-{i}",
            occurred_at=datetime.combine(day, time((i * 5) % 24), tzinfo=UTC).isoformat(),
            **values,
        )
        for i in range(count)
    ]


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _units(text: str) -> Decimal:
    return Decimal(text)


def _series(body: dict[str, Any], name: str = "team_id") -> dict[str, dict[str, Any]]:
    return {row[name]: row for row in body["series"]}


# --- projections on data with a known outcome -------------------------------------------------


def test_steady_usage_is_projected_exactly(platform: Persona) -> None:
    _post(
        platform,
        [
            r
            for d in _days(date(2025, 2, 1), date(2025, 3, 14))
            for r in _requests(d, 1, "s", team_id="search")
        ],
    )
    now = datetime(2025, 3, 15, tzinfo=UTC)
    until = datetime(2025, 3, 20, 12, tzinfo=UTC)
    body = forecast_usage(ORGANISATION, {"dimension": "team", "until": until.isoformat()}, now=now)
    search = _series(body)["search"]
    assert _units(search["month_to_date"]) == 14 * COST
    month_end = {k: _units(v) for k, v in search["projected_month_end"].items()}
    assert month_end == {"cost": 31 * COST, "low": 31 * COST, "high": 31 * COST}  # no noise
    assert _units(search["projected_until"]["cost"]) == Decimal("5.5") * COST
    assert _units(search["expected_today"]) == COST
    assert search["weekday_factors"] is True
    assert search["insufficient_history"] is None
    assert body["source"] == "rollups"


def test_the_80_percent_intervals_hold_what_was_then_spent(platform: Persona) -> None:
    """Weekly seasonality and seeded noise (one request a day whose prompt size varies); the
    month-end forecast made at noon of each of March's first 20 days, against what March then
    spent in all: the intervals hold most of the truths, and are not wide for it."""
    rng = random.Random(13)
    events = []
    weekday = {"search": [10, 10, 11, 12, 9, 3, 2], "ads": [4, 4, 5, 5, 4, 4, 4]}
    spent: dict[tuple[str, date], Decimal] = {}
    for team, sizes in weekday.items():
        for day in _days(date(2025, 1, 1), date(2025, 3, 31)):
            prompt = round(100_000 * sizes[day.weekday()] * rng.gauss(1, 0.1))
            [request] = _requests(day, 1, team, team_id=team, input_tokens=prompt, output_tokens=0)
            events.append(request)
            spent[team, day] = Decimal(prompt) * Decimal("2.5") / 10**6  # gpt-4o: 2.5 USD/Mtok
    _post(platform, events, cost=None)
    held, widths = 0, []
    for origin in _days(date(2025, 3, 1), date(2025, 3, 20)):
        now = datetime.combine(origin, time(12), tzinfo=UTC)
        rows = _series(forecast_usage(ORGANISATION, {"dimension": "team_id"}, now=now))
        for team in weekday:
            projected = {k: _units(v) for k, v in rows[team]["projected_month_end"].items()}
            truth = sum(v for (t, d), v in spent.items() if t == team and d.month == 3)
            assert projected["low"] < projected["cost"] < projected["high"]
            widths.append((projected["high"] - projected["low"]) / truth)
            held += projected["low"] <= truth <= projected["high"]
    assert len(widths) == 40
    assert held >= 0.7 * len(widths), held  # nominal 80 %
    assert sum(widths) / len(widths) < Decimal("0.15"), widths  # informative: ±7.5 % on average


def test_budgets_are_projected_to_their_period_end_and_the_month_end(platform: Persona) -> None:
    _post(
        platform,
        [
            r
            for d in _days(date(2025, 2, 1), date(2025, 3, 14))
            for r in _requests(d, 1, "s", team_id="search")
        ],
    )
    common: dict[str, Any] = {"scope": "team", "scope_id": "search", "team_id": "search"}
    weekly = budget_create(
        principal=None, name="week", period="weekly", cost_limit=Decimal(5), **common
    )
    monthly = budget_create(principal=None, name="month", cost_limit=COST * 20, **common)
    now = datetime(2025, 3, 15, tzinfo=UTC)  # a Saturday
    body = forecast_usage(ORGANISATION, {}, now=now)
    items = {b["budget_id"]: b for b in body["budgets"]}
    week, month = items[weekly.pk], items[monthly.pk]
    # Monday the 10th to Monday the 17th: 5 days spent, 2 to come.
    assert _units(week["cost_spent"]) == 5 * COST
    assert _units(week["projected_period_end"]["cost"]) == 7 * COST
    assert _units(week["projected_month_end"]["cost"]) == 31 * COST
    assert _units(month["projected_period_end"]["cost"]) == 31 * COST
    # Its exhaustion date is the status's: 6 days' worth left at the last 7 days' rate.
    assert month["exhausts_at"] == "2025-03-21T00:00:00+00:00"
    assert month["burn_window"]["label"] == "the last 7 days' rate"
    assert week["burn_window"]["whole_period"] is True
    assert week["exhausts_in_period"] is False  # 5 USD: far above a week's 1.4


# --- the endpoint: history, scopes, bad input ----------------------------------------------------


def _recent(persona: Persona, days: int, tag: str, **fields: Any) -> None:
    today = timezone.now().date()
    _post(
        persona,
        [
            r
            for i in range(1, days + 1)
            for r in _requests(today - timedelta(days=i), 1, tag, **fields)
        ],
    )


def test_a_series_short_of_history_says_what_it_has_and_needs(platform: Persona) -> None:
    _recent(platform, 10, "s", team_id="search")
    _recent(platform, 2, "a", team_id="ads")
    body = platform.client.get("/api/v1/forecast").json()
    search, ads = _series(body)["search"], _series(body)["ads"]
    assert ads["insufficient_history"] == {"have_days": 2, "need_days": 7}
    assert ads["projected_month_end"] is None
    assert search["insufficient_history"] is None
    assert _units(search["projected_month_end"]["cost"]) >= _units(search["month_to_date"])
    assert body["method"]["min_history_days"] == 7


def test_nothing_with_enough_history_is_a_400_naming_the_window(platform: Persona) -> None:
    _recent(platform, 2, "s", team_id="search")
    response = platform.client.get("/api/v1/forecast", {"window": "14"})
    assert response.status_code == 400
    [message] = response.json()["error"]["fields"]["window"]
    assert "needs 7 complete days" in message
    assert "has 2" in message


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dimension": "workflow_id"}, "dimension"),
        ({"dimension": "team_id,model"}, "dimension"),
        ({"colour": "blue"}, "colour"),
        ({"until": "next tuesday"}, "until"),
        ({"until": "2020-01-01T00:00:00Z"}, "until"),
        ({"until": "2999-01-01T00:00:00Z"}, "until"),
        ({"window": "6"}, "window"),
        ({"window": "91"}, "window"),
        ({"window": "four"}, "window"),
        ({"tz": "Mars/Olympus_Mons"}, "tz"),
        ({"limit": "0"}, "limit"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(
    platform: Persona, params: dict[str, str], field: str
) -> None:
    response = platform.client.get("/api/v1/forecast", params)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_a_project_key_sees_its_projects_budgets_and_series_only(
    platform: Persona, member: Persona, outsider: Persona
) -> None:
    _recent(platform, 10, "r", team_id="search", project_id="ranker")
    _recent(platform, 10, "b", team_id="ads", project_id="bidder")
    for team, project in (("search", "ranker"), ("ads", "bidder")):
        budget_create(
            principal=None,
            name=project,
            scope="project",
            scope_id=project,
            team_id=team,
            project_id=project,
            cost_limit=Decimal(100),
        )
    mine = member.client.get("/api/v1/forecast", {"dimension": "project"}).json()
    ForecastOut.model_validate(mine)  # the body the OpenAPI document declares
    assert list(_series(mine, "project_id")) == ["ranker"]
    assert [b["name"] for b in mine["budgets"]] == ["ranker"]
    theirs = outsider.client.get("/api/v1/forecast", {"dimension": "team"}).json()
    assert list(_series(theirs)) == ["ads"]
    assert [b["name"] for b in theirs["budgets"]] == ["bidder"]
    everyone = platform.client.get("/api/v1/forecast", {"dimension": "project_id"}).json()
    assert set(_series(everyone, "project_id")) == {"ranker", "bidder"}
    ranker, same = _series(mine, "project_id")["ranker"], _series(everyone, "project_id")["ranker"]
    assert ranker["month_to_date"] == same["month_to_date"]
    assert ranker["history_days"] == same["history_days"] == 10


# --- the backtest --------------------------------------------------------------------------------

# Requests per weekday (Monday first): an exact weekly pattern, and one spike day.
PATTERN = [5, 5, 6, 5, 4, 2, 1]
SPIKE = 20


def _backtest(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("token", "backtest", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_the_backtest_reports_the_error_the_data_implies(platform: Persona) -> None:
    today = timezone.now().date()
    spike = today - timedelta(days=10)
    counts = {
        d: SPIKE if d == spike else PATTERN[d.weekday()]
        for d in _days(today - timedelta(days=60), today - timedelta(days=1))
    }
    _post(platform, [r for d, n in counts.items() for r in _requests(d, n, "t", team_id="search")])
    body = json.loads(_backtest("--days", "14", "--horizon", "7", "--json")[0])

    # The method knows the weekly pattern exactly and is not moved by the spike once it is in
    # its history: only forecasts whose days hold the spike miss, by the spike's excess.
    origins = _days(today - timedelta(days=14), today - timedelta(days=7))
    expected: dict[int, list[float]] = {1: [], 7: []}
    naive: dict[int, list[float]] = {1: [], 7: []}
    for origin in origins:
        for h in (1, 7):
            days = [origin + timedelta(days=i) for i in range(h)]
            actual = sum(counts[d] for d in days)
            pattern = sum(PATTERN[d.weekday()] for d in days)
            expected[h].append(abs(pattern - actual) / actual * 100)
            week = sum(counts[origin - timedelta(days=i + 1)] for i in range(7)) / 7
            naive[h].append(abs(week * h - actual) / actual * 100)
    for h in (1, 7):
        got = body["overall"][f"h{h}"]
        assert got["forecasts"] == len(origins)
        assert got["mape"] == pytest.approx(sum(expected[h]) / len(origins), abs=0.01)
        assert got["median_ape"] == pytest.approx(statistics.median(expected[h]), abs=0.01)
        assert got["bias"] < 0  # the spike is only ever under-forecast
        # No noise in the history: the interval is the point, and holds every day but those.
        exact = sum(1 for e in expected[h] if e == 0)
        assert got["coverage"] == pytest.approx(exact / len(origins) * 100, abs=0.05)
    assert body["overall"]["h1"]["mape"] > 0
    [row] = body["series"]
    assert row["team_id"] == "search"
    assert row["h7"] == body["overall"]["h7"]
    baseline = body["baseline"]["h1"]["mape"]
    assert baseline == pytest.approx(sum(naive[1]) / len(origins), abs=0.01)
    assert baseline > body["overall"]["h1"]["mape"]  # weekdays matter: the naive rate misses them


def test_the_backtest_table_and_its_refusals(platform: Persona) -> None:
    _recent(platform, 30, "s", team_id="search")
    text, _err = _backtest("--days", "10", "--horizon", "3")
    assert "Overall, errors in % of actual spend:" in text
    assert "mape" in text
    assert "search" in text
    with pytest.raises(CommandError, match="--horizon"):
        _backtest("--days", "10", "--horizon", "40")
    with pytest.raises(CommandError, match="horizon"):
        _backtest("--days", "3", "--horizon", "7")
    with pytest.raises(CommandError, match="dimension"):
        _backtest("--dimension", "workflow_id")


def test_forecast_usage_refuses_a_window_before_reading_anything() -> None:
    with pytest.raises(ApiError) as refused:
        forecast_usage(ORGANISATION, {"window": 200}, now=timezone.now())
    assert "window" in refused.value.fields


# --- the live dashboard in a browser -------------------------------------------------------------

PASSWORD = "pw-forecast-page-1"


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_shows_when_each_budget_runs_out(
    chromium: str, live_server: Any, platform: Persona, django_user_model: Any
) -> None:
    from playwright.sync_api import sync_playwright

    django_user_model.objects.create_superuser("forecast", "f@example.com", PASSWORD)
    _recent(platform, 6, "s", team_id="search")  # 6 requests in the last 7 days
    budget_create(
        principal=None,
        name="search lifetime",
        scope="team",
        scope_id="search",
        team_id="search",
        period="lifetime",
        cost_limit=COST * 9,  # 3 requests' worth left: 3.5 days at that rate
    )
    before = timezone.now()
    # No database work from here on: the ORM refuses to run beside Playwright's event loop.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                viewport={"width": 1366, "height": 768}, timezone_id="UTC"
            )
            page = context.new_page()
            page.goto(f"{live_server.url}/admin/login/?next=/admin/live/")
            page.fill("#id_username", "forecast")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            note = page.locator("#tm-budgets .tm-bar-runout").first
            note.wait_for()
            at = datetime.fromisoformat(note.get_attribute("data-exhausts-at") or "")
            text = note.text_content()
            folder = ARTIFACTS / "live"
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(
                path=str(folder / f"dashboard-runs-out-{connection.vendor}.png"), full_page=True
            )
        finally:
            browser.close()
    after = timezone.now()
    lasts = timedelta(days=3.5)
    assert before + lasts - timedelta(seconds=1) <= at <= after + lasts + timedelta(seconds=1)
    assert text == f"runs out ~{at:%b} {at.day}, at the last 7 days' rate"
