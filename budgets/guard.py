"""Agent token guard (SPEC §5): may this prompt be sent, and how much of the run's budget is left?

Counting. The system prompt, the messages and the prompt are counted as the chat the model will
receive, in that order (system message, messages, then `prompt` as the last user message), with
the model's tiktoken encoding and OpenAI's chat framing (`usage.tokenizer`). Non-OpenAI models
are counted with o200k and flagged `estimated`.

Budget. The budget is per run: `used` is the ledger's total tokens (input + output) of the caller's
visible usage with `workflow_id == run_id` and `agent == agent`; no run_id means a fresh run (used
0). Usage still in the Redis buffer (not flushed yet) is counted too. A prompt is rejected
(`over_budget`) when `used + prompt_tokens + max_output_tokens` exceeds the budget, because the
reply spends the same budget; it is rejected (`over_context_window`) when `prompt_tokens +
max_output_tokens` exceeds the model's window, which holds the reply too. In the budget context
`used`, `remaining` and `percent` are the run *before* this call; `used_after`, `remaining_after`
and `percent_after` add this call's prompt and max_output_tokens. `approaching_limit`,
`max_tokens_tier` and `text` describe the run *with* this call, because the agent sizes this
call's tools from them (SPEC §5); `approaching_limit_before` and `max_tokens_tier_before` are the
same figures without it.
Rejected or not, the answer is 200: `allowed` and `reason` are what an agent
branches on; only malformed input is a 400.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, ClassVar, Literal

from django.db.models import Sum
from drf_spectacular.utils import extend_schema
from pydantic import BaseModel, Field
from rest_framework.request import Request
from rest_framework.response import Response

from budgets import counters
from budgets import selectors as budget_selectors
from budgets.models import AgentProfile
from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.actions import Outcome, action, validate
from tokenmgr_project.core.api import ActionView
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import pricing, selectors, tokenizer
from usage.rows import ROW_INDEX, Row
from usage.schemas import MAX_TOKENS, Strict

Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]
Name = Annotated[str, Field(strict=True, min_length=1, max_length=128)]
Text = Annotated[str, Field(strict=True, max_length=5_000_000)]

# Without a threshold the guard warns above 80 % of the budget, where `approaching_limit` flips.
DEFAULT_WARNING_PERCENT = 80
APPROACHING_PERCENT = 80
# genai-prices carries a context window for most models; this table covers the families it
# misses (e.g. gemini-2.5-pro) and model names it does not know (dated or routed aliases).
CONTEXT_WINDOWS: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(pattern), window)
    for pattern, window in (
        (r"(chatgpt-)?gpt-4o.*", 128_000),
        (r"gpt-4\.1.*", 1_047_576),
        (r"o[134](-.*)?", 200_000),
        (r"gpt-5.*", 400_000),
        (r"gpt-4-32k.*", 32_768),
        (r"gpt-4-turbo.*", 128_000),
        (r"gpt-4(-\d{4})?", 8_192),
        (r"gpt-3\.5-turbo.*", 16_385),
        (r"claude-.*", 200_000),
        (r"gemini-(1\.5|2(\.\d+)?)-.*", 1_048_576),
    )
)
# Unknown models get the smallest window of today's mainstream models, so the guard errs on the
# side of rejecting a prompt rather than letting the provider fail it.
DEFAULT_CONTEXT_WINDOW = 128_000

Tier = Literal["full", 2000, 1000, 500, "stop"]
# (least share of the budget left, in %, strictly-greater flag, tier), checked top down.
_TIERS: tuple[tuple[int, bool, Tier], ...] = (
    (50, True, "full"),
    (20, False, 2000),
    (5, False, 1000),
    (1, False, 500),
)
_TIER_ADVICE: dict[Tier, str] = {
    "full": "use tools as needed.",
    2000: "keep tool outputs under 2,000 tokens.",
    1000: "keep tool outputs under 1,000 tokens and skip secondary analysis.",
    500: "finish up: tool outputs under 500 tokens.",
    "stop": "stop calling tools and answer from what you have.",
}


class GuardIn(Strict):
    """Also required: `prompt` and/or `messages`; `model` unless the agent has a profile;
    `token_budget_override` with `warning_threshold_override` when it has none."""

    agent: Name
    model: Name | None = None
    system_prompt: Text = ""
    prompt: Text | None = None
    messages: list[dict[str, Annotated[str, Field(strict=True)]]] | None = None
    run_id: Annotated[str, Field(strict=True, max_length=128)] = ""
    max_output_tokens: Tokens | None = None
    token_budget_override: Tokens | None = None
    warning_threshold_override: Tokens | None = None


@dataclass(frozen=True, slots=True)
class BudgetContext:
    budget: int
    warning_threshold: int
    used: int
    remaining: int
    percent: Decimal
    approaching_limit: bool
    used_after: int
    remaining_after: int
    percent_after: Decimal
    approaching_limit_before: bool
    text: str
    max_tokens_tier: Tier
    max_tokens_tier_before: Tier

    def as_dict(self) -> dict[str, Any]:
        # Percentages as "82.50" strings, like GET /budgets/<id>/status.
        body = asdict(self)
        body["percent"] = f"{self.percent:.2f}"
        body["percent_after"] = f"{self.percent_after:.2f}"
        return body


@dataclass(frozen=True, slots=True)
class GuardResult:
    allowed: bool
    reason: Literal["over_budget", "over_context_window"] | None
    message: str
    agent: str
    profile: str | None
    model: str
    run_id: str
    prompt_tokens: int
    max_output_tokens: int | None
    encoding: str
    estimated: bool
    context_window: int
    context_window_source: Literal["catalogue", "table", "default"]
    budget_context: BudgetContext | None
    warnings: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["budget_context"] = self.budget_context.as_dict() if self.budget_context else None
        return body


# --- response body (STYLE 6b) --------------------------------------------------------------------

Percent = Annotated[str, Field(description="A percentage with two decimals.")]
# Tier as two enums: one enum of mixed types is not something OpenAPI 3.0 tools read.
TierOut = Literal["full", "stop"] | Literal[2000, 1000, 500]


class GuardWarningOut(BaseModel):
    code: Literal["estimated_count", "default_context_window", "over_warning_threshold"]
    message: str


class BudgetContextOut(BaseModel):
    """The run's token budget: `used`/`remaining`/`percent` before this call, `*_after` with its
    prompt and max_output_tokens; `approaching_limit`, `max_tokens_tier` and `text` count this
    call (the `*_before` fields do not)."""

    budget: int
    warning_threshold: int
    used: int = Field(description="Tokens the run used before this call.")
    remaining: int
    percent: Percent
    approaching_limit: bool = Field(description="Over 80 % of the budget, this call included.")
    used_after: int = Field(description="`used` plus this call's prompt and max_output_tokens.")
    remaining_after: int
    percent_after: Percent
    approaching_limit_before: bool = Field(description="Over 80 % before this call.")
    text: str = Field(description="One line for the agent's system prompt, this call included.")
    max_tokens_tier: TierOut = Field(
        description="Tool max_tokens from the share left with this call: >50 % full, 20-50 % "
        "2000, 5-20 % 1000, 1-5 % 500, under 1 % stop."
    )
    max_tokens_tier_before: TierOut


class GuardOut(BaseModel):
    allowed: bool
    reason: Literal["over_budget", "over_context_window"] | None
    message: str
    agent: str
    profile: str | None = Field(description="The agent profile applied, if the agent has one.")
    model: str
    run_id: str
    prompt_tokens: int
    max_output_tokens: int | None
    encoding: str
    estimated: bool = Field(description="Counted with a stand-in encoding (non-OpenAI model).")
    context_window: int
    context_window_source: Literal["catalogue", "table", "default"]
    budget_context: BudgetContextOut | None = Field(
        description="Absent (null) when the agent has no profile and no token_budget_override."
    )
    warnings: list[GuardWarningOut]


def context_window_for(model: str) -> tuple[int, Literal["catalogue", "table", "default"]]:
    """The model's context window (prompt + reply) and where the number comes from."""
    bare = model.rsplit("/", maxsplit=1)[-1].lower()
    for name in dict.fromkeys((model, bare)):
        window = pricing.context_window("", name)
        if window:
            return window, "catalogue"
    for pattern, window in CONTEXT_WINDOWS:
        if pattern.fullmatch(bare):
            return window, "table"
    return DEFAULT_CONTEXT_WINDOW, "default"


