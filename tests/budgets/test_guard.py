from __future__ import annotations

from typing import Any

import pytest

from budgets.models import AgentProfile
from tests.conftest import Persona, event, settle

pytestmark = pytest.mark.django_db

GUARD = "/api/v1/guard"


@pytest.fixture
def researcher(db: None) -> AgentProfile:
    return AgentProfile.objects.create(
        name="researcher", model="gpt-4o-mini", token_budget=20_000, warning_threshold=18_000
    )


def _guard(persona: Persona, **body: Any) -> dict[str, Any]:
    response = persona.client.post(GUARD, {"agent": "researcher", **body}, format="json")
    assert response.status_code == 200, response.json()
    return response.json()


def _spend(persona: Persona, request_id: str, tokens: int, **fields: Any) -> None:
    attribution = {"workflow_id": "run-1", "agent": "researcher", **fields}
    usage = event(request_id, input_tokens=tokens, output_tokens=0, **attribution)
    assert persona.client.post("/api/v1/usage", usage, format="json").status_code == 201


def test_it_allows_a_prompt_within_the_profile_budget(
    platform: Persona, researcher: AgentProfile
) -> None:
    body = _guard(platform, system_prompt="You are a researcher.", prompt="Find papers on RAG.")
    tokenized = platform.client.post(
        "/api/v1/tokenize",
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a researcher."},
                {"role": "user", "content": "Find papers on RAG."},
            ],
        },
        format="json",
    ).json()
    assert body["allowed"] is True
    assert body["reason"] is None
    assert (body["model"], body["encoding"], body["estimated"]) == (
        "gpt-4o-mini",
        "o200k_base",
        False,
    )
    assert body["prompt_tokens"] == tokenized["tokens"]
    assert body["context_window"] == 128_000
    assert body["warnings"] == []
    context = body["budget_context"]
    assert (context["budget"], context["used"], context["remaining"]) == (20_000, 0, 20_000)
    assert context["max_tokens_tier"] == "full"
    assert context["approaching_limit"] is False
    left = 20_000 - body["prompt_tokens"]
    assert context["text"] == (
        f"Token budget: {body['prompt_tokens']} of 20,000 used, this call included (0.1 %); "
        f"{left:,} left — use tools as needed."
    )


def test_it_rejects_a_prompt_over_the_budget(platform: Persona, researcher: AgentProfile) -> None:
    AgentProfile.objects.filter(pk=researcher.pk).update(token_budget=50, warning_threshold=40)
    body = _guard(platform, prompt="word " * 100)
    assert body["allowed"] is False
    assert body["reason"] == "over_budget"
    assert body["prompt_tokens"] > 50
    assert body["budget_context"]["used_after"] == body["prompt_tokens"]
    assert "50-token budget" in body["message"]


def test_it_counts_max_output_tokens_against_the_budget(
    platform: Persona, researcher: AgentProfile
) -> None:
    fits = _guard(platform, prompt="hi", max_output_tokens=19_000)
    too_much = _guard(platform, prompt="hi", max_output_tokens=20_000)
    assert fits["allowed"] is True
    assert fits["budget_context"]["used_after"] == fits["prompt_tokens"] + 19_000
    assert (too_much["allowed"], too_much["reason"]) == (False, "over_budget")


def test_it_rejects_a_prompt_over_the_context_window(platform: Persona) -> None:
    body = _guard(platform, agent="summarizer", model="gpt-4", prompt="hello " * 9_000)
    assert (body["allowed"], body["reason"]) == (False, "over_context_window")
    assert (body["context_window"], body["encoding"]) == (8_192, "cl100k_base")
    assert "8,192-token context window" in body["message"]


def test_it_rejects_a_reply_that_would_not_fit_the_context_window(
    platform: Persona, researcher: AgentProfile
) -> None:
    body = _guard(platform, prompt="hi", max_output_tokens=128_000, token_budget_override=10**6)
    assert (body["allowed"], body["reason"]) == (False, "over_context_window")


def test_it_warns_above_the_warning_threshold(platform: Persona, researcher: AgentProfile) -> None:
    _spend(platform, "w-1", 17_995)
    settle()
    body = _guard(platform, run_id="run-1", prompt="Summarise what you found so far, please.")
    assert body["allowed"] is True
    assert [w["code"] for w in body["warnings"]] == ["over_warning_threshold"]
    assert "18,000" in body["warnings"][0]["message"]


