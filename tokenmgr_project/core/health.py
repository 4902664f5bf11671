"""The health-probe registry: `/health` shows what each app registers here (in its ready())."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Probe = Callable[[], Any]
_probes: dict[str, tuple[Probe, Any]] = {}


def register_probe(name: str, probe: Probe, *, unknown: Any = None) -> None:
    """`probe()` answers the `name` entry of the health body; `unknown` is shown instead when
    it cannot be asked (database down)."""
    _probes[name] = (probe, unknown)


def probe_results(*, database_up: bool) -> dict[str, Any]:
    """Every registered probe's answer. A probe that needs the database is only asked while it
    answers; its exception (the database went down meanwhile) propagates to the caller."""
    if not database_up:
        return {name: unknown for name, (_probe, unknown) in _probes.items()}
    return {name: probe() for name, (probe, _unknown) in _probes.items()}
