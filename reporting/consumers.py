"""Websocket consumers (SPEC §8)."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from rest_framework.exceptions import AuthenticationFailed

from reporting import services
from reporting.models import StatusCategory
from reporting.selectors import conversation_visible_to
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


def _staff_viewer(scope: dict[str, Any]) -> Principal | None:
    """The dashboard stream: a staff session allowed to view usage; never an API key."""
    user = scope.get("user")
    if user is None or not user.is_authenticated or not user.is_active or not user.is_staff:
        return None
    principal = Principal.for_staff(user)
    return principal if principal.has_perm(VIEW_USAGE) else None


class _LiveConsumer(AsyncJsonWebsocketConsumer):
    """What both live sockets share: a frame that is not JSON, not an object, or an unknown
    action gets an error frame (the socket stays open); open sockets are counted for /health."""

    kind = ""
    counted = False
    ACTIONS: tuple[str, ...] = ()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self._error("Send text frames holding JSON objects.")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self._error("Not JSON: send a JSON object.")
            return
        if not isinstance(content, dict):
            await self._error("Send a JSON object.")
            return
        await self.receive_json(content)

    async def _error(self, message: str, **extra: Any) -> None:
        await self.send_json(
            {"type": "error", "message": message, "actions": list(self.ACTIONS), **extra}
        )

    async def _accept_counted(self) -> None:
        await self.accept()
        self.counted = True
        await database_sync_to_async(services.clients.change)(self.kind, 1)

    async def disconnect(self, code: int) -> None:
        if self.counted:
            self.counted = False
            await database_sync_to_async(services.clients.change)(self.kind, -1)


class StatusConsumer(_LiveConsumer):
    """A conversation's live status. Send {"action": "subscribe"|"unsubscribe", "categories":
    [...]} or {"action": "subscriptions"} (the seed's "subscribe_category" /
    "unsubscribe_category" with "category", and "get_subscriptions", work too); receive
    {"type": "status.batch", ...} messages, only those published inside the client's own scope."""

    kind = "status"
    ACTIONS = ("subscribe", "unsubscribe", "subscriptions")
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
        self.group = services.status_group(
            self.conversation_id, team_id=principal.team_id, project_id=principal.project_id
        )
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self._accept_counted()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        await super().disconnect(code)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        action = content.get("action")
        if action in ("subscriptions", "get_subscriptions"):
            await self._send_subscriptions()
            return
        categories = content.get("categories")
        if action in ("subscribe_category", "unsubscribe_category"):
            action, categories = action.removesuffix("_category"), [content.get("category")]
        if action not in ("subscribe", "unsubscribe"):
            await self._error(
                'Unknown action: send {"action": "subscribe"|"unsubscribe", "categories": [...]} '
                'or {"action": "subscriptions"}.'
            )
            return
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            await self._error('"categories" must be a list of category names.')
            return
        unknown = sorted(c for c in categories if c not in StatusCategory.values)
        if unknown:
            await self._error(
                f"Unknown categories: {', '.join(unknown)}.", known=StatusCategory.values
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
            await self.send_json({**event, "type": "status.batch"})


class DashboardConsumer(_LiveConsumer):
    """The staff dashboard stream: coalesced {"type": "dashboard.update", ...} frames (at most
    TOKENMGR_LIVE_DASHBOARD_RATE a second, however much usage arrives). Send {"action": "ping"}
    to get {"type": "pong"}."""

    kind = "dashboard"
    ACTIONS = ("ping",)

    async def connect(self) -> None:
        if await database_sync_to_async(_staff_viewer)(self.scope) is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.channel_layer.group_add(services.DASHBOARD_GROUP, self.channel_name)
        await self._accept_counted()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(services.DASHBOARD_GROUP, self.channel_name)
        await super().disconnect(code)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if content.get("action") == "ping":
            await self.send_json({"type": "pong"})
            return
        await self._error('Unknown action: the dashboard stream takes {"action": "ping"}.')

    async def dashboard_update(self, event: dict[str, Any]) -> None:
        await self.send_json(event)