def test_it_applies_per_call_budget_and_threshold_overrides(
    platform: Persona, researcher: AgentProfile
) -> None:
    body = _guard(platform, prompt="hi", token_budget_override=5_000, warning_threshold_override=4)
    context = body["budget_context"]
    assert (context["budget"], context["warning_threshold"]) == (5_000, 4)
    assert [w["code"] for w in body["warnings"]] == ["over_warning_threshold"]
    tight = _guard(platform, prompt="word " * 20, token_budget_override=10)
    assert (tight["allowed"], tight["reason"]) == (False, "over_budget")


def test_it_keeps_the_profiles_threshold_share_when_the_budget_is_overridden(
    platform: Persona, researcher: AgentProfile
) -> None:
    body = _guard(platform, prompt="hi", token_budget_override=5_000)
    assert body["budget_context"]["warning_threshold"] == 4_500  # 18,000 / 20,000 = 90 %


def _prompt_tokens(persona: Persona, prompt: str) -> int:
    return int(_guard(persona, prompt=prompt, token_budget_override=10_000)["prompt_tokens"])


@pytest.mark.parametrize(
    ("used_after", "tier"),
    [
        (4_999, "full"),  # 50.01 % left
        (5_000, 2000),  # exactly 50 % left
        (8_000, 2000),  # exactly 20 % left
        (8_001, 1000),
        (9_500, 1000),  # exactly 5 % left
        (9_501, 500),
        (9_900, 500),  # exactly 1 % left
        (9_901, "stop"),
    ],
)
def test_it_suggests_the_tool_max_tokens_tier_at_the_specs_edges(
    platform: Persona, researcher: AgentProfile, used_after: int, tier: str | int
) -> None:
    prompt_tokens = _prompt_tokens(platform, "hi")
    _spend(platform, "t-1", used_after - prompt_tokens)
    settle()
    body = _guard(platform, run_id="run-1", prompt="hi", token_budget_override=10_000)
    assert body["budget_context"]["max_tokens_tier"] == tier
    assert body["budget_context"]["remaining_after"] == 10_000 - used_after


def test_it_sizes_the_tier_and_the_limit_flag_with_the_prompt_being_checked(
    platform: Persona, researcher: AgentProfile
) -> None:
    prompt = "word " * 400
    _spend(platform, "p-1", 898 - _prompt_tokens(platform, prompt))
    settle()
    body = _guard(platform, run_id="run-1", prompt=prompt, token_budget_override=1_000)
    context = body["budget_context"]
    assert (context["used_after"], context["remaining_after"]) == (898, 102)
    assert (context["approaching_limit"], context["max_tokens_tier"]) == (True, 1000)
    assert (context["approaching_limit_before"], context["max_tokens_tier_before"]) == (
        False,
        "full",
    )
    assert context["text"] == (
        "Token budget: 898 of 1,000 used, this call included (89.8 %); 102 left — "
        "keep tool outputs under 1,000 tokens and skip secondary analysis."
    )


def test_it_counts_the_calls_max_output_tokens_in_the_tier(
    platform: Persona, researcher: AgentProfile
) -> None:
    body = _guard(platform, prompt="hi", token_budget_override=10_000, max_output_tokens=9_000)
    context = body["budget_context"]
    assert (context["max_tokens_tier_before"], context["max_tokens_tier"]) == ("full", 1000)
    assert context["approaching_limit"] is True


def test_it_sums_the_runs_usage_so_far_from_the_ledger(
    platform: Persona, researcher: AgentProfile
) -> None:
    _spend(platform, "r-1", 10_000)
    _spend(platform, "r-2", 6_500)
    _spend(platform, "other-run", 3_000, workflow_id="run-2")
    _spend(platform, "other-agent", 3_000, agent="summarizer")
    settle()
    body = _guard(platform, run_id="run-1", prompt="hi")
    context = body["budget_context"]
    assert (context["used"], context["remaining"], context["percent"]) == (16_500, 3_500, "82.50")
    assert context["used_after"] == 16_500 + body["prompt_tokens"]
    assert context["approaching_limit"] is True
    assert context["max_tokens_tier"] == 1000


@pytest.mark.services
def test_usage_still_in_the_buffer_counts_for_the_run(
    platform: Persona, researcher: AgentProfile
) -> None:
    _spend(platform, "flushed", 4_000)
    settle()
    _spend(platform, "buffered", 6_000)  # not flushed: still in the Redis stream

    context = _guard(platform, run_id="run-1", prompt="hi")["budget_context"]

    assert context["used"] == 10_000


