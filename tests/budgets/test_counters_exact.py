"""Budget counters equal the ledger exactly (issue 8 item 3), on whichever path the pass configures
(Redis counters with PostgreSQL, or the database alone on SQLite)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from budgets.models import Budget, CounterRebuild
from budgets.services import budget_create
from tests.conftest import Persona, settle
from usage import pricing
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)


def _budget(**fields: Any) -> Budget:
    values: dict[str, Any] = {
        "name": "ranker",
        "scope": "project",
        "scope_id": "ranker",
        "team_id": "search",
        "cost_limit": Decimal(100),
    }
    values.update(fields)
    return budget_create(principal=None, **values)


def _post_batches(persona: Persona, events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 1000):
        response = persona.client.post(
            "/api/v1/usage/batch", {"events": events[start : start + 1000]}, format="json"
        )
        assert response.status_code in (200, 201, 207), response.content
        assert all(r["status"] == "created" for r in response.json()["results"])


def _tiny(prefix: str, n: int, *, model: str, input_tokens: int = 1, **fields: Any) -> list[Any]:
    return [
        {
            "request_id": f"{prefix}-{i}",
            "provider": fields.get("provider", "openai"),
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": fields.get("output_tokens", 0),
        }
        for i in range(n)
    ]


def _status(persona: Persona, budget: Budget) -> dict[str, Any]:
    response = persona.client.get(f"/api/v1/budgets/{budget.pk}/status")
    assert response.status_code == 200
    return response.json()


def _ledger_cost() -> Decimal:
    """The ledger's total, row by row (SQLite's own SUM adds its decimals as doubles)."""
    settle()
    return sum(TokenUsage.objects.values_list("cost", flat=True), Decimal(0))


def _check(persona: Persona, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini", "max_output_tokens": 0}
    body.update(fields)
    response = persona.client.post("/api/v1/budgets/check", body, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def test_it_counts_a_thousand_one_token_events_to_the_ledgers_last_decimal(
    member: Persona,
) -> None:
    budget = _budget()
    _check(member, input_tokens=1)  # the counter exists before the usage arrives

    _post_batches(member, _tiny("one", 1000, model="gpt-4o"))  # 2.50 USD per million input

    settle()
    assert _ledger_cost() == Decimal("0.0025")
    assert _status(member, budget)["cost_spent"] == "0.0025"


def test_it_refuses_on_a_hard_limit_as_soon_as_tiny_events_pass_it(member: Persona) -> None:
    budget = _budget(cost_limit=Decimal("0.002"))
    one_token = {"input_tokens": 1}  # gpt-4o-mini: 0.00000015 USD
    assert _check(member, **one_token)["allowed"] is True

    # 4,444 events of 3 tokens: 0.0019998 USD; one more token still fits exactly at 0.00199995.
    _post_batches(member, _tiny("three", 4444, model="gpt-4o-mini", input_tokens=3))
    assert _status(member, budget)["cost_spent"] == "0.0019998"
    assert _check(member, **one_token)["allowed"] is True

    _post_batches(member, _tiny("more", 556, model="gpt-4o-mini", input_tokens=3))
    settle()
    assert _ledger_cost() == Decimal("0.00225")  # 112.5 % of the limit
    assert _status(member, budget)["cost_spent"] == "0.00225"
    refused = _check(member, **one_token)
    assert refused["allowed"] is False
    assert refused["blocking_budget"]["cost_remaining"] == "-0.00025"
    assert pricing.money(_ledger_cost()) == _status(member, budget)["cost_spent"]


# --- cost -> counter units, over the whole catalogue ---------------------------------------------

_COUNTS = (1, 3, 7, 1_000_003)


def _shapes() -> list[dict[str, int]]:
    """1, 3, 7 and 1,000,003 tokens of each kind alone (cache tokens are part of the input),
    and of all kinds together."""
    shapes = []
    for n in _COUNTS:
        shapes += [
            {"input_tokens": n, "output_tokens": 0, "cache_read": 0, "cache_write": 0},
            {"input_tokens": 0, "output_tokens": n, "cache_read": 0, "cache_write": 0},
            {"input_tokens": n, "output_tokens": 0, "cache_read": n, "cache_write": 0},
            {"input_tokens": n, "output_tokens": 0, "cache_read": 0, "cache_write": n},
            {"input_tokens": 3 * n, "output_tokens": n, "cache_read": n, "cache_write": n},
        ]
    return shapes


def test_it_converts_every_catalogue_cost_to_counter_units_exactly_and_back() -> None:
    from budgets import counters

    at = timezone.now()
    priced = rounded = 0
    for choice in pricing.catalogue_choices(at):
        assert choice.rates is not None
        for shape in _shapes():
            price = pricing.price_usage(
                provider=choice.provider,
                model=choice.ref,
                at=at,
                input_tokens=shape["input_tokens"],
                output_tokens=shape["output_tokens"],
                cache_read_tokens=shape["cache_read"],
                cache_write_tokens=shape["cache_write"],
                choice=choice,
            )
            exact = sum(
                pricing.cost_for(
                    choice.rates,
                    input_tokens=shape["input_tokens"],
                    output_tokens=shape["output_tokens"],
                    cache_read=shape["cache_read"],
                    cache_write=shape["cache_write"],
                ),
                Decimal(0),
            )
            where = (choice.ref, shape)
            # Rounded once, in pricing, to the ledger's scale: storing it changes nothing more.
            assert price.cost == pricing.ledger_cost(exact), where
            assert price.cost.quantize(pricing.LEDGER_QUANTUM) == price.cost, where
            units = counters.to_units(price.cost)
            assert Decimal(units) == price.cost * counters.UNITS_PER_USD, where
            assert counters.from_units(units) == price.cost, where
            assert counters.hold_units(price.cost) == counters.limit_units(price.cost) == units
            priced += 1
            rounded += price.cost != exact
    assert priced > 30_000
    # Only prices with float artefacts (e.g. 0.041666666666666664 per million) are finer than
    # the ledger: the ledger has always stored them rounded; now the counters add that number.
    assert rounded < priced / 10


def test_it_refuses_a_cost_finer_than_the_ledger_instead_of_rounding_it() -> None:
    from budgets import counters

    with pytest.raises(ValueError, match="finer"):
        counters.to_units(Decimal("0.00000000005"))
    assert counters.hold_units(Decimal("0.00000000005")) == 1  # a hold rounds up
    assert counters.limit_units(Decimal("0.00000000015")) == 1  # a limit rounds down


# --- end to end ----------------------------------------------------------------------------------


def test_it_keeps_status_equal_to_the_ledger_over_thousands_of_tiny_mixed_events(
    member: Persona, platform: Persona
) -> None:
    budget = _budget()
    _check(member, input_tokens=1)  # the counter exists (Redis) before the usage arrives
    # An override at 6 decimals per million: 3 tokens cost 0.000003703701, stored 0.0000037037.
    platform.client.post(
        "/api/v1/pricing",
        {
            "provider": "acme",
            "model": "odd-1",
            "input_per_mtok": "1.234567",
            "output_per_mtok": "0",
        },
        format="json",
    )
    pricing.overrides.invalidate()
    long_decimals = next(
        c
        for c in pricing.catalogue_choices()
        if c.rates is not None
        and isinstance(c.rates.input, Decimal)
        and -c.rates.input.as_tuple().exponent > 8  # type: ignore[operator]
    )
    kinds = [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-3-5-haiku-latest"),
        ("acme", "odd-1"),
        (long_decimals.provider, long_decimals.ref.rsplit("/", 1)[-1]),
    ]
    events = []
    for i in range(3000):
        provider, model = kinds[i % len(kinds)]
        events.append(
            {
                "request_id": f"tiny-{i}",
                "provider": provider,
                "model": model,
                "input_tokens": 1 + i % 3,
                "output_tokens": i % 2,
            }
        )
    _post_batches(member, events)

    status_before_flush = _status(member, budget)["cost_spent"]
    ledger = _ledger_cost()
    assert ledger > 0
    assert status_before_flush == _status(member, budget)["cost_spent"] == pricing.money(ledger)
    three = TokenUsage.objects.filter(model="odd-1", input_tokens=3, output_tokens=0)
    assert {row.cost for row in three} == {Decimal("0.0000037037")}


# --- reservations whose hold is 0 ----------------------------------------------------------------


def test_it_releases_a_zero_cost_hold_on_cancel_and_on_settle(member: Persona) -> None:
    budget = _budget(token_limit=10**6)
    body = {"provider": "acme", "model": "nobody-prices-this", "input_tokens": 10, "reserve": True}
    held = _check(member, **body)
    assert (held["allowed"], held["estimated_cost"]) == (True, "0")
    cancelled = member.client.post(
        "/api/v1/reservations/cancel", {"reservation_id": held["reservation_id"]}, format="json"
    )
    assert cancelled.status_code == 200, cancelled.content

    settled = _check(member, **body)
    usage = member.client.post(
        "/api/v1/usage",
        {
            "request_id": "free-1",
            "provider": "acme",
            "model": "nobody-prices-this",
            "input_tokens": 10,
            "output_tokens": 0,
            "reservation_id": settled["reservation_id"],
        },
        format="json",
    )
    assert usage.status_code == 201, usage.content
    status = _status(member, budget)
    assert (status["tokens_reserved"], status["tokens_spent"], status["cost_spent"]) == (0, 10, "0")


# --- Redis only: exact limits, reconcile, rebuild -----------------------------------------------


def _seed(budget: Budget) -> None:
    """Load the counter from the ledger and buffer, as a check or the reconcile job does (a
    status read only reads)."""
    from budgets.services import counter_seed

    counter_seed(budget, budget.window_at(timezone.now()))


def _counter(budget: Budget) -> str:
    from budgets import counters

    return counters.counter_key(budget.pk, budget.window_at(timezone.now()))


@pytest.mark.services
def test_it_compares_limits_above_two_to_the_53_units_exactly(
    platform: Persona, member: Persona
) -> None:
    from budgets import counters
    from tokenmgr_project.core import redis as tm_redis

    budget = _budget(cost_limit=Decimal("1000000.000001"))  # 10^16 + 10^4 units: above 2^53
    platform.client.post(
        "/api/v1/pricing",
        {"provider": "acme", "model": "unit", "input_per_mtok": "0.0001", "output_per_mtok": "0"},
        format="json",
    )
    pricing.overrides.invalidate()
    one_unit = {"provider": "acme", "model": "unit", "input_tokens": 1}  # 1e-10 USD
    assert _check(member, **one_unit)["allowed"] is True  # seeds the counter
    limit = counters.limit_units(Decimal("1000000.000001"))
    client = tm_redis.client()

    for spent, tokens, allowed in [
        (limit - 1, 1, True),  # lands exactly on the limit
        (limit - 1, 2, False),
        (limit, 1, False),
        (limit - 3, 3, True),
        (limit - 3, 4, False),
    ]:
        client.hset(_counter(budget), "c", str(spent))
        answer = _check(member, **{**one_unit, "input_tokens": tokens})
        assert answer["allowed"] is allowed, (spent, tokens)
        remaining = pricing.money(counters.from_units(limit - spent))
        assert answer["budgets"][0]["cost_remaining"] == remaining


def _settled_status(persona: Persona, budget: Budget) -> dict[str, Any]:
    settle()
    return _status(persona, budget)


@pytest.mark.services
def test_it_reconciles_a_counter_above_the_ledger_down_and_one_below_up(
    member: Persona,
) -> None:
    from budgets.services import counters_reconcile
    from tokenmgr_project.core import redis as tm_redis

    budget = _budget()
    _post_batches(member, _tiny("r", 10, model="gpt-4o"))  # 0.000025 USD
    assert _settled_status(member, budget)["cost_spent"] == "0.000025"
    _seed(budget)
    client = tm_redis.client()

    client.hincrby(_counter(budget), "c", 12345)
    client.hincrby(_counter(budget), "t", 7)
    assert counters_reconcile() == 1
    assert _status(member, budget)["cost_spent"] == "0.000025"
    assert _status(member, budget)["tokens_spent"] == 10

    client.hincrby(_counter(budget), "c", -250_001)
    assert counters_reconcile() == 1
    assert _status(member, budget)["cost_spent"] == "0.000025"
    assert counters_reconcile() == 0


@pytest.mark.services
def test_it_keeps_usage_counted_while_reconcile_runs(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgets import counters
    from budgets.services import counters_reconcile
    from tokenmgr_project.core import redis as tm_redis

    budget = _budget()
    _post_batches(member, _tiny("before", 10, model="gpt-4o"))
    _seed(budget)
    tm_redis.client().hincrby(_counter(budget), "c", 999)  # a drift for reconcile to correct
    original = counters.ledger_units
    arrived: list[int] = []

    def ledger_units_while_usage_arrives(*args: Any) -> tuple[int, int, int]:
        # After reconcile noted the counter, before it corrects it: more usage is counted.
        if not arrived:
            arrived.append(1)
            _post_batches(member, _tiny("during", 20, model="gpt-4o"))
        return original(*args)

    monkeypatch.setattr(counters, "ledger_units", ledger_units_while_usage_arrives)
    assert counters_reconcile() == 1
    monkeypatch.setattr(counters, "ledger_units", original)

    assert arrived
    assert _ledger_cost() == Decimal("0.000075")
    assert _settled_status(member, budget)["cost_spent"] == "0.000075"


def _post_with_redis_down(
    monkeypatch: pytest.MonkeyPatch, persona: Persona, events: list[dict[str, Any]]
) -> None:
    """Post usage while every Redis call fails (the process falls back to direct writes), then
    let Redis answer again."""
    import redis

    from tokenmgr_project.core import redis as tm_redis

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis is down")

    with monkeypatch.context() as patched:
        patched.setattr(tm_redis, "run_script", unreachable)
        _post_batches(persona, events)
    tm_redis.reset()  # the breaker closes: Redis answers again


@pytest.mark.services
def test_it_keeps_usage_counted_while_a_missing_counter_is_seeded(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgets import counters
    from tokenmgr_project.core import redis as tm_redis

    budget = _budget()
    _post_batches(member, _tiny("old", 10, model="gpt-4o"))
    settle()
    tm_redis.client().delete(_counter(budget))  # e.g. a new period, or Redis restarted
    original = counters.ledger_units
    arrived: list[int] = []

    def ledger_units_while_usage_arrives(*args: Any) -> tuple[int, int, int]:
        # The seed has noted the buffer's position; usage arriving now adds to the new counter.
        if not arrived:
            arrived.append(1)
            _post_batches(member, _tiny("new", 20, model="gpt-4o"))
        return original(*args)

    monkeypatch.setattr(counters, "ledger_units", ledger_units_while_usage_arrives)
    _seed(budget)  # while usage arrives
    assert _status(member, budget)["cost_spent"] == "0.000075"
    monkeypatch.setattr(counters, "ledger_units", original)

    assert arrived
    assert _ledger_cost() == Decimal("0.000075")
    assert _status(member, budget)["cost_spent"] == "0.000075"


@pytest.mark.services
def test_it_counts_usage_written_while_redis_was_down_at_the_very_next_check(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = _budget(cost_limit=Decimal("0.002"))
    assert _check(member, input_tokens=1)["allowed"] is True  # the counter is seeded at 0

    _post_with_redis_down(
        monkeypatch, member, _tiny("down", 5000, model="gpt-4o-mini", input_tokens=3)
    )
    assert CounterRebuild.objects.exists()

    refused = _check(member, input_tokens=1)
    assert refused["allowed"] is False
    assert refused["blocking_budget"]["cost_remaining"] == "-0.00025"
    assert _status(member, budget)["cost_spent"] == pricing.money(_ledger_cost()) == "0.00225"
    assert not CounterRebuild.objects.exists()


@pytest.mark.services
def test_it_counts_usage_another_process_wrote_direct_after_its_rules_reload(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgets import counters
    from budgets import selectors as budget_selectors

    budget = _budget(cost_limit=Decimal("0.002"))
    assert _check(member, input_tokens=1)["allowed"] is True
    _post_with_redis_down(
        monkeypatch, member, _tiny("other", 5000, model="gpt-4o-mini", input_tokens=3)
    )
    counters.rebuild_due = False  # as if another process, cut off from Redis, wrote them
    budget_selectors.invalidate_rules()  # as the rules reload (every second) does

    assert _check(member, input_tokens=1)["allowed"] is False
    assert _status(member, budget)["cost_spent"] == "0.00225"


@pytest.mark.services
def test_it_rebuilds_counters_marked_by_direct_writes_in_the_worker(
    member: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgets import counters, tasks

    budget = _budget()
    _status(member, budget)  # seeded at 0
    _post_with_redis_down(monkeypatch, member, _tiny("w", 10, model="gpt-4o-mini", input_tokens=3))
    counters.rebuild_due = False  # written by another process

    assert tasks.counters_rebuild() == 1
    assert not CounterRebuild.objects.exists()
    assert tasks.counters_rebuild() == 0
    assert _status(member, budget)["cost_spent"] == "0.0000045"
