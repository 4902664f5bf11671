"""Reporting actions, registered in the shared action registry (usage.actions)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field

from reporting import services
from reporting.models import StatusCategory
from reporting.selectors import conversation_visible_to
from tokenmgr_project.core.actions import Outcome, action, validate
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.actions import VIEW_USAGE
from usage.schemas import Dim, Strict


class StatusIn(Strict):
    conversation_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    category: StatusCategory
    # At most 4,096 bytes of UTF-8 (checked after validation: max_length counts characters).
    message: Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
    metadata: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] | None = Field(
        default=None, description="Deprecated name of `metadata` (one of the two, not both)."
    )
    agent_id: Dim = ""
    correlation_id: Dim = ""
    # The scope the message belongs to; a scoped key's own team/project unless it names one
    # inside its scope (a team key: one of its projects). Global keys and staff: any, or none
    # for an organisation-wide message that only global viewers receive.
    team_id: Dim = ""
    project_id: Dim = ""


def _size_errors(params: StatusIn) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    if len(params.message.encode()) > services.MESSAGE_MAX_BYTES:
        errors["message"] = [f"At most {services.MESSAGE_MAX_BYTES} bytes (UTF-8)."]
    if not params.message.strip():
        errors["message"] = ["Must not be blank."]
    if params.data is not None and params.metadata:
        errors["data"] = ["Send `metadata` only (`data` is its old name)."]
    metadata = params.metadata or params.data or {}
    if len(json.dumps(metadata, separators=(",", ":"))) > services.METADATA_MAX_BYTES:
        errors["metadata"] = [f"At most {services.METADATA_MAX_BYTES} bytes as JSON."]
    return errors


@action(
    "publish_status",
    "Publish a status message to a conversation's live channel.",
    # Publishing onto a feed is allowed to those who may watch it (the websocket's rule).
    staff_perm=VIEW_USAGE,
)
def publish_status(principal: Principal, data: Any) -> Outcome:
    params = validate(StatusIn, data)
    errors = _size_errors(params)
    if errors:
        raise ApiError("Invalid status.", fields=errors)
    team_id = params.team_id or principal.team_id
    project_id = params.project_id or principal.project_id
    if not principal.covers(team_id, project_id):
        field = "team_id" if principal.team_id and team_id != principal.team_id else "project_id"
        raise ApiError(
            "Not your scope.",
            status_code=403,
            code="permission_denied",
            fields={field: ["This key may only publish inside its own team/project."]},
        )
    if not conversation_visible_to(principal, params.conversation_id):
        raise ApiError(
            "Not your conversation.",
            status_code=403,
            code="permission_denied",
            fields={"conversation_id": ["This key has no usage in that conversation."]},
        )
    services.status_publish(
        conversation_id=params.conversation_id,
        category=params.category.value,
        message=params.message,
        metadata=params.metadata or params.data or {},
        agent_id=params.agent_id,
        correlation_id=params.correlation_id,
        team_id=team_id,
        project_id=project_id,
    )
    return Outcome({"queued": True}, status=202)