def count_prompt(data: GuardIn, encoding_name: str) -> int:
    chat: list[dict[str, str]] = []
    if data.system_prompt:
        chat.append({"role": "system", "content": data.system_prompt})
    chat.extend(data.messages or [])
    if data.prompt is not None:
        chat.append({"role": "user", "content": data.prompt})
    return tokenizer.count_messages(chat, tokenizer.get_encoding(encoding_name))


def run_tokens_used(*, principal: Principal, agent: str, run_id: str) -> int:
    """Total tokens of the run so far: the ledger plus usage still in the Redis buffer (an agent
    calls in quick succession); a scoped key sums only its own usage."""
    if not run_id:
        return 0
    totals = (
        selectors.usage_for_principal(principal)
        .filter(workflow_id=run_id, agent=agent)
        .aggregate(tokens=Sum("total_tokens"))
    )
    used = int(totals["tokens"] or 0)
    if tm_redis.available():
        col = ROW_INDEX

        def mine(row: Row) -> bool:
            return (
                row[col["workflow_id"]] == run_id
                and row[col["agent"]] == agent
                and principal.covers(row[col["team_id"]], row[col["project_id"]])
            )

        try:
            pending = counters.unflushed(mine)
        except tm_redis.REDIS_ERRORS:
            tm_redis.trip()
            pending = []
        used += sum(counters.row_spend(row)[1] for row in pending)
    return used


