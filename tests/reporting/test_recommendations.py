"""GET /api/v1/recommendations and its decisions: a seeded generator plants known opportunities
(short traffic on gpt-4o in team alpha, repeated inputs in feature faq, a large repeated system
prompt in agent planner, retry storms in agent retrier, oversized max_tokens in agent
summarizer, an always-exhausted and an under-used budget); each is found with the planted
target and a saving computed from the catalogue, and a clean dataset yields none. Thin evidence
is hidden; dismiss / accept / tracking, the off switch, scopes, the beat job, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Sum
from django.utils import timezone

from budgets.models import Budget, BudgetAlert, BudgetPeriod
from reporting import recommendations, tasks
from reporting.models import Recommendation
from tests.conftest import Persona, event, settle
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.principal import Principal
from usage import pricing, rollups
from usage.models import TokenUsage
from usage.services import manager_config_update

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)
NOW = timezone.now().replace(minute=0, second=0, microsecond=0)
ORG = Principal(scope="global")


# --- the seeded generator ----------------------------------------------------------------------


def _at(at: datetime) -> str:
    return at.isoformat()


def post(persona: Persona, events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 1000):
        chunk = events[start : start + 1000]
        response = persona.client.post("/api/v1/usage/batch", {"events": chunk}, format="json")
        assert response.status_code == 200, response.content
        assert all(r["status"] == "created" for r in response.json()["results"]), response.json()
    settle()


def short_traffic(
    prefix: str, n: int, *, end: datetime = NOW, **fields: Any
) -> list[dict[str, Any]]:
    """n successful gpt-4o requests with 50-token outputs, one every 5 hours before `end`."""
    base = {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 50, **fields}
    return [
        event(f"{prefix}{i}", occurred_at=_at(end - (5 * i + 2) * HOUR), **base) for i in range(n)
    ]


@dataclass
class Planted:
    exhausted: Budget
    underused: Budget


def plant(platform: Persona) -> Planted:
    """Every opportunity, each in its own team, feature or agent."""
    events = short_traffic("alpha-", 30, team_id="alpha", project_id="a1")
    # Repeated inputs in feature faq: one prompt an hour, long answers (not short traffic).
    events += [
        event(
            f"faq-{i}",
            model="gpt-4o-mini",
            team_id="beta",
            project_id="b1",
            feature="faq",
            input_tokens=500,
            output_tokens=900,
            occurred_at=_at(NOW - (i + 2) * HOUR),
            provenance={"input_hash": "faq-prompt"},
        )
        for i in range(25)
    ]
    # A 2,000-token system prompt every 2 minutes in agent planner, never read from a cache.
    events += [
        event(
            f"plan-{i}",
            provider="anthropic",
            model="claude-3-5-sonnet",
            team_id="gamma",
            project_id="g1",
            agent="planner",
            input_tokens=3000,
            output_tokens=400,
            occurred_at=_at(NOW - 3 * HOUR + i * timedelta(minutes=2)),
            provenance={
                "system_context": {"system_prompt_tokens": 2000, "system_prompt_hash": "sys-v1"}
            },
        )
        for i in range(30)
    ]
    # Seven operations in agent retrier, each failed, retried twice more in vain, then won.
    for op in range(7):
        first = NOW - (10 + op) * HOUR
        common = {"team_id": "delta", "project_id": "d1", "agent": "retrier", "output_tokens": 300}
        events.append(event(f"op-{op}", status="error", occurred_at=_at(first), **common))
        for r in range(3):
            events.append(
                event(
                    f"op-{op}-r{r}",
                    status="error" if r < 2 else "success",
                    occurred_at=_at(first + (r + 1) * timedelta(minutes=2)),
                    provenance={"parent_request_id": f"op-{op}", "relationship": "retry_of"},
                    **common,
                )
            )
    # max_tokens 4,000 sent with answers of 80-100 tokens in agent summarizer.
    events += [
        event(
            f"sum-{i}",
            team_id="eps",
            project_id="e1",
            agent="summarizer",
            output_tokens=80 + i % 21,
            occurred_at=_at(NOW - (i + 30) * HOUR),
            metadata={"max_tokens": 4000},
        )
        for i in range(25)
    ]
    post(platform, events)
    return Planted(
        exhausted=_budget("alpha", limit=Decimal(1), spent=Decimal(1), exhausted_after=0.4),
        underused=_budget("beta", limit=Decimal(100), spent=Decimal(5), exhausted_after=None),
    )


def _budget(team: str, *, limit: Decimal, spent: Decimal, exhausted_after: float | None) -> Budget:
    """A daily team budget with its last four days closed (archived), spending `spent` each,
    exhausted `exhausted_after` of the way through each day."""
    budget = Budget.objects.create(
        name=f"{team} daily", scope="team", scope_id=team, team_id=team, period="daily",
        cost_limit=limit,
    )  # fmt: skip
    today = NOW.replace(hour=0)
    for d in range(1, 5):
        start = today - timedelta(days=d)
        BudgetPeriod.objects.create(
            budget=budget, period_start=start, period_end=start + timedelta(days=1),
            cost_spent=spent, tokens_spent=1000, requests=10, cost_limit=limit, closed_at=start,
        )  # fmt: skip
        if exhausted_after is not None:
            alert = BudgetAlert.objects.create(
                budget=budget, period_start=start, kind=BudgetAlert.Kind.EXHAUSTED,
                metric=BudgetAlert.Metric.COST, threshold=Decimal(100), spent=spent, limit=limit,
                percent=Decimal(100), message="exhausted",
            )  # fmt: skip
            at = start + timedelta(days=exhausted_after)
            BudgetAlert.objects.filter(pk=alert.pk).update(created_at=at)
    return budget


def clean(platform: Persona) -> None:
    """Usage with nothing to recommend: long answers on gpt-4o, inputs that never repeat, no
    errors, no system prompts, a budget used about 60 % without running out."""
    post(
        platform,
        [
            event(
                f"c-{i}",
                model="gpt-4o",
                team_id="alpha",
                feature="faq",
                agent="planner",
                input_tokens=3000,
                output_tokens=900,
                occurred_at=_at(NOW - (i + 2) * HOUR),
                provenance={"input_hash": f"unique-{i}"},
            )
            for i in range(60)
        ],
    )
    _budget("alpha", limit=Decimal(10), spent=Decimal(6), exhausted_after=None)


def listed(persona: Persona, **params: Any) -> list[dict[str, Any]]:
    response = persona.client.get("/api/v1/recommendations", params)
    assert response.status_code == 200, response.content
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def one(items: list[dict[str, Any]], kind: str, dimension: str, target: str) -> dict[str, Any]:
    found = [
        i for i in items if (i["kind"], i["dimension"], i["target"]) == (kind, dimension, target)
    ]
    assert len(found) == 1, [(i["kind"], i["dimension"], i["target"]) for i in items]
    return found[0]


def ledger_cost(**filters: Any) -> Decimal:
    return Decimal(str(TokenUsage.objects.filter(**filters).aggregate(c=Sum("cost"))["c"] or 0))


def rates(provider: str, model: str) -> pricing.Rates:
    found = pricing.price_choice(provider, model, NOW).rates
    assert found is not None
    return found


# --- each planted opportunity found, priced from the catalogue ---------------------------------


def test_it_finds_the_cheaper_model_for_team_alphas_short_traffic(platform: Persona) -> None:
    plant(platform)
    item = one(listed(platform), "cheaper_model", "team", "alpha (openai/gpt-4o)")
    mini = rates("openai", "gpt-4o-mini")
    on_mini = (30 * 1000 * mini.input + 30 * 50 * mini.output) / 10**6
    assert Decimal(item["savings"]) == ledger_cost(team_id="alpha") - on_mini > 0
    assert item["evidence"]["cheaper_model"] == "gpt-4o-mini"
    assert (item["team_id"], item["project_id"], item["requests"]) == ("alpha", "a1", 30)
    days = Decimal(item["window"]["seconds"]) / 86400
    assert Decimal(item["monthly_savings"]) == (Decimal(item["savings"]) * 30 / days).quantize(
        Decimal("0.01")
    )
    cheaper = [i for i in listed(platform) if i["kind"] == "cheaper_model"]
    assert {i["value"] for i in cheaper} == {"openai/gpt-4o", "alpha"}  # nobody else


def test_it_finds_caching_for_feature_faqs_repeated_input(platform: Persona) -> None:
    plant(platform)
    items = listed(platform)
    item = one(items, "caching", "feature", "faq (openai/gpt-4o-mini)")
    assert item["requests"] == 24  # every repeat after the first
    repeats = ledger_cost(feature="faq") - ledger_cost(request_id="faq-24")  # the first one
    assert Decimal(item["savings"]) == repeats
    assert item["evidence"]["examples"][0]["input_hash"] == "faq-prompt"
    assert {i["value"] for i in items if i["kind"] == "caching"} == {
        "faq",
        "beta",
        "openai/gpt-4o-mini",
    }


def test_it_prices_prompt_caching_and_trimming_for_agent_planners_system_prompt(
    platform: Persona,
) -> None:
    plant(platform)
    items = listed(platform)
    sonnet = rates("anthropic", "claude-3-5-sonnet")
    caching = one(items, "prompt_caching", "agent", "planner (anthropic/claude-3-5-sonnet)")
    # 29 repeats read 2,000 tokens at the cache-read rate; the first writes them at a premium.
    read, write = (
        29 * 2000 * (sonnet.input - sonnet.cache_read),
        2000 * (sonnet.cache_write - sonnet.input),
    )
    assert Decimal(caching["savings"]) == (read - write) / 10**6 > 0
    assert caching["evidence"]["repeats_of_system_prompts"] == 29
    trimming = one(items, "prompt_trimming", "agent", "planner (anthropic/claude-3-5-sonnet)")
    assert Decimal(trimming["savings"]) == 30 * 1000 * sonnet.input / 10**6
    assert "1,000 tokens trimmed" in trimming["evidence"]["assumption"]
    assert {i["value"] for i in items if i["kind"] == "prompt_trimming"} == {
        "planner", "gamma", "anthropic/claude-3-5-sonnet",
    }  # fmt: skip


def test_it_finds_retry_waste_in_agent_retrier(platform: Persona) -> None:
    plant(platform)
    item = one(listed(platform), "retry_waste", "agent", "retrier (openai/gpt-4o-mini)")
    won = TokenUsage.objects.filter(request_id__endswith="-r2", agent="retrier")
    waste = ledger_cost(agent="retrier") - sum((r.cost for r in won), Decimal(0))
    assert (Decimal(item["savings"]), item["requests"]) == (waste, 21)
    assert item["evidence"]["retry_storms"] == 7


def test_it_says_max_tokens_frees_headroom_but_saves_no_money(platform: Persona) -> None:
    plant(platform)
    item = one(listed(platform), "max_tokens", "agent", "summarizer (openai/gpt-4o-mini)")
    assert (item["savings"], item["monthly_savings"], item["saves_money"]) == ("0", "0", False)
    evidence = item["evidence"]
    assert (evidence["source"], evidence["largest_output"], evidence["suggested_max_tokens"]) == (
        "metadata", 100, 125,
    )  # fmt: skip
    assert evidence["output_tokens_reserved"] == 25 * 4000
    assert "bill" in evidence["money"]


@pytest.fixture
def database_holds(settings: Any) -> Iterator[None]:
    """Reservations as rows (no Redis): with Redis, holds live in Redis and leave no rows."""
    settings.REDIS_URL = ""
    tm_redis.reset()
    yield
    tm_redis.reset()


@pytest.mark.usefixtures("database_holds")
def test_it_reads_reserved_output_from_budget_reservations(platform: Persona) -> None:
    Budget.objects.create(name="z", scope="team", scope_id="zeta", team_id="zeta", cost_limit=100)
    for i in range(20):
        check = {"model": "gpt-4o-mini", "team_id": "zeta", "agent": "writer",
                 "input_tokens": 100, "max_output_tokens": 2000, "reserve": True}  # fmt: skip
        held = platform.client.post("/api/v1/budgets/check", check, format="json").json()
        post(platform, [event(f"w-{i}", team_id="zeta", agent="writer", output_tokens=40,
                              reservation_id=held["reservation_id"])])  # fmt: skip
    body = recommendations.recommendations_list(ORG, {}, now=timezone.now() + HOUR)
    item = one(body["results"], "max_tokens", "agent", "writer (openai/gpt-4o-mini)")
    assert (item["evidence"]["source"], item["evidence"]["output_tokens_reserved"]) == (
        "reservations", 20 * 2000,
    )  # fmt: skip
    assert item["saves_money"] is False


def test_it_finds_the_always_exhausted_and_the_underused_budget(platform: Persona) -> None:
    planted = plant(platform)
    items = listed(platform, dimension="budget")
    early = one(items, "budget_exhausted_early", "budget", f"budget #{planted.exhausted.pk}")
    assert (early["evidence"]["exhausted_early"], early["confidence"]) == (4, "high")
    assert (early["team_id"], early["monthly_savings"]) == ("alpha", "0")
    low = one(items, "budget_underused", "budget", f"budget #{planted.underused.pk}")
    assert low["evidence"]["largest_share_used"] == "5.0%"
    assert "cost 10" in low["action"]  # twice the largest period's 5
    assert len(items) == 2


def test_a_clean_dataset_yields_no_recommendation(platform: Persona) -> None:
    clean(platform)
    assert listed(platform, status="all") == []
    assert Recommendation.objects.count() == 0


def test_thin_evidence_is_not_shown(platform: Persona) -> None:
    post(platform, short_traffic("thin-", 19, team_id="alpha"))
    assert listed(platform) == []
    post(platform, short_traffic("more-", 1, end=NOW - 200 * HOUR, team_id="alpha"))
    assert {i["kind"] for i in listed(platform)} == {"cheaper_model"}


def test_a_filtered_view_shows_its_own_figures_and_leaves_the_stored_ones(
    platform: Persona,
) -> None:
    post(platform, short_traffic("f1-", 30, team_id="alpha", project_id="a1", feature="f1"))
    post(platform, short_traffic("f2-", 30, team_id="alpha", project_id="a1", feature="f2"))
    whole = one(listed(platform), "cheaper_model", "model", "openai/gpt-4o")
    part = one(listed(platform, feature="f1"), "cheaper_model", "model", "openai/gpt-4o")
    assert part["id"] == whole["id"]  # the same recommendation (key), seen through a filter
    assert Decimal(part["savings"]) * 2 == Decimal(whole["savings"])
    stored = Recommendation.objects.get(pk=whole["id"])
    assert stored.evidence["about"]["savings"] == whole["savings"]


def test_confidence_follows_the_evidence_size_and_spread() -> None:
    assert recommendations.opportunities.confidence(1000, 500) == "high"
    assert recommendations.opportunities.confidence(1000, 950) == "medium"  # one half only
    assert recommendations.opportunities.confidence(150, 70) == "medium"
    assert recommendations.opportunities.confidence(150, None) == "low"
    assert recommendations.opportunities.confidence(30, 15) == "low"


# --- decisions and tracking ---------------------------------------------------------------------


def test_a_dismissed_one_is_hidden_unless_asked_for(platform: Persona, admin: Persona) -> None:
    plant(platform)
    item = one(listed(admin), "caching", "feature", "faq (openai/gpt-4o-mini)")
    response = admin.client.post(
        f"/api/v1/recommendations/{item['id']}/dismiss", {"note": "cached upstream"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["decided_by"].startswith("admin")
    assert item["key"] not in {i["key"] for i in listed(admin)}
    dismissed = one(listed(admin, status="dismissed"), "caching", "feature", item["target"])
    assert (dismissed["note"], dismissed["status"], dismissed["id"]) == (
        "cached upstream", "dismissed", item["id"],
    )  # fmt: skip
    again = admin.client.post(f"/api/v1/recommendations/{item['id']}/dismiss", {}, format="json")
    assert again.status_code == 409


def test_an_accepted_one_shows_what_it_saved_after_the_behaviour_changed(platform: Persona) -> None:
    accepted_at = NOW - 12 * 24 * HOUR
    # Before acceptance one short gpt-4o request a day for 30 days; after it, one every two.
    short = {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 50, "team_id": "alpha"}
    before = [
        event(f"b{i}", occurred_at=_at(accepted_at - (24 * i + 12) * HOUR), **short)
        for i in range(30)
    ]
    after = [
        event(f"a{i}", occurred_at=_at(accepted_at + (48 * i + 12) * HOUR), **short)
        for i in range(5)
    ]
    post(platform, before + after)
    at_acceptance = recommendations.recommendations_list(ORG, {}, now=accepted_at)["results"]
    item = one(at_acceptance, "cheaper_model", "model", "openai/gpt-4o")
    team = one(at_acceptance, "cheaper_model", "team", "alpha (openai/gpt-4o)")
    row = recommendations.recommendation_decide(
        principal=ORG, rec_id=item["id"], status="accepted", now=accepted_at
    )
    recommendations.recommendation_decide(
        principal=ORG, rec_id=team["id"], status="accepted", now=accepted_at
    )
    per_request = rollups.money_to_units(Decimal(item["savings"])) // 30
    assert (row.baseline_daily_units, row.baseline_days) == (per_request, 30)  # 30 in 30 days
    ten_days_on = accepted_at + 10 * 24 * HOUR
    later = recommendations.recommendations_list(ORG, {}, now=ten_days_on)["results"]
    current = round(Decimal(5 * per_request) / 10)  # 5 requests in 10 days
    for dimension, target in (("model", "openai/gpt-4o"), ("team", "alpha (openai/gpt-4o)")):
        tracking = one(later, "cheaper_model", dimension, target)["tracking"]
        assert tracking["current_daily_waste"] == rollups.units_text(current)
        assert tracking["realized_savings"] == rollups.units_text((per_request - current) * 10)
        assert tracking["days_since_acceptance"] == "10.00"


def test_the_optimization_report_shows_the_accepted_ones(platform: Persona) -> None:
    plant(platform)
    item = one(listed(platform), "caching", "feature", "faq (openai/gpt-4o-mini)")
    response = platform.client.post(f"/api/v1/recommendations/{item['id']}/accept", format="json")
    assert response.status_code == 200, response.content
    assert response.json()["baseline_daily_savings"] is not None
    report = platform.client.get("/api/v1/reports/optimization").json()
    assert [(a["id"], a["kind"]) for a in report["accepted"]] == [(item["id"], "caching")]
    assert report["accepted"][0]["realized_savings"] is None  # measured after the first hour
    markdown = platform.client.get("/api/v1/reports/optimization", {"format": "md"})
    text = b"".join(markdown.streaming_content).decode()
    assert "### Accepted recommendations: what they saved" in text
    assert f"| {item['id']} | caching |" in text


# --- the off switch, scopes, the beat job -------------------------------------------------------


def test_optimization_disabled_turns_the_endpoint_and_the_job_off(
    platform: Persona, admin: Persona
) -> None:
    plant(platform)
    rec_id = listed(platform)[0]["id"]
    manager_config_update(optimization_enabled=False)
    response = platform.client.get("/api/v1/recommendations")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "optimization_disabled"
    assert "optimization_enabled" in response.json()["error"]["fields"]
    assert admin.client.post(f"/api/v1/recommendations/{rec_id}/accept").status_code == 409
    Recommendation.objects.all().delete()
    assert recommendations.recommendations_refresh() == {"skipped": 1}
    assert Recommendation.objects.count() == 0


def test_each_scope_sees_and_decides_only_its_own(
    member: Persona, outsider: Persona, team_lead: Persona
) -> None:
    post(member, short_traffic("m-", 30))  # team search, project ranker
    post(outsider, short_traffic("o-", 25))  # team ads, project bidder
    mine = listed(member)
    assert {(i["team_id"], i["project_id"]) for i in mine} == {("search", "ranker")}
    theirs = listed(outsider)
    assert {(i["team_id"], i["project_id"]) for i in theirs} == {("ads", "bidder")}
    assert Decimal(mine[0]["savings"]) != Decimal(theirs[0]["savings"])  # 30 vs 25 requests
    denied = outsider.client.post(f"/api/v1/recommendations/{mine[0]['id']}/dismiss")
    assert denied.status_code == 404
    assert (
        team_lead.client.post(f"/api/v1/recommendations/{mine[0]['id']}/dismiss").status_code == 200
    )
    assert Recommendation.objects.get(pk=theirs[0]["id"]).status == "open"


def test_the_beat_job_stores_refreshes_and_marks_unseen_ones_stale(platform: Persona) -> None:
    plant(platform)
    first = recommendations.recommendations_refresh(now=NOW)
    keys = set(Recommendation.objects.values_list("key", flat=True))
    assert (first["seen"], first["stale"]) == (len(keys), 0)
    assert keys
    assert tasks.recommendations_refresh()["seen"] == len(keys)  # the beat task, twice: same
    assert set(Recommendation.objects.values_list("key", flat=True)) == keys
    # Two months on no usage is in range; budgets are judged on their closed periods, still there.
    later = recommendations.recommendations_refresh(now=NOW + 60 * 24 * HOUR)
    rows = list(Recommendation.objects.all())
    assert later["stale"] == len([r for r in rows if r.dimension != "budget"]) > 0
    assert all(r.evidence.get("stale", False) == (r.dimension != "budget") for r in rows)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"kind": "cheaper_model,colour"}, "kind"),
        ({"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"}, "until"),
        ({"since": "yesterday"}, "since"),
        ({"since": (NOW - 2 * HOUR).isoformat(), "until": NOW.isoformat()}, "since"),
        ({"since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"status": "maybe"}, "status"),
        ({"dimension": "colour"}, "dimension"),
        ({"limit": "0"}, "limit"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_field(
    platform: Persona, params: dict[str, str], field: str
) -> None:
    plant(platform)
    response = platform.client.get("/api/v1/recommendations", params)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert Recommendation.objects.count() == 0  # nothing stored on bad input


def test_a_bad_decision_changes_nothing(platform: Persona) -> None:
    plant(platform)
    item = listed(platform)[0]
    url = f"/api/v1/recommendations/{item['id']}/accept"
    too_long = platform.client.post(url, {"note": "x" * 501}, format="json")
    assert too_long.status_code == 400
    assert "note" in too_long.json()["error"]["fields"]
    other_id = platform.client.post(url, {"rec_id": item["id"] + 1}, format="json")
    assert other_id.status_code == 400
    missing = platform.client.post("/api/v1/recommendations/999999/accept", format="json")
    assert missing.status_code == 404
    assert Recommendation.objects.get(pk=item["id"]).status == "open"


# --- the admin ----------------------------------------------------------------------------------


def test_the_admin_actions_decide_through_the_service(platform: Persona, admin: Persona) -> None:
    from django.contrib import admin as django_admin
    from django.contrib.messages.storage.cookie import CookieStorage
    from django.test import RequestFactory

    from reporting.admin_recommendations import RecommendationAdmin

    plant(platform)
    listed(platform)
    request = RequestFactory().post("/admin/reporting/recommendation/")
    request.user = admin.user
    request._messages = CookieStorage(request)
    model_admin = RecommendationAdmin(Recommendation, django_admin.site)
    chosen = Recommendation.objects.filter(kind="caching")
    model_admin.accept_selected(request, chosen)
    assert set(chosen.values_list("status", flat=True)) == {"accepted"}
    assert all(r.decided_by.startswith("admin") for r in chosen)
    assert all(r.baseline_daily_units is not None for r in chosen)
    model_admin.accept_selected(request, chosen)  # again: refused, one message each, no change
    assert [m.level_tag for m in request._messages][-1] == "warning"


def test_a_second_read_writes_nothing(platform: Persona) -> None:
    """A GET stores what it sees for the first time; the beat job, not reads, refreshes."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    plant(platform)
    first = listed(platform)
    assert first
    with CaptureQueriesContext(connection) as queries:
        again = listed(platform)
    assert [i["id"] for i in again] == [i["id"] for i in first]
    writes = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE"))
        and "reporting_recommendation" in q["sql"]
    ]
    assert writes == []
