"""Work a server process does once before it serves requests (apps register it in ready())."""

from __future__ import annotations

from collections.abc import Callable

_steps: list[Callable[[], object]] = []


def register(step: Callable[[], object]) -> None:
    _steps.append(step)


def run() -> None:
    for step in _steps:
        step()