def max_tokens_tier(*, budget: int, remaining: int) -> Tier:
    # Integer comparisons keep the SPEC's edges exact (50 % left is already the 2000 tier).
    share = remaining * 100
    for percent, strictly, tier in _TIERS:
        if share > percent * budget or (not strictly and share == percent * budget):
            return tier
    return "stop"


def _percent(part: int, whole: int) -> Decimal:
    return budget_selectors.percent(part, whole, rounding=ROUND_HALF_UP) or Decimal(0)


def _percent_text(value: Decimal) -> str:
    return f"{value:,.1f}".removesuffix(".0")


def _approaching(*, budget: int, used: int) -> bool:
    return used * 100 > APPROACHING_PERCENT * budget


def budget_context(
    *, budget: int, warning_threshold: int, used: int, this_call: int
) -> BudgetContext:
    """The run's budget before and with this call (`this_call`: prompt + max output tokens)."""
    remaining = max(budget - used, 0)
    used_after = used + this_call
    remaining_after = max(budget - used_after, 0)
    percent_after = _percent(used_after, budget)
    tier = max_tokens_tier(budget=budget, remaining=remaining_after)
    text = (
        f"Token budget: {used_after:,} of {budget:,} used, this call included "
        f"({_percent_text(percent_after)} %); {remaining_after:,} left — {_TIER_ADVICE[tier]}"
    )
    return BudgetContext(
        budget=budget,
        warning_threshold=warning_threshold,
        used=used,
        remaining=remaining,
        percent=_percent(used, budget),
        approaching_limit=_approaching(budget=budget, used=used_after),
        used_after=used_after,
        remaining_after=remaining_after,
        percent_after=percent_after,
        approaching_limit_before=_approaching(budget=budget, used=used),
        text=text,
        max_tokens_tier=tier,
        max_tokens_tier_before=max_tokens_tier(budget=budget, remaining=remaining),
    )


