"""Reads of the reporting app."""

from __future__ import annotations

from tokenmgr_project.core.principal import Principal
from usage.selectors import usage_for_principal


def conversation_visible_to(principal: Principal, conversation_id: str) -> bool:
    """The one gate onto a conversation's live status, for publishing and for joining: global
    keys and staff see every conversation, a scoped key those with usage inside its scope."""
    if principal.is_global:
        return True
    return usage_for_principal(principal).filter(conversation_id=conversation_id).exists()
