"""Validated inputs of the budget actions."""

from __future__ import annotations

import zoneinfo
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from usage.schemas import MAX_TOKENS, Dim, Instant, Strict, TokenCount

Percent = Annotated[Decimal, Field(gt=0, le=100, max_digits=5, decimal_places=2)]
CostLimit = Annotated[Decimal, Field(gt=0, max_digits=20, decimal_places=6)]
TokenLimit = Annotated[int, Field(strict=True, gt=0, le=10**15)]
Scope = Literal["global", "team", "project", "user", "agent", "feature"]
Period = Literal["daily", "weekly", "monthly", "yearly", "lifetime"]
Name = Annotated[str, Field(strict=True, min_length=1, max_length=200)]


def _tz(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"Unknown time zone {value!r} (use an IANA name such as Europe/Berlin)."
        ) from None
    return value


def _storable(value: str | None) -> str | None:
    # Budgets are written by the services (the API and the admin) straight from these schemas.
    if value is not None and "\x00" in value:
        raise ValueError("Must not contain NUL characters (\\u0000).")
    return value


_TEXT_FIELDS = ("name", "scope_id", "team_id", "project_id")


def _thresholds(value: list[Decimal] | None) -> list[Decimal] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError("Thresholds must be distinct.")
    return value


class BudgetIn(Strict):
    """Also required: `scope_id` unless the scope is global; `cost_limit` and/or `token_limit`."""

    name: Name
    scope: Scope
    scope_id: Dim = ""
    team_id: Dim = ""
    project_id: Dim = ""
    period: Period = "monthly"
    timezone: Annotated[str, Field(strict=True, max_length=64)] = "UTC"
    cost_limit: CostLimit | None = None
    token_limit: TokenLimit | None = None
    enforcement: Literal["hard", "soft"] = "hard"
    thresholds: Annotated[list[Percent], Field(max_length=20)] | None = None
    is_active: Annotated[bool, Field(strict=True)] = True

    _check_tz = field_validator("timezone")(_tz)
    _check_thresholds = field_validator("thresholds")(_thresholds)
    _check_text = field_validator(*_TEXT_FIELDS)(_storable)


class BudgetPatchIn(Strict):
    name: Name | None = None
    scope: Scope | None = None
    scope_id: Dim | None = None
    team_id: Dim | None = None
    project_id: Dim | None = None
    period: Period | None = None
    timezone: Annotated[str, Field(strict=True, max_length=64)] | None = None
    cost_limit: CostLimit | None = None
    token_limit: TokenLimit | None = None
    enforcement: Literal["hard", "soft"] | None = None
    thresholds: Annotated[list[Percent], Field(max_length=20)] | None = None
    is_active: Annotated[bool, Field(strict=True)] | None = None

    _check_tz = field_validator("timezone")(_tz)
    _check_thresholds = field_validator("thresholds")(_thresholds)
    _check_text = field_validator(*_TEXT_FIELDS)(_storable)


class ChatMessage(Strict):
    role: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    content: Annotated[str, Field(strict=True, max_length=5_000_000)]
    name: Annotated[str, Field(strict=True, max_length=128)] | None = None


class BudgetCheckIn(Strict):
    """A request about to be made: its attribution, model and size. Also required: exactly one
    of `input_tokens`, `messages` or `prompt`."""

    provider: Annotated[str, Field(strict=True, max_length=64)] = ""
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    team_id: Dim = ""
    project_id: Dim = ""
    user_id: Dim = ""
    agent: Dim = ""
    feature: Dim = ""
    input_tokens: TokenCount | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=10_000)] | None = None
    prompt: Annotated[str, Field(strict=True, max_length=5_000_000)] | None = None
    max_output_tokens: TokenCount
    reserve: Annotated[bool, Field(strict=True)] = False
    # Optional: the budget the caller expects to hold against (refused if inactive or not
    # applicable). Every applicable budget is checked either way.
    budget_id: Annotated[int, Field(strict=True, gt=0)] | None = None
    reservation_ttl_seconds: Annotated[int, Field(strict=True, ge=1, le=86_400)] = 300


class ReservationCancelIn(Strict):
    reservation_id: Annotated[str, Field(strict=True, min_length=1, max_length=64)]


# --- alerts --------------------------------------------------------------------------------------

AlertKind = Literal["threshold", "exhausted", "resolved", "burn_rate", "rollover"]
MAX_ALERT_PAGE = 500
# A cursor is the id of the last alert of the previous page (newest first).
AlertCursor = Annotated[str, Field(strict=True, pattern=r"^[0-9]{1,19}$")]


def _iso_8601(value: Any) -> Any:
    # pydantic would also read "0" or "0.5" as a Unix time.
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("Use an ISO 8601 date-time.") from None
    return value


Since = Annotated[Instant, BeforeValidator(_iso_8601)]


class AlertListIn(Strict):
    """Query parameters of GET /alerts: text from a query string, numbers from /signals."""

    budget_id: Annotated[int, Field(gt=0, le=2**63 - 1)] | None = None
    kind: AlertKind | None = None
    since: Since | None = None
    cursor: AlertCursor | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_ALERT_PAGE)] = 100


# --- agent profiles ------------------------------------------------------------------------------

AgentName = Annotated[str, Field(strict=True, min_length=1, max_length=128)]
# PositiveIntegerField: PostgreSQL's integer.
ProfileTokens = Annotated[int, Field(strict=True, gt=0, le=2**31 - 1)]


class AgentProfileListIn(Strict):
    name: AgentName | None = None


class AgentProfileIn(Strict):
    """`warning_threshold`, when given, is at most `token_budget`."""

    name: AgentName = Field(description="The `agent` that POST /guard callers name.")
    model: AgentName = Field(description="The model the guard counts with by default.")
    token_budget: ProfileTokens = Field(description="Tokens one run may use.")
    warning_threshold: ProfileTokens | None = Field(
        None, description="Warn above this many tokens (null: 80 % of token_budget)."
    )

    _check_text = field_validator("name", "model")(_storable)


class AgentProfilePatchIn(Strict):
    """Only the fields given change; `warning_threshold: null` returns to the 80 % default."""

    # Absent: unchanged; null is refused (the schema says so: not nullable).
    name: AgentName = None  # type: ignore[assignment]
    model: AgentName = None  # type: ignore[assignment]
    token_budget: ProfileTokens = None  # type: ignore[assignment]
    warning_threshold: ProfileTokens | None = None

    _check_text = field_validator("name", "model")(_storable)


__all__ = [
    "MAX_TOKENS",
    "AgentProfileIn",
    "AgentProfileListIn",
    "AgentProfilePatchIn",
    "AlertListIn",
    "BudgetCheckIn",
    "BudgetIn",
    "BudgetPatchIn",
    "ReservationCancelIn",
]
