"""Anomalies (issue 13): planted spikes are found with the drivers planted, clean history gives
none, an earlier spike does not hide the next, the beat job stores, alerts once and resolves,
scopes hold, and bad input is a named 400."""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

import pytest
from django.utils import timezone

from budgets.models import AlertChannel, AlertDelivery
from reporting import anomalies
from reporting.models import Anomaly
from tests.conftest import Persona
from tests.reporting.anomaly_data import History, Spike
from tokenmgr_project.core.principal import Principal
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db

END = timezone.now().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
ORG = Principal(scope="global", is_staff=True)
DAY = timedelta(days=1)


def _history(*spikes: Spike, teams: int | list[str] = 2, days: int = 35, seed: int = 3) -> History:
    history = History(seed=seed, teams=teams, days=days, end=END)
    for spike in spikes:
        history.plant(spike)
    history.write()
    return history


def _days(**params: Any) -> anomalies.Detection:
    return anomalies.detect(
        ORG,
        dimension=params.pop("dimension", "team_id"),
        metric="cost",
        granularity=params.pop("granularity", "day"),
        since=params.pop("since", END - 14 * DAY),
        until=params.pop("until", END),
        **params,
    )


def test_clean_history_has_no_anomalies() -> None:
    _history(teams=3)
    for dimension in ("team_id", "project_id", "model", "feature", "agent", "user_id"):
        found = _days(dimension=dimension)
        assert found.evaluated_series > 0
        assert found.findings == [], dimension
    assert _days(granularity="hour", since=END - 3 * DAY).findings == []


@pytest.mark.parametrize(
    ("driver", "value"),
    [
        ("model", "gpt-4o"),
        ("user_id", "team-1-u9"),
        ("feature", "team-1-bulk-export"),
        ("agent", "runaway-agent"),
    ],
)
def test_a_planted_spike_is_found_with_its_driver(driver: str, value: str) -> None:
    day = END - 4 * DAY
    _history(Spike("team-1", day, "day", 3.0, driver, value))
    found = _days()
    assert [(f.series, f.bucket) for f in found.findings] == [("team-1", day)]
    finding = found.findings[0]
    assert finding.direction == "up"
    assert finding.value > finding.upper > finding.expected > finding.lower >= 0
    assert finding.method == "same weekday, previous 8 weeks"
    drivers = anomalies.drivers_for(ORG, finding, {})
    assert (drivers[0]["dimension"], drivers[0]["value"]) == (driver, value)
    # The planted driver carries the extra: about (factor - 1) of the expected day.
    assert 85 <= float(drivers[0]["share_of_excess"]) <= 115


def test_an_earlier_spike_does_not_hide_the_next() -> None:
    """Same team, same weekday a week apart: the first is in the second's baseline."""
    first, second = END - 10 * DAY, END - 3 * DAY
    _history(
        Spike("team-0", first, "day", 4.0, "model", "gpt-4o"),
        Spike("team-0", second, "day", 2.5, "agent", "runaway-agent"),
    )
    found = _days()
    assert sorted((f.series, f.bucket) for f in found.findings) == [
        ("team-0", first),
        ("team-0", second),
    ]


def test_an_hourly_spike_is_found_in_its_hour() -> None:
    hour = END - 2 * DAY + timedelta(hours=14)
    _history(Spike("team-0", hour, "hour", 4.0, "user_id", "team-0-u9"))
    found = _days(granularity="hour", since=END - 3 * DAY)
    assert [(f.series, f.bucket) for f in found.findings] == [("team-0", hour)]
    assert found.findings[0].method == "same hour, same kind of day, previous 28 days"
    drivers = anomalies.drivers_for(ORG, found.findings[0], {})
    assert (drivers[0]["dimension"], drivers[0]["value"]) == ("user_id", "team-0-u9")


