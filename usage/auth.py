"""Who is calling: an API key (Bearer) or a staff session, as one `Principal`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from usage.models import ApiKey

# A looked-up key is trusted for this long per process; revoking through the service clears the
# local copy at once, other processes notice within this many seconds.
KEY_CACHE_SECONDS = 5.0
# last_used_at is written at most this often per key and process: a write per request would cost
# more than the request.
LAST_USED_WRITE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    scope: str  # ApiKey.Scope value
    team_id: str = ""
    project_id: str = ""
    key_id: int | None = None
    user_id: int | None = None
    is_staff: bool = False

    is_authenticated = True

    @property
    def is_global(self) -> bool:
        return self.scope == ApiKey.Scope.GLOBAL

    @property
    def label(self) -> str:
        if self.user_id is not None:
            return f"staff user #{self.user_id}"
        return f"api key #{self.key_id} ({self.scope})"

    @classmethod
    def for_key(cls, key: ApiKey) -> Principal:
        return cls(scope=key.scope, team_id=key.team_id, project_id=key.project_id, key_id=key.pk)

    @classmethod
    def for_staff(cls, user: Any) -> Principal:
        return cls(scope=ApiKey.Scope.GLOBAL, user_id=user.pk, is_staff=True)


class _KeyCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._last_used: dict[int, float] = {}

    def get(self, key_hash: str) -> Principal | None:
        now = time.monotonic()
        entry = self._entries.get(key_hash)
        if entry is not None and entry[0] > now:
            principal = entry[1]
        else:
            key = ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()
            principal = Principal.for_key(key) if key else None
            with self._lock:
                if len(self._entries) > 10_000:
                    self._entries.clear()
                self._entries[key_hash] = (now + KEY_CACHE_SECONDS, principal)
        key_id = principal.key_id if principal is not None else None
        if key_id is not None and now - self._last_used.get(key_id, 0.0) > LAST_USED_WRITE_SECONDS:
            self._last_used[key_id] = now
            ApiKey.objects.filter(pk=key_id).update(last_used_at=timezone.now())
        return principal

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._last_used.clear()


key_cache = _KeyCache()


BEARER_CHALLENGE = 'Bearer realm="tokenmgr"'


def principal_for_bearer(header: str) -> Principal:
    """The principal of an `Authorization: Bearer <key>` header; AuthenticationFailed if none."""
    kind, _, raw_key = header.partition(" ")
    if kind.lower() != "bearer" or not raw_key.strip():
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
    principal = key_cache.get(ApiKey.hash_key(raw_key.strip()))
    if principal is None:
        raise exceptions.AuthenticationFailed("API key is unknown or revoked.")
    return principal


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        return principal_for_bearer(header), None

    def authenticate_header(self, request: Request) -> str:
        return BEARER_CHALLENGE


class IsPrincipal(permissions.BasePermission):
    """An API key, or a logged-in staff user (browsable API)."""

    message = "An API key or a staff session is required."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if isinstance(user, Principal):
            return True
        return bool(user is not None and user.is_authenticated and user.is_staff)


def principal_for(request: Request) -> Principal:
    user = request.user
    if isinstance(user, Principal):
        return user
    if user is not None and user.is_authenticated and user.is_staff:
        return Principal.for_staff(user)
    raise exceptions.NotAuthenticated()


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """Shows the Bearer scheme in /api/docs/ so "Authorize" takes an API key."""

    target_class = "usage.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "tokenmgr API key (tm_…)"}
