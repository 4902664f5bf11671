"""Who is calling, as one `Principal`: an API key (Bearer) or a staff session.

Keys live in the usage app; it registers how a raw key becomes a principal (`register_keys`) in
its AppConfig.ready(), so everything here (and every app) can authenticate without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from django.db.models import Model, QuerySet
from rest_framework import exceptions, permissions
from rest_framework.request import Request

from tokenmgr_project.core.errors import FieldErrors

GLOBAL, TEAM, PROJECT = "global", "team", "project"  # the key scopes (usage ApiKey.Scope values)
BEARER_CHALLENGE = 'Bearer realm="tokenmgr"'
M = TypeVar("M", bound=Model)


@dataclass(frozen=True, slots=True)
class Principal:
    scope: str  # GLOBAL, TEAM or PROJECT
    team_id: str = ""
    project_id: str = ""
    key_id: int | None = None
    user_id: int | None = None
    is_staff: bool = False
    # A staff user's Django permissions ("app_label.codename"); the API grants staff what the
    # admin would (core.actions.run checks them). A superuser holds every permission.
    permissions: frozenset[str] = frozenset()
    is_superuser: bool = False

    is_authenticated = True

    @property
    def is_global(self) -> bool:
        return self.scope == GLOBAL

    @property
    def label(self) -> str:
        if self.user_id is not None:
            return f"staff user #{self.user_id}"
        return f"api key #{self.key_id} ({self.scope})"

    @property
    def tenant(self) -> str:
        """Whose request_ids these are: idempotency is per tenant, a project key's, a team
        key's, or the organisation's (global keys and staff). README "How ingestion stays
        exact"."""
        if self.scope == PROJECT:
            return f"p:{self.team_id}/{self.project_id}"
        if self.scope == TEAM:
            return f"t:{self.team_id}"
        return "org"

    def has_perm(self, perm: str) -> bool:
        """A staff user's Django permission; keys are governed by their scope, not by these."""
        return self.is_superuser or perm in self.permissions

    def covers(self, team_id: str, project_id: str) -> bool:
        """The scope rule, for one row attributed to team/project: a team key covers its team,
        a project key its project, global keys and staff everything. `in_scope` is the same
        rule for a queryset; every gate uses one of the two."""
        return (not self.team_id or self.team_id == team_id) and (
            not self.project_id or self.project_id == project_id
        )

    @classmethod
    def for_staff(cls, user: Any) -> Principal:
        superuser = bool(user.is_active and user.is_superuser)
        return cls(
            scope=GLOBAL,
            user_id=user.pk,
            is_staff=True,
            # get_all_permissions() is cached on the user object: one query per request at most.
            permissions=frozenset() if superuser else frozenset(user.get_all_permissions()),
            is_superuser=superuser,
        )


def in_scope(rows: QuerySet[M], principal: Principal) -> QuerySet[M]:
    """The scope rule for rows with team_id / project_id columns: what `Principal.covers` says
    of one row, as a filter (a scoped key sees only its own team or project)."""
    if principal.team_id:
        rows = rows.filter(team_id=principal.team_id)
    if principal.project_id:
        rows = rows.filter(project_id=principal.project_id)
    return rows


def within_scope(
    principal: Principal, team_id: str, project_id: str, *, doing: str
) -> tuple[str, str, FieldErrors]:
    """The scope rule for what a caller writes or asks about: a scoped key's team/project fill
    in blanks, and any other team/project is an error naming the field ("This API key may only
    <doing> team 't1'."). Returns (team_id, project_id, errors)."""
    errors: FieldErrors = {}
    if principal.team_id:
        if team_id and team_id != principal.team_id:
            errors["team_id"] = [f"This API key may only {doing} team {principal.team_id!r}."]
        team_id = principal.team_id
    if principal.project_id:
        if project_id and project_id != principal.project_id:
            errors["project_id"] = [
                f"This API key may only {doing} project {principal.project_id!r}."
            ]
        project_id = principal.project_id
    return team_id, project_id, errors


class KeyLookup(Protocol):
    def __call__(self, raw_key: str) -> Principal | None: ...


class CachedKeyLookup(Protocol):
    def __call__(self, raw_key: str) -> tuple[bool, Principal | None]: ...


def _no_keys(raw_key: str) -> Principal | None:
    raise RuntimeError("no API key lookup registered (is the usage app installed?)")


def _no_cache(raw_key: str) -> tuple[bool, Principal | None]:
    return False, None


_keys: KeyLookup = _no_keys
_cached_keys: CachedKeyLookup = _no_cache


def register_keys(lookup: KeyLookup, cached: CachedKeyLookup = _no_cache) -> None:
    """How a raw API key becomes a principal (None: unknown or revoked), and the same from a
    cache alone ((False, None): not known without the database). Registered once."""
    global _keys, _cached_keys
    _keys, _cached_keys = lookup, cached


def _raw_key(header: str) -> str:
    kind, _, raw_key = header.partition(" ")
    if kind.lower() != "bearer" or not raw_key.strip():
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
    return raw_key.strip()


def _unknown_key() -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed("API key is unknown or revoked.")


def principal_for_bearer(header: str) -> Principal:
    """The principal of an `Authorization: Bearer <key>` header; AuthenticationFailed if none."""
    principal = _keys(_raw_key(header))
    if principal is None:
        raise _unknown_key()
    return principal


def cached_principal_for_bearer(header: str) -> Principal | None:
    """`principal_for_bearer` without the database: None when that is needed (the key not
    cached, or its last use due to be recorded)."""
    known, principal = _cached_keys(_raw_key(header))
    if not known:
        return None
    if principal is None:
        raise _unknown_key()
    return principal


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
