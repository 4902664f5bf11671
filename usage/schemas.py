"""Validated input schemas for the usage actions (pydantic: the ingestion path must stay cheap).

`validate_event` turns one raw usage event into a normalised `UsageEvent` or field-level errors.
Token convention (the catalogue's): `input_tokens` is the whole prompt, cache reads and cache
writes included; Anthropic's raw usage reports them apart and is summed accordingly.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from django.conf import settings
from django.utils import timezone
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from tokenmgr_project.core.errors import FieldErrors, pydantic_field_errors
from usage.models import RelationshipType

MAX_TOKENS = 10**9
MAX_METADATA_BYTES = 16 * 1024
EARLIEST_OCCURRED_AT = datetime(2015, 1, 1, tzinfo=UTC)

TokenCount = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS)]
Dim = Annotated[str, Field(strict=True, max_length=128)]


def _iso_text(value: Any) -> Any:
    # JSON carries date-times as ISO 8601 text (what the OpenAPI schema says); pydantic's lax
    # mode would also read a number, or a string of digits such as "0", as a Unix time.
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError("Use an ISO 8601 date-time string.")


def _storable_instant(value: datetime) -> datetime:
    # PostgreSQL's timestamptz refuses UTC offsets of 16 hours or more, and a time near the end
    # of the calendar in its own offset may not exist in UTC (nor read back into Python).
    offset = value.utcoffset()
    if offset is None:
        return value  # naive: read as UTC
    if abs(offset) >= timedelta(hours=16):
        raise ValueError("The UTC offset must be within ±15:59.")
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("Out of range: use a year from 1 to 9999 in UTC.") from None
    return value


# A date-time in a request body: ISO 8601 text only. `Instant` is also one the database stores.
IsoDateTime = Annotated[datetime, BeforeValidator(_iso_text)]
Instant = Annotated[datetime, BeforeValidator(_iso_text), AfterValidator(_storable_instant)]


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def _no_control_chars(value: str) -> str:
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


RequestRef = Annotated[str, Field(strict=True, max_length=128)]
MAX_SYSTEM_CONTEXT_BYTES = 4 * 1024
MAX_PROVENANCE_TEXT = 1_000_000


class ProvenanceIn(Strict):
    """How this request came about. `relationship` (default `triggered_by`) is the type of its
    link to `parent_request_id`; a root request names no parent. Text sent as `input_text` /
    `output_text` is hashed (SHA-256) into `input_hash` / `output_hash` and stored only where
    TOKENMGR_PROVENANCE_STORE_TEXT allows."""

    parent_request_id: RequestRef = ""
    root_request_id: RequestRef = ""
    relationship: RelationshipType | Literal[""] = ""
    intent: Annotated[str, Field(strict=True, max_length=256)] = ""
    agent_type: Annotated[str, Field(strict=True, max_length=128)] = ""
    workflow_step: Annotated[str, Field(strict=True, max_length=128)] = ""
    system_context: dict[str, Any] = Field(
        default_factory=dict, description=f"At most {MAX_SYSTEM_CONTEXT_BYTES} bytes as JSON."
    )
    input_hash: Annotated[str, Field(strict=True, max_length=128)] = ""
    input_text: Annotated[str, Field(strict=True, max_length=MAX_PROVENANCE_TEXT)] | None = None
    output_hash: Annotated[str, Field(strict=True, max_length=128)] = ""
    output_text: Annotated[str, Field(strict=True, max_length=MAX_PROVENANCE_TEXT)] | None = None
    cache_hit: Annotated[bool, Field(strict=True)] | None = None


class UsageEventIn(Strict):
    """Also required: `input_tokens` and/or `output_tokens` (or their aliases), or `usage`."""

    request_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    provider: Annotated[str, Field(strict=True, max_length=64)] = ""
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    input_tokens: TokenCount | None = None
    prompt_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None
    cache_read_tokens: TokenCount | None = None
    cache_write_tokens: TokenCount | None = None
    usage: dict[str, Any] | None = None
    occurred_at: IsoDateTime | None = None
    team_id: Dim = ""
    project_id: Dim = ""
    user_id: Dim = ""
    feature: Dim = ""
    agent: Dim = ""
    task_type: Dim = ""
    conversation_id: Dim = ""
    workflow_id: Dim = ""
    status: Literal["success", "error"] = "success"
    error_type: Dim = ""
    latency_ms: Annotated[int, Field(strict=True, ge=0, le=86_400_000)] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    reservation_id: Annotated[str, Field(strict=True, max_length=64)] = ""
    estimated: Annotated[bool, Field(strict=True)] = False
    provenance: ProvenanceIn | None = None

    @field_validator("request_id")
    @classmethod
    def _request_id_printable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return _no_control_chars(value)


class UsageBatchIn(Strict):
    """Documents POST /usage/batch; items are validated one by one by `validate_event`."""

    events: Annotated[list[UsageEventIn], Field(min_length=1, max_length=1000)]


@dataclass(slots=True)
class UsageEvent:
    """A validated, normalised usage event (attribution may still be filled in from the key)."""

    request_id: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    occurred_at: datetime
    team_id: str
    project_id: str
    user_id: str
    feature: str
    agent: str
    task_type: str
    conversation_id: str
    workflow_id: str
    status: str
    error_type: str
    latency_ms: int | None
    metadata: dict[str, Any]
    reservation_id: str
    estimated: bool
    parent_request_id: str
    root_request_id: str
    relationship: str
    intent: str
    input_hash: str
    output_hash: str
    cache_hit: bool | None
    agent_type: str = ""
    workflow_step: str = ""
    system_context: dict[str, Any] = field(default_factory=dict)
    input_text: str = ""
    output_text: str = ""


def _raw_count(raw: dict[str, Any], path: tuple[str, ...], errors: FieldErrors) -> int:
    value: Any = raw
    for part in path:
        if not isinstance(value, dict):
            return 0
        value = value.get(part)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        errors.setdefault("usage." + ".".join(path), []).append(
            f"Must be an integer between 0 and {MAX_TOKENS}."
        )
        return 0
    return value


def tokens_from_raw_usage(
    raw: dict[str, Any], provider: str, errors: FieldErrors
) -> tuple[int, int, int, int]:
    """(input incl. cache, output, cache_read, cache_write) from an OpenAI or Anthropic `usage`."""
    anthropic = provider.lower() == "anthropic" or (
        "cache_creation_input_tokens" in raw or "cache_read_input_tokens" in raw
    )
    if anthropic:
        uncached = _raw_count(raw, ("input_tokens",), errors)
        cache_write = _raw_count(raw, ("cache_creation_input_tokens",), errors)
        cache_read = _raw_count(raw, ("cache_read_input_tokens",), errors)
        output = _raw_count(raw, ("output_tokens",), errors)
        return uncached + cache_write + cache_read, output, cache_read, cache_write
    if "prompt_tokens" in raw or "completion_tokens" in raw:  # OpenAI Chat Completions
        prompt = _raw_count(raw, ("prompt_tokens",), errors)
        output = _raw_count(raw, ("completion_tokens",), errors)
        cache_read = _raw_count(raw, ("prompt_tokens_details", "cached_tokens"), errors)
        return prompt, output, cache_read, 0
    if "input_tokens" in raw or "output_tokens" in raw:  # OpenAI Responses API
        prompt = _raw_count(raw, ("input_tokens",), errors)
        output = _raw_count(raw, ("output_tokens",), errors)
        cache_read = _raw_count(raw, ("input_tokens_details", "cached_tokens"), errors)
        return prompt, output, cache_read, 0
    errors.setdefault("usage", []).append(
        "Not an OpenAI (prompt_tokens/completion_tokens or input_tokens/output_tokens) "
        "or Anthropic usage object."
    )
    return 0, 0, 0, 0


# PostgreSQL's timestamptz refuses a UTC offset of 16 hours or more.
_MAX_UTC_OFFSET = timedelta(hours=16)
_NUL_MESSAGE = "Must not contain NUL (\\u0000) characters: the database cannot store them."
_JSON_MESSAGE = (
    "Must not contain NUL (\\u0000) characters or lone surrogates (\\ud800-\\udfff): "
    "the database cannot store them."
)
# Every text field that is stored, by name: checked in one pass (see _text_errors).
_TEXT_FIELDS = (
    "request_id", "provider", "model", "team_id", "project_id", "user_id", "feature", "agent",
    "task_type", "conversation_id", "workflow_id", "error_type", "reservation_id",
)  # fmt: skip
_PROVENANCE_TEXT = (
    "parent_request_id", "root_request_id", "intent", "agent_type", "workflow_step", "input_hash",
    "output_hash", "input_text", "output_text",
)  # fmt: skip
# Request ids a link names: what request_id itself must be (printable, no control characters).
_PROVENANCE_IDS = ("parent_request_id", "root_request_id")


_text_values = operator.attrgetter(*_TEXT_FIELDS)


def _text_errors(data: UsageEventIn, errors: FieldErrors) -> None:
    """NUL in a stored text field (PostgreSQL text cannot hold it). Lone surrogates never get
    here: pydantic's strict str refuses them. One join and one search in the common case."""
    values: tuple[str, ...] = _text_values(data)
    if "\x00" in "".join(values):
        for name, value in zip(_TEXT_FIELDS, values, strict=True):
            if "\x00" in value:
                errors.setdefault(name, []).append(_NUL_MESSAGE)
    prov = data.provenance
    if prov is not None:
        for name in _PROVENANCE_TEXT:
            value = getattr(prov, name)
            if value and "\x00" in value:
                errors.setdefault("provenance." + name, []).append(_NUL_MESSAGE)