def test_a_drop_is_an_anomaly_down() -> None:
    history = History(seed=5, teams=2, days=35, end=END)
    rows = [
        r
        for r in history.rows()
        if not (r.team_id == "team-0" and END - 2 * DAY <= r.occurred_at < END - DAY)
    ]
    TokenUsage.objects.bulk_create(rows, batch_size=2000)
    found = _days(direction="down")
    assert [(f.series, f.bucket, f.direction) for f in found.findings] == [
        ("team-0", END - 2 * DAY, "down")
    ]
    assert _days(direction="up").findings == []


def test_series_without_history_are_listed_not_scored() -> None:
    _history(teams=1, days=5)
    found = _days(since=END - 3 * DAY)
    assert found.evaluated_series == 0
    assert [i["series"] for i in found.insufficient] == ["team-0"]
    assert "7 days" in found.insufficient[0]["need"]


# --- the endpoint ------------------------------------------------------------------------------


def _get(persona: Persona, **params: Any) -> Any:
    return persona.client.get("/api/v1/anomalies", params)


def _range(days: int = 14) -> dict[str, str]:
    return {"since": (END - days * DAY).isoformat(), "until": END.isoformat()}


def test_the_endpoint_answers_with_drivers_and_range(platform: Persona) -> None:
    day = END - 5 * DAY
    _history(Spike("team-1", day, "day", 3.5, "feature", "team-1-bulk-export"))
    response = _get(platform, **_range())
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["series_evaluated"] == 2
    (item,) = body["anomalies"]
    assert (item["series"], item["bucket"], item["direction"]) == ("team-1", day.isoformat(), "up")
    low, high = (float(v) for v in item["expected_range"])
    assert low <= float(item["expected"]) <= high < float(item["value"])
    assert item["drivers"][0]["value"] == "team-1-bulk-export"
    assert (item["id"], item["status"]) == (None, None)  # not recorded by the job yet


def test_the_endpoint_through_signals(platform: Persona) -> None:
    _history(Spike("team-0", END - 2 * DAY, "day", 3.0, "model", "gpt-4o"))
    response = platform.client.post(
        "/api/v1/signals",
        {"type": "get_anomalies", "data": {"dimension": "team", **_range()}},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert [a["series"] for a in response.json()["result"]["anomalies"]] == ["team-0"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dimension": "workflow_id"}, "dimension"),
        ({"dimension": "colour"}, "dimension"),
        ({"metric": "dollars"}, "metric"),
        ({"granularity": "week"}, "granularity"),
        ({"threshold": "1"}, "threshold"),
        ({"threshold": "lots"}, "threshold"),
        ({"drivers": "500"}, "drivers"),
        ({"since": "yesterday"}, "since"),
        ({"since": END.isoformat(), "until": (END - DAY).isoformat()}, "until"),
        ({"granularity": "hour", "since": (END - 200 * DAY).isoformat()}, "since"),
        ({"bogus": "1"}, "bogus"),
    ],
)
def test_bad_input_is_a_named_400(platform: Persona, params: dict[str, str], field: str) -> None:
    response = _get(platform, **params)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"], response.json()


def test_a_range_without_history_is_a_400_saying_what_is_needed(platform: Persona) -> None:
    _history(teams=1, days=4)
    response = _get(platform, **_range(3))
    assert response.status_code == 400
    message = response.json()["error"]["fields"]["since"][0]
    assert "needs 7 days of history" in message
    assert "earliest usage" in message


def test_a_team_key_sees_only_its_team(team_lead: Persona) -> None:
    _history(
        Spike("search", END - 3 * DAY, "day", 4.0, "model", "gpt-4o"),
        Spike("ads", END - 3 * DAY, "day", 4.0, "model", "gpt-4o"),
        teams=["search", "ads"],
    )
    body = _get(team_lead, **_range()).json()
    assert {a["series"] for a in body["anomalies"]} == {"search"}
    body = _get(team_lead, dimension="model", **_range()).json()
    assert {a["team_id"] for a in body["anomalies"]} <= {""}
    assert all(a["id"] is None for a in body["anomalies"])