def test_it_rejects_once_the_run_has_spent_its_budget(
    platform: Persona, researcher: AgentProfile
) -> None:
    _spend(platform, "spent", 20_000)
    settle()
    body = _guard(platform, run_id="run-1", prompt="hi")
    assert (body["allowed"], body["reason"]) == (False, "over_budget")
    assert body["budget_context"]["max_tokens_tier"] == "stop"


def test_it_allows_an_agent_without_a_profile(platform: Persona) -> None:
    body = _guard(platform, agent="freelancer", model="gpt-4o", prompt="word " * 50_000)
    assert body["allowed"] is True
    assert body["profile"] is None
    assert body["budget_context"] is None


def test_a_scoped_key_only_counts_its_own_projects_usage(
    platform: Persona, member: Persona, outsider: Persona, researcher: AgentProfile
) -> None:
    _spend(member, "mine", 1_000)
    _spend(outsider, "theirs", 5_000)
    settle()
    assert _guard(member, run_id="run-1", prompt="hi")["budget_context"]["used"] == 1_000
    assert _guard(outsider, run_id="run-1", prompt="hi")["budget_context"]["used"] == 5_000
    assert _guard(platform, run_id="run-1", prompt="hi")["budget_context"]["used"] == 6_000


def test_it_labels_estimates_and_unknown_context_windows(platform: Persona) -> None:
    claude = _guard(platform, agent="a", model="claude-sonnet-4-5", prompt="hi")
    assert (claude["estimated"], claude["context_window"]) == (True, 200_000)
    assert [w["code"] for w in claude["warnings"]] == ["estimated_count"]
    gemini = _guard(platform, agent="a", model="gemini-2.5-pro", prompt="hi")
    assert (gemini["context_window"], gemini["context_window_source"]) == (1_048_576, "table")
    mystery = _guard(platform, agent="a", model="mystery-7b", prompt="hi")
    assert (mystery["context_window"], mystery["context_window_source"]) == (128_000, "default")
    assert "default_context_window" in [w["code"] for w in mystery["warnings"]]


def test_it_counts_messages_and_a_new_prompt_as_one_chat(
    platform: Persona, researcher: AgentProfile
) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    body = _guard(platform, system_prompt="Be brief.", messages=history, prompt="And now?")
    chat = [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "And now?"},
    ]
    tokenized = platform.client.post("/api/v1/tokenize", {"messages": chat}, format="json")
    assert body["prompt_tokens"] == tokenized.json()["tokens"]


def test_the_guard_is_reachable_as_a_signal(platform: Persona, researcher: AgentProfile) -> None:
    signal = {"type": "guard", "data": {"agent": "researcher", "prompt": "hi"}}
    response = platform.client.post("/api/v1/signals", signal, format="json")
    assert response.status_code == 200
    assert response.json()["result"]["budget_context"]["budget"] == 20_000


DROP = object()
WARN = "warning_threshold_override"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": 1}, "temperature"),
        ({"token_budget_override": -5}, "token_budget_override"),
        ({"warning_threshold_override": 0}, WARN),
        ({"warning_threshold_override": 20_001}, WARN),
        ({"token_budget_override": 100, "warning_threshold_override": 101}, WARN),
        ({"agent": DROP}, "agent"),
        ({"prompt": DROP}, "prompt"),
        ({"prompt": DROP, "messages": []}, "prompt"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"agent": "nobody"}, "model"),
        ({"agent": "nobody", "model": "gpt-4o", "warning_threshold_override": 5}, WARN),
        ({"max_output_tokens": "100"}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_field_errors(
    platform: Persona, researcher: AgentProfile, changes: dict[str, Any], field: str
) -> None:
    body = {"agent": "researcher", "prompt": "hi", **changes}
    body = {name: value for name, value in body.items() if value is not DROP}
    response = platform.client.post(GUARD, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_a_staff_session_gets_the_same_answer_as_a_key(
    admin: Persona, platform: Persona, researcher: AgentProfile
) -> None:
    _spend(platform, "s-1", 16_500)
    settle()
    by_key = _guard(platform, run_id="run-1", prompt="hi")
    by_session = _guard(admin, run_id="run-1", prompt="hi")
    assert by_session == by_key
    assert by_session["budget_context"]["percent"] == "82.50"
