"""Reporting actions, registered in the shared action registry (usage.actions)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from reporting import services
from reporting.models import StatusCategory
from reporting.selectors import conversation_visible_to
from usage.actions import Outcome, action, validate
from usage.auth import Principal
from usage.errors import ApiError
from usage.schemas import Strict


class StatusIn(Strict):
    conversation_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    category: StatusCategory
    message: Annotated[str, Field(strict=True, min_length=1, max_length=2000)]
    data: dict[str, Any] = Field(default_factory=dict)


@action("publish_status", "Publish a status message to a conversation's live channel.")
def publish_status(principal: Principal, data: Any) -> Outcome:
    params = validate(StatusIn, data)
    if "/" in params.conversation_id:
        raise ApiError("Invalid status.", fields={"conversation_id": ["Must not contain '/'."]})
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
    )
    return Outcome({"queued": True}, status=202)