# --- the beat job ------------------------------------------------------------------------------


def test_the_job_records_alerts_once_and_resolves(platform: Persona) -> None:
    AlertChannel.objects.create(kind="status", target="anomaly-feed")
    spike_day = END - 2 * DAY
    _history(Spike("team-1", spike_day, "day", 4.0, "agent", "runaway-agent"))

    first = anomalies.anomalies_record(now=END - DAY + timedelta(minutes=5))
    days = [a for a in first.new if a.granularity == "day"]
    assert [(a.dimension, a.series, a.bucket) for a in days if a.dimension == "team_id"] == [
        ("team_id", "team-1", spike_day)
    ]
    team_day = Anomaly.objects.get(dimension="team_id", granularity="day")
    assert team_day.status == "open"
    assert team_day.alerted_at is not None
    assert team_day.drivers[0]["value"] == "runaway-agent"
    notices = AlertDelivery.objects.filter(alert__isnull=True)
    assert notices.count() == len(first.new)  # one channel: one delivery per anomaly
    assert {d.notice["kind"] for d in notices} == {"anomaly"}
    mine = [d for d in notices if d.notice["payload"]["id"] == team_day.pk]
    assert "team team-1" in mine[0].notice["message"]
    assert mine[0].notice["team_id"] == "team-1"

    # The same hour again: nothing new, nothing alerted twice.
    again = anomalies.anomalies_record(now=END - DAY + timedelta(minutes=15))
    assert again.new == []
    assert AlertDelivery.objects.filter(alert__isnull=True).count() == len(first.new)

    # A day later the team is back in range: its open anomalies are resolved.
    later = anomalies.anomalies_record(now=END + timedelta(minutes=5))
    assert team_day.pk in {a.pk for a in later.resolved}
    team_day.refresh_from_db()
    assert team_day.status == "resolved"
    assert team_day.resolved_at is not None

    # The endpoint shows the stored state.
    body = _get(platform, **_range()).json()
    (item,) = [a for a in body["anomalies"] if a["series"] == "team-1"]
    assert (item["id"], item["status"]) == (team_day.pk, "resolved")


def test_the_job_task_is_scheduled() -> None:
    from tokenmgr_project.celery import app

    tasks = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert "reporting.tasks.anomalies_detect" in tasks


def test_the_admin_lists_recorded_anomalies_with_their_drivers(admin: Persona) -> None:
    _history(Spike("team-1", END - 2 * DAY, "day", 4.0, "user_id", "team-1-u9"))
    anomalies.anomalies_record(now=END - DAY + timedelta(minutes=5))
    row = Anomaly.objects.get(dimension="team_id", granularity="day")
    listing = admin.client.get("/admin/reporting/anomaly/?status__exact=open")
    assert listing.status_code == 200
    assert "team_id = team-1" in listing.content.decode()
    page = admin.client.get(f"/admin/reporting/anomaly/{row.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "user_id team-1-u9" in text
    assert anomalies.anomaly_message(row).split(" against")[0] in text
    assert admin.client.get("/admin/reporting/anomaly/add/").status_code == 403


def test_a_weekend_spike_is_explained_against_weekends() -> None:
    """A Saturday's driver is held against earlier weekend days, not the busier weekdays."""
    day = END - 2 * DAY
    while day.weekday() != 5:
        day -= DAY
    _history(Spike("team-1", day, "day", 3.0, "model", "gpt-4o"))
    found = _days()
    assert [(f.series, f.bucket) for f in found.findings] == [("team-1", day)]
    drivers = anomalies.drivers_for(ORG, found.findings[0], {})
    assert (drivers[0]["dimension"], drivers[0]["value"]) == ("model", "gpt-4o")
    assert 85 <= float(drivers[0]["share_of_excess"]) <= 115
