"""Validated inputs of the provenance actions. Query strings arrive as text (numbers too), the
same actions from /signals as JSON."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from tokenmgr_project.core.errors import ApiError
from usage.models import RelationshipType
from usage.schemas import Instant, Strict

MAX_RELATIONSHIPS = 500
MAX_RANGE = timedelta(days=400)


def _request_id(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    return value


RequestId = Annotated[
    str, Field(strict=True, min_length=1, max_length=128), AfterValidator(_request_id)
]
Tenant = Annotated[str, Field(strict=True, min_length=1, max_length=300)]


class NodeIn(Strict):
    request_id: RequestId
    tenant: Tenant | None = Field(
        default=None, description="Whose request id (only when several of yours share it)."
    )


class RelationshipIn(Strict):
    from_request_id: RequestId = Field(description="The request that relates (e.g. the retry).")
    to_request_id: RequestId = Field(description="The request it relates to (the original).")
    type: RelationshipType


class RelationshipBatchIn(Strict):
    relationships: Annotated[
        list[RelationshipIn], Field(min_length=1, max_length=MAX_RELATIONSHIPS)
    ]


class LineageIn(NodeIn):
    format: Literal["json", "dot", "svg"] = "json"
    direction: Literal["both", "up", "down"] = "both"
    max_depth: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None, description="Levels below the request (down); ancestors are all shown."
    )


class RangeIn(Strict):
    """`since` defaults to 7 days before `until` (default now); at most 400 days."""

    since: Instant | None = None
    until: Instant | None = None

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        until = self.until or now
        since = self.since or until - timedelta(days=7)
        if since >= until:
            raise ApiError("Invalid time range.", fields={"until": ["Must be after since."]})
        if until - since > MAX_RANGE:
            raise ApiError(
                "Invalid time range.", fields={"since": ["The range may span at most 400 days."]}
            )
        return since, until


class WorkflowIn(RangeIn):
    workflow_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]


class TaskCostsIn(RangeIn):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50


class PatternsIn(RangeIn):
    window_seconds: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=3600, description="Duplicates: same input within this many seconds."
    )
    storm_min: Annotated[int, Field(ge=2, le=10_000)] = Field(
        default=3, description="Retry storm: at least this many retries of one request…"
    )
    storm_seconds: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=600, description="…within this many seconds."
    )
    depth_limit: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Deep chains: deeper than this (TOKENMGR_PROVENANCE_DEEP_CHAIN)."
    )
    limit: Annotated[int, Field(ge=1, le=1000)] = 20


class QuestionsIn(RangeIn):
    limit: Annotated[int, Field(ge=1, le=1000)] = 20
    retries: Literal["all", "once"] = Field(
        default="all", description="once: a retried operation counts once; the waste apart."
    )