# Built once: json.dumps with any option builds a new encoder per call.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_UNICODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _json_text(value: Any) -> tuple[str, bool]:
    """(the compact, ASCII-escaped JSON of `value`, whether PostgreSQL's jsonb can store it).

    jsonb refuses the escape \\u0000 and a lone surrogate escape. The common case costs the dump
    and two searches; only JSON holding "\\u0000" or "\\ud" (also written for a non-BMP
    character such as an emoji, a valid pair, or by a literal backslash) is looked at closely.
    """
    text = _JSON.encode(value)
    if "\\u0000" in text and _has_nul(value):
        return text, False
    if "\\ud" in text:
        try:
            _JSON_UNICODE.encode(value).encode()
        except UnicodeEncodeError:
            return text, False
    return text, True


def _usage_storable(raw: dict[str, Any]) -> bool:
    try:
        return _json_text(raw)[1]
    except ValueError:  # NaN or Infinity: refused below as a count that is not an integer
        return True


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _pick_alias(
    a: int | None, b: int | None, names: tuple[str, str], errors: FieldErrors
) -> int | None:
    if a is not None and b is not None:
        errors.setdefault(names[1], []).append(f"Give {names[0]} or {names[1]}, not both.")
    return a if a is not None else b


def _text_hash(given: str, text: str | None, which: str, errors: FieldErrors) -> str:
    """The content hash: the one given, or the SHA-256 of the text sent (never both)."""
    if text is None:
        return given
    if given:
        errors.setdefault(f"provenance.{which}_text", []).append(
            f"Give {which}_hash or {which}_text, not both."
        )
    try:
        return hashlib.sha256(text.encode()).hexdigest()
    except UnicodeEncodeError:  # a lone surrogate: no bytes to hash
        errors.setdefault(f"provenance.{which}_text", []).append(_JSON_MESSAGE)
        return ""