def _limits(data: GuardIn, profile: AgentProfile | None) -> tuple[int, int] | None:
    """(budget, warning threshold) after per-call overrides, or None when the agent has none."""
    budget = data.token_budget_override or (profile.token_budget if profile else None)
    if budget is None:
        if data.warning_threshold_override is not None:
            raise ApiError(
                "Invalid input.",
                fields={
                    "warning_threshold_override": [
                        "The agent has no profile: give token_budget_override too."
                    ]
                },
            )
        return None
    if data.warning_threshold_override is not None:
        threshold = data.warning_threshold_override
        if threshold > budget:
            raise ApiError(
                "Invalid input.",
                fields={
                    "warning_threshold_override": [f"Must be at most the token budget ({budget})."]
                },
            )
    elif profile is not None and profile.warning_threshold is not None:
        # A profile's threshold belongs to its budget: an overridden budget keeps the same share.
        threshold = profile.warning_threshold * budget // profile.token_budget
    else:
        threshold = budget * DEFAULT_WARNING_PERCENT // 100
    return budget, threshold


def guard_check(*, principal: Principal, data: GuardIn) -> GuardResult:
    """Count the prompt and check it against the run's budget and the model's context window.

    Reads the agent's profile and one SQL sum over the ledger; writes nothing.
    """
    if data.prompt is None and not data.messages:
        raise ApiError("Invalid input.", fields={"prompt": ["Give prompt and/or messages."]})
    profile = AgentProfile.objects.filter(name=data.agent).first()
    model = data.model or (profile.model if profile else None)
    if not model:
        raise ApiError(
            "Invalid input.",
            fields={"model": ["Required when the agent has no profile."]},
        )
    limits = _limits(data, profile)
    choice = tokenizer.encoding_for_model(model)
    prompt_tokens = count_prompt(data, choice.name)
    this_call = prompt_tokens + (data.max_output_tokens or 0)
    window, window_source = context_window_for(model)

    warnings: list[dict[str, str]] = []
    if choice.estimated:
        warnings.append(
            {
                "code": "estimated_count",
                "message": f"{model} is not an OpenAI model; counted with {choice.name}.",
            }
        )
    if window_source == "default":
        warnings.append(
            {
                "code": "default_context_window",
                "message": f"Context window of {model} unknown; assumed {window:,} tokens.",
            }
        )

    context = None
    if limits is not None:
        budget, threshold = limits
        used = run_tokens_used(principal=principal, agent=data.agent, run_id=data.run_id)
        context = budget_context(
            budget=budget, warning_threshold=threshold, used=used, this_call=this_call
        )

    reason: Literal["over_budget", "over_context_window"] | None = None
    if this_call > window:
        reason = "over_context_window"
        message = (
            f"{this_call:,} tokens (prompt + max output) exceed the {window:,}-token context "
            f"window of {model}."
        )
    elif context is not None and context.used_after > context.budget:
        reason = "over_budget"
        message = (
            f"{this_call:,} tokens exceed the {context.remaining:,} left of the run's "
            f"{context.budget:,}-token budget."
        )
    else:
        message = f"Allowed: {prompt_tokens:,} prompt tokens."
        if context is not None and context.used_after > context.warning_threshold:
            warnings.append(
                {
                    "code": "over_warning_threshold",
                    "message": (
                        f"The run reaches {context.used_after:,} tokens, above the warning "
                        f"threshold of {context.warning_threshold:,}."
                    ),
                }
            )

    return GuardResult(
        allowed=reason is None,
        reason=reason,
        message=message,
        agent=data.agent,
        profile=profile.name if profile else None,
        model=model,
        run_id=data.run_id,
        prompt_tokens=prompt_tokens,
        max_output_tokens=data.max_output_tokens,
        encoding=choice.name,
        estimated=choice.estimated,
        context_window=window,
        context_window_source=window_source,
        budget_context=context,
        warnings=warnings,
    )


@action(
    "guard",
    "Check an agent's prompt against its per-run token budget and context window.",
    # It reads the agent's profile and the run's usage so far.
    staff_perm=("budgets.view_agentprofile", "usage.view_tokenusage"),
)
def guard(principal: Principal, data: Any) -> Outcome:
    params = validate(GuardIn, data)
    return Outcome(guard_check(principal=principal, data=params).as_dict())


class GuardApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "guard"}
    fast_post = True  # agents call it before every LLM call

    @extend_schema(request=GuardIn, responses={200: GuardOut}, summary="Agent token guard")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))
