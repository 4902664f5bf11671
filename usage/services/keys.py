"""API keys: created (the raw key shown once) and revoked (caches cleared at once)."""

from __future__ import annotations

import secrets
from typing import Any

from django.utils import timezone

from tokenmgr_project.core.errors import ApiError, FieldErrors
from usage.auth import key_cache
from usage.models import ApiKey

KEY_PREFIX = "tm_"


def api_key_create(
    *, name: str, scope: str, team_id: str = "", project_id: str = "", created_by: Any = None
) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned here once and never stored."""
    errors: FieldErrors = {}
    if not name.strip():
        errors["name"] = ["This field is required."]
    if scope not in ApiKey.Scope.values:
        errors["scope"] = [f"Must be one of {', '.join(ApiKey.Scope.values)}."]
    if scope == ApiKey.Scope.TEAM and not team_id:
        errors["team_id"] = ["A team key needs a team_id."]
    if scope == ApiKey.Scope.PROJECT and not project_id:
        errors["project_id"] = ["A project key needs a project_id."]
    if scope == ApiKey.Scope.GLOBAL and (team_id or project_id):
        errors["scope"] = ["A global key has no team_id or project_id."]
    if errors:
        raise ApiError("Invalid API key.", fields=errors)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        name=name.strip(),
        prefix=raw[:10],
        key_hash=ApiKey.hash_key(raw),
        scope=scope,
        team_id=team_id,
        project_id=project_id,
        created_by=created_by,
    )
    return key, raw


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    key_cache.revoke(key.key_hash)
    return key