def _link_errors(request_id: str, prov: ProvenanceIn, errors: FieldErrors) -> None:
    for name in _PROVENANCE_IDS:
        value = getattr(prov, name)
        if value and (not value.strip() or _CONTROL_CHARS.search(value)):
            errors.setdefault(f"provenance.{name}", []).append(
                "Must be a request id: printable, not blank, without control characters."
            )
    if prov.parent_request_id and prov.parent_request_id == request_id:
        errors.setdefault("provenance.parent_request_id", []).append(
            "A request cannot be its own parent."
        )
    if prov.relationship and not prov.parent_request_id:
        errors.setdefault("provenance.relationship", []).append(
            "Names the link to parent_request_id: give parent_request_id too."
        )
    if prov.system_context:
        try:
            text, storable = _json_text(prov.system_context)
        except ValueError:
            text, storable = "", False
        if not storable:
            errors.setdefault("provenance.system_context", []).append(_JSON_MESSAGE)
        elif len(text) > MAX_SYSTEM_CONTEXT_BYTES:
            errors.setdefault("provenance.system_context", []).append(
                f"Is larger than {MAX_SYSTEM_CONTEXT_BYTES} bytes."
            )


def validate_event(
    raw: Any, *, now: datetime | None = None
) -> tuple[UsageEvent | None, FieldErrors]:
    if not isinstance(raw, dict):
        return None, {"non_field_errors": ["Each usage event must be a JSON object."]}
    try:
        data = UsageEventIn.model_validate(raw)
    except ValidationError as exc:
        return None, pydantic_field_errors(exc)

    errors: FieldErrors = {}
    input_tokens = _pick_alias(
        data.input_tokens, data.prompt_tokens, ("input_tokens", "prompt_tokens"), errors
    )
    output_tokens = _pick_alias(
        data.output_tokens, data.completion_tokens, ("output_tokens", "completion_tokens"), errors
    )
    cache_read = data.cache_read_tokens
    cache_write = data.cache_write_tokens
    _text_errors(data, errors)
    if data.usage is not None and not _usage_storable(data.usage):
        errors.setdefault("usage", []).append(_JSON_MESSAGE)
    if data.usage is not None:
        if any(v is not None for v in (input_tokens, output_tokens, cache_read, cache_write)):
            errors.setdefault("usage", []).append(
                "Give a raw usage object or token fields, not both."
            )
        else:
            input_tokens, output_tokens, cache_read, cache_write = tokens_from_raw_usage(
                data.usage, data.provider, errors
            )
    elif input_tokens is None and output_tokens is None:
        errors.setdefault("input_tokens", []).append(
            "Give input_tokens/output_tokens (or prompt_tokens/completion_tokens) "
            "or a raw usage object."
        )
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    cache_read = cache_read or 0
    cache_write = cache_write or 0
    if cache_read + cache_write > input_tokens:
        errors.setdefault("cache_read_tokens", []).append(
            "cache_read_tokens + cache_write_tokens exceed input_tokens; input_tokens counts the "
            "whole prompt, cached tokens included."
        )

    now = now or timezone.now()
    occurred_at = data.occurred_at
    if occurred_at is None:
        occurred_at = now
    else:
        if occurred_at.tzinfo is None:
            occurred_at = occurred_at.replace(tzinfo=UTC)
        offset = occurred_at.utcoffset()
        if offset is not None and abs(offset) >= _MAX_UTC_OFFSET:
            errors.setdefault("occurred_at", []).append(
                "The UTC offset must be within -15:59 and +15:59."
            )
        if occurred_at > now + timedelta(seconds=settings.TOKENMGR_MAX_FUTURE_SKEW):
            errors.setdefault("occurred_at", []).append("Is in the future.")
        elif occurred_at < EARLIEST_OCCURRED_AT:
            errors.setdefault("occurred_at", []).append("Is before 2015-01-01.")

    if data.metadata:
        try:
            text, storable = _json_text(data.metadata)
        except ValueError:
            errors.setdefault("metadata", []).append("Must be JSON without NaN or Infinity.")
        else:
            if not storable:
                errors.setdefault("metadata", []).append(_JSON_MESSAGE)
            elif len(text) > MAX_METADATA_BYTES:
                errors.setdefault("metadata", []).append(
                    f"Is larger than {MAX_METADATA_BYTES} bytes."
                )

    prov = data.provenance or ProvenanceIn()
    input_hash = _text_hash(prov.input_hash, prov.input_text, "input", errors)
    output_hash = _text_hash(prov.output_hash, prov.output_text, "output", errors)
    _link_errors(data.request_id, prov, errors)

    if errors:
        return None, errors
    return (
        UsageEvent(
            request_id=data.request_id,
            provider=data.provider.lower(),
            model=data.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            occurred_at=occurred_at,
            team_id=data.team_id,
            project_id=data.project_id,
            user_id=data.user_id,
            feature=data.feature,
            agent=data.agent,
            task_type=data.task_type,
            conversation_id=data.conversation_id,
            workflow_id=data.workflow_id,
            status=data.status,
            error_type=data.error_type,
            latency_ms=data.latency_ms,
            metadata=data.metadata,
            reservation_id=data.reservation_id,
            estimated=data.estimated,
            parent_request_id=prov.parent_request_id,
            root_request_id=prov.root_request_id,
            relationship=prov.relationship.value if prov.relationship else "",
            intent=prov.intent,
            input_hash=input_hash,
            output_hash=output_hash,
            cache_hit=prov.cache_hit,
            agent_type=prov.agent_type,
            workflow_step=prov.workflow_step,
            system_context=prov.system_context,
            input_text=(prov.input_text or "") if settings.TOKENMGR_PROVENANCE_STORE_TEXT else "",
            output_text=(prov.output_text or "") if settings.TOKENMGR_PROVENANCE_STORE_TEXT else "",
        ),
        {},
    )


