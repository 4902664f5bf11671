"""Reporting actions, registered in the shared action registry (usage.actions)."""

from __future__ import annotations

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
    message: Annotated[str, Field(strict=True, min_length=1, max_length=2000)]
    data: dict[str, Any] = Field(default_factory=dict)
    # The scope the message belongs to; a scoped key's own team/project unless it names one
    # inside its scope (a team key: one of its projects). Global keys and staff: any, or none
    # for an organisation-wide message that only global viewers receive.
    team_id: Dim = ""
    project_id: Dim = ""


@action(
    "publish_status",
    "Publish a status message to a conversation's live channel.",
    # Publishing onto a feed is allowed to those who may watch it (the websocket's rule).
    staff_perm=VIEW_USAGE,
)
def publish_status(principal: Principal, data: Any) -> Outcome:
    params = validate(StatusIn, data)
    if "/" in params.conversation_id:
        raise ApiError("Invalid status.", fields={"conversation_id": ["Must not contain '/'."]})
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
        data=params.data,
        team_id=team_id,
        project_id=project_id,
    )
    return Outcome({"queued": True}, status=202)
