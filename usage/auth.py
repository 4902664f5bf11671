"""API keys as principals: the cached lookup core.principal calls (registered in ready())."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication
from rest_framework.request import Request

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core import unavailable
from tokenmgr_project.core.principal import BEARER_CHALLENGE, Principal, principal_for_bearer
from usage.models import ApiKey

logger = logging.getLogger(__name__)

# A looked-up key is trusted for this long per process; revoking through the service clears the
# local copy at once, other processes notice within this many seconds.
KEY_CACHE_SECONDS = 5.0
# last_used_at is written at most this often per key and process: a write per request would cost
# more than the request.
LAST_USED_WRITE_SECONDS = 60.0


# While the database is unreachable a key is still accepted if it was validated recently: from
# a short-lived copy of its principal in Redis (written at each database lookup, so any process
# can use it) or else this process's own last lookup. The bound limits how long a key revoked
# while Redis was unreachable (so its copy could not be removed) may still pass during an outage.
KEY_OUTAGE_SECONDS = 600
# During an outage the database is tried again for a key at most this often per process.
KEY_OUTAGE_RETRY_SECONDS = 1.0
_REVOKED = b"revoked"
# The copy is written unless the key's revocation marker is there: a lookup that read the key
# just before it was revoked cannot bring the copy back after the revocation removed it.
_SHARE = """
if redis.call('GET', KEYS[1]) == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _shared_key(key_hash: str) -> str:
    return tm_redis.key("apikey", key_hash)


class _KeyCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key hash -> (trusted until, principal or None, when the database last answered for it)
        self._entries: dict[str, tuple[float, Principal | None, float]] = {}
        self._last_used: dict[int, float] = {}
        self.clock = time.monotonic  # tests move time instead of sleeping through TTLs

    def get(self, key_hash: str) -> Principal | None:
        now = self.clock()
        entry = self._entries.get(key_hash)
        if entry is not None and entry[0] > now:
            principal = entry[1]
        else:
            try:
                key = ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()
            except unavailable.DATABASE_ERRORS as exc:
                return self._last_known(key_hash, entry, now, exc)
            principal = principal_for_key(key) if key else None
            self._put(key_hash, (now + KEY_CACHE_SECONDS, principal, now))
            if principal is not None:
                _share(key_hash, principal)
        key_id = principal.key_id if principal is not None else None
        if key_id is not None and now - self._last_used.get(key_id, 0.0) > LAST_USED_WRITE_SECONDS:
            self._last_used[key_id] = now
            try:
                ApiKey.objects.filter(pk=key_id).update(last_used_at=timezone.now())
            except unavailable.DATABASE_ERRORS as exc:  # bookkeeping only: the request goes on
                unavailable.note(exc, "api key last_used_at")
        return principal

    def cached(self, key_hash: str) -> tuple[bool, Principal | None]:
        """(True, principal or None for unknown/revoked) when `get` would answer from this
        process's cache without touching the database, neither to look the key up nor to
        record its use; else (False, None). Nothing is recorded here: the request that then
        runs `get` does its bookkeeping (the event loop may not touch the database)."""
        now = self.clock()
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] <= now:
            return False, None
        principal = entry[1]
        key_id = principal.key_id if principal is not None else None
        if key_id is not None and now - self._last_used.get(key_id, 0.0) > LAST_USED_WRITE_SECONDS:
            return False, None
        return True, principal

    def _put(self, key_hash: str, entry: tuple[float, Principal | None, float]) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = entry

    def _last_known(
        self,
        key_hash: str,
        entry: tuple[float, Principal | None, float] | None,
        now: float,
        exc: Exception,
    ) -> Principal | None:
        """The database is unreachable: answer from what was last known about this key, or
        re-raise (the caller answers 503) when nothing recent is known. A refusal wins: this
        process's own "unknown or revoked", then Redis's revocation marker."""
        recent = entry is not None and now - entry[2] <= KEY_OUTAGE_SECONDS
        if recent and entry is not None and entry[1] is None:
            return None
        found, answered = _shared(key_hash)
        if answered:
            principal = found
        elif recent and entry is not None:
            principal = entry[1]
        else:
            raise exc
        # A copy from Redis is not this process's own validation: it never extends the bound.
        validated_at = entry[2] if entry is not None else float("-inf")
        self._put(key_hash, (now + KEY_OUTAGE_RETRY_SECONDS, principal, validated_at))
        return principal

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)

    def revoke(self, key_hash: str) -> None:
        """Drop every cached copy of a revoked key: this process's, and the shared one in Redis
        (replaced by a marker that outlives any copy, so an outage cannot bring the key back)."""
        now = self.clock()
        self._put(key_hash, (now + KEY_CACHE_SECONDS, None, now))
        if not tm_redis.configured():
            return
        try:
            tm_redis.client().set(_shared_key(key_hash), _REVOKED, ex=2 * KEY_OUTAGE_SECONDS)
        except tm_redis.REDIS_ERRORS:
            logger.warning(
                "Redis unreachable: the revoked key's shared copy expires within %d s",
                KEY_OUTAGE_SECONDS,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._last_used.clear()


def _share(key_hash: str, principal: Principal) -> None:
    """Keep a short-lived copy of a validated key's principal in Redis for outages."""
    if not tm_redis.available():
        return
    copy = json.dumps(
        [principal.scope, principal.team_id, principal.project_id, principal.key_id],
        separators=(",", ":"),
    )
    try:
        tm_redis.run_script(
            _SHARE, [_shared_key(key_hash)], [copy, KEY_OUTAGE_SECONDS, _REVOKED.decode()]
        )
    except tm_redis.REDIS_ERRORS:
        tm_redis.trip()


def _shared(key_hash: str) -> tuple[Principal | None, bool]:
    """(principal or None, whether Redis knew the key: a copy, or its revocation marker)."""
    if not tm_redis.available():
        return None, False
    try:
        raw: bytes | None = tm_redis.client().get(_shared_key(key_hash))  # type: ignore[assignment]
    except tm_redis.REDIS_ERRORS:
        tm_redis.trip()
        return None, False
    if raw is None:
        return None, False
    if raw == _REVOKED:
        return None, True
    scope, team_id, project_id, key_id = json.loads(raw)
    return Principal(scope=scope, team_id=team_id, project_id=project_id, key_id=key_id), True


key_cache = _KeyCache()


def principal_for_key(key: ApiKey) -> Principal:
    return Principal(scope=key.scope, team_id=key.team_id, project_id=key.project_id, key_id=key.pk)


def principal_for_raw_key(raw_key: str) -> Principal | None:
    """What core.principal.principal_for_bearer asks: the key's principal, None if unknown."""
    return key_cache.get(ApiKey.hash_key(raw_key))


def cached_principal_for_raw_key(raw_key: str) -> tuple[bool, Principal | None]:
    """The same from this process's cache alone (core.principal.cached_principal_for_bearer)."""
    return key_cache.cached(ApiKey.hash_key(raw_key))


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        return principal_for_bearer(header), None

    def authenticate_header(self, request: Request) -> str:
        return BEARER_CHALLENGE


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """Shows the Bearer scheme in /api/docs/ so "Authorize" takes an API key."""

    target_class = "usage.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "tokenmgr API key (tm_…)"}