# --- other action inputs -----------------------------------------------------------------------


class TokenizeIn(Strict):
    """Required: exactly one of `text` or `messages`."""

    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)] = "gpt-4o"
    text: Annotated[str, Field(strict=True, max_length=5_000_000)] | None = None
    messages: list[dict[str, Annotated[str, Field(strict=True)]]] | None = None


class TruncateIn(Strict):
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)] = "gpt-4o"
    text: Annotated[str, Field(strict=True, max_length=5_000_000)]
    max_tokens: Annotated[int, Field(strict=True, ge=0, le=10_000_000)]


class QuoteIn(Strict):
    provider: Annotated[str, Field(strict=True, max_length=64)] = ""
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    at: Instant | None = None


class ModelRef(Strict):
    provider: Annotated[str, Field(strict=True, max_length=64)] = ""
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)]


class CompareIn(Strict):
    models: Annotated[
        list[ModelRef | Annotated[str, Field(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=100),
    ]
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    at: Instant | None = None


PricePerMtok = Annotated[Decimal, Field(ge=0, le=10_000_000, max_digits=14, decimal_places=6)]


class PriceOverrideIn(Strict):
    provider: Annotated[str, Field(strict=True, max_length=64)] = ""
    model: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    input_per_mtok: PricePerMtok
    output_per_mtok: PricePerMtok
    cache_read_per_mtok: PricePerMtok | None = None
    cache_write_per_mtok: PricePerMtok | None = None
    effective_from: Instant | None = None
    note: Annotated[str, Field(strict=True, max_length=200)] = ""


class ConfigureIn(Strict):
    buffer_size: Annotated[int, Field(strict=True, ge=1, le=100_000)] | None = None
    flush_interval: Annotated[float, Field(ge=0.5, le=3600)] | None = None
    retention_days: Annotated[int, Field(strict=True, ge=0, le=36_500)] | None = None
    alert_channels: list[Literal["status", "email", "webhook"]] | None = None
    optimization_enabled: Annotated[bool, Field(strict=True)] | None = None


class RepriceIn(Strict):
    """A range of past usage to price again with the prices in effect when it occurred."""

    since: Instant = Field(description="Inclusive. A time without an offset is UTC.")
    until: Instant = Field(description="Exclusive; after since, at most 366 days later.")
    provider: Annotated[str, Field(strict=True, max_length=64)] = Field(
        "", description="Only this provider's usage (any case); empty: every provider."
    )
    model: Annotated[str, Field(strict=True, max_length=128)] = Field(
        "", description="Only this model's usage (any case); empty: every model."
    )
    apply: Annotated[bool, Field(strict=True)] = Field(
        False, description="Rewrite the costs; false (default): a dry run that changes nothing."
    )
