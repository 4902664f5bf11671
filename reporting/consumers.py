"""Websocket consumers (SPEC §8)."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from rest_framework.exceptions import AuthenticationFailed

from reporting.models import StatusCategory
from reporting.selectors import conversation_visible_to
from reporting.services import status_group
from tokenmgr_project.core.principal import Principal, principal_for_bearer
from usage.actions import VIEW_USAGE

CLOSE_FORBIDDEN = 4403


def _principal_for_scope(scope: dict[str, Any]) -> Principal | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            try:
                return principal_for_bearer(value.decode("latin1"))
            except AuthenticationFailed:
                return None
    user = scope.get("user")
    if user is not None and user.is_authenticated and user.is_staff:
        return Principal.for_staff(user)
    return None


def _joining_principal(scope: dict[str, Any], conversation_id: str) -> Principal | None:
    """Who may watch this conversation: a staff session needs the permission to view usage (as
    in the admin), a key the conversation inside its scope."""
    principal = _principal_for_scope(scope)
    if principal is None or (principal.is_staff and not principal.has_perm(VIEW_USAGE)):
        return None
    return principal if conversation_visible_to(principal, conversation_id) else None


class StatusConsumer(AsyncJsonWebsocketConsumer):
    """A conversation's live status. Send {"action": "subscribe"|"unsubscribe", "categories":
    [...]} or {"action": "subscriptions"}; receive {"type": "status.batch", ...} messages, only
    those published inside the client's own scope."""

    conversation_id = ""
    group = ""
    principal: Principal | None = None

    async def connect(self) -> None:
        self.conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        principal = await database_sync_to_async(_joining_principal)(
            self.scope, self.conversation_id
        )
        if principal is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.principal = principal
        self.categories = set(StatusCategory.values)
        # One group per viewer scope: the broadcaster sends a batch only to the groups whose
        # scope covers the publisher's.
        self.group = status_group(
            self.conversation_id, team_id=principal.team_id, project_id=principal.project_id
        )
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        action = content.get("action") if isinstance(content, dict) else None
        if action == "subscriptions":
            await self._send_subscriptions()
            return
        categories = content.get("categories") if isinstance(content, dict) else None
        if action not in ("subscribe", "unsubscribe") or not isinstance(categories, list):
            await self.send_json(
                {
                    "type": "error",
                    "message": 'Send {"action": "subscribe"|"unsubscribe", "categories": [...]} '
                    'or {"action": "subscriptions"}.',
                }
            )
            return
        unknown = sorted(str(c) for c in categories if c not in StatusCategory.values)
        if unknown:
            await self.send_json(
                {
                    "type": "error",
                    "message": f"Unknown categories: {', '.join(unknown)}.",
                    "known": StatusCategory.values,
                }
            )
            return
        if action == "subscribe":
            self.categories |= set(categories)
        else:
            self.categories -= set(categories)
        await self._send_subscriptions()

    async def _send_subscriptions(self) -> None:
        await self.send_json({"type": "subscriptions", "categories": sorted(self.categories)})

    async def status_batch(self, event: dict[str, Any]) -> None:
        team_id, project_id = event.get("team_id", ""), event.get("project_id", "")
        # The groups already separate scopes; this keeps a mis-addressed batch from leaking.
        if self.principal is None or not self.principal.covers(team_id, project_id):
            return
        if event["category"] in self.categories:
            await self.send_json(
                {
                    "type": "status.batch",
                    "conversation_id": event["conversation_id"],
                    "team_id": team_id,
                    "project_id": project_id,
                    "category": event["category"],
                    "messages": event["messages"],
                }
            )
