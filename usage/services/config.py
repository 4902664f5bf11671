"""The manager settings: adjustable at run time, the environment's values are the defaults."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from tokenmgr_project.core import unavailable
from usage.models import ManagerConfig


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    buffer_size: int
    flush_interval: float
    retention_days: int
    alert_channels: list[str]
    optimization_enabled: bool


_config_cache: tuple[float, EffectiveConfig] | None = None
_CONFIG_TTL_SECONDS = 5.0
_CONFIG_RETRY_SECONDS = 1.0


def manager_config() -> EffectiveConfig:
    """The run-time settings, re-read from the database at most every few seconds."""
    global _config_cache
    now = time.monotonic()
    if _config_cache is not None and _config_cache[0] > now:
        return _config_cache[1]
    ttl = _CONFIG_TTL_SECONDS
    try:
        row = ManagerConfig.objects.filter(pk=1).first()
    except unavailable.DATABASE_ERRORS as exc:
        # Database down: keep the last settings read (the environment's before any), and ask
        # again in a second rather than on every call.
        unavailable.note(exc, "manager settings")
        row, ttl = None, _CONFIG_RETRY_SECONDS
        if _config_cache is not None:
            _config_cache = (now + ttl, _config_cache[1])
            return _config_cache[1]
    effective = EffectiveConfig(
        buffer_size=(row.buffer_size if row and row.buffer_size else settings.TOKENMGR_BUFFER_SIZE),
        flush_interval=(
            row.flush_interval if row and row.flush_interval else settings.TOKENMGR_FLUSH_INTERVAL
        ),
        retention_days=(
            row.retention_days
            if row and row.retention_days is not None
            else settings.TOKENMGR_RETENTION_DAYS
        ),
        alert_channels=list(row.alert_channels) if row else ["status"],
        optimization_enabled=row.optimization_enabled if row else True,
    )
    _config_cache = (now + ttl, effective)
    return effective


# Settings whose override can be removed, so the environment's value applies again.
RESETTABLE = ("buffer_size", "flush_interval", "retention_days")


def manager_config_update(*, defaults: Collection[str] = (), **changes: Any) -> EffectiveConfig:
    """Apply the given run-time settings (None leaves a setting alone); the settings named in
    `defaults` (of RESETTABLE) go back to the environment's value."""
    global _config_cache
    if unknown := set(defaults) - set(RESETTABLE):
        raise ValueError(f"no environment default for {sorted(unknown)}")
    changes = {k: v for k, v in changes.items() if v is not None}
    changes.update(dict.fromkeys(defaults))
    with transaction.atomic():
        row, _ = ManagerConfig.objects.select_for_update().get_or_create(pk=1)
        for name, value in changes.items():
            setattr(row, name, value)
        row.full_clean()
        row.save(update_fields=[*changes, "updated_at"] if changes else None)
    _config_cache = None
    return manager_config()
