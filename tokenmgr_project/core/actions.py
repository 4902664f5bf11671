"""The action registry: every operation as a named action with a validated input.

REST views, `POST /signals` and the hot path all call `run()`, so they can never disagree. Apps
register their actions with `@action(...)` from their own `actions` module (imported in ready()).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tokenmgr_project.core.errors import ApiError, pydantic_field_errors
from tokenmgr_project.core.principal import Principal


@dataclass(frozen=True, slots=True)
class Outcome:
    body: dict[str, Any]
    status: int = 200


Handler = Callable[[Principal, Any], Outcome]
# An action's cache-only first phase, for the event loop: its Outcome, or None ("needs the
# database") before any side effect, and the handler then runs in a thread (core.hotpath).
InlineHandler = Callable[[Principal, Any], Outcome | None]


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    handler: Handler
    description: str
    staff_or_global: bool
    staff_perms: tuple[str, ...]  # Django permissions a staff session needs (keys: their scope)
    inline: InlineHandler | None = None


REGISTRY: dict[str, Action] = {}
M = TypeVar("M", bound=BaseModel)

# staff_perm of an action that touches no model's rows (token counting, price quotes).
ANY_STAFF: tuple[str, ...] = ()


def action(
    name: str,
    description: str,
    *,
    staff_perm: str | tuple[str, ...],
    staff_or_global: bool = False,
    inline: InlineHandler | None = None,
) -> Callable[[Handler], Handler]:
    """Register an action. `staff_perm` is required, so no action can forget to say which Django
    permission(s) a staff session needs for it: the same ones the admin asks for. `inline`: its
    cache-only first phase (InlineHandler), for actions worth answering on the event loop."""

    def register(handler: Handler) -> Handler:
        if name in REGISTRY:
            raise RuntimeError(f"action {name!r} registered twice")
        perms = (staff_perm,) if isinstance(staff_perm, str) else tuple(staff_perm)
        REGISTRY[name] = Action(name, handler, description, staff_or_global, perms, inline)
        return handler

    return register


def require_staff_perms(principal: Principal, perms: tuple[str, ...], what: str) -> None:
    """403 naming what a staff session lacks; API keys pass (their scope governs them)."""
    if not principal.is_staff:
        return
    missing = [p for p in perms if not principal.has_perm(p)]
    if missing:
        raise ApiError(
            f"{what} needs the {' and '.join(missing)} permission"
            f"{'s' if len(missing) > 1 else ''}.",
            status_code=403,
            code="permission_denied",
            fields={"permission": missing},
        )


def run(name: str, principal: Principal, data: Any) -> Outcome:
    return _entry(name, principal).handler(principal, data)


def run_inline(name: str, principal: Principal, data: Any) -> Outcome | None:
    """The action's cache-only first phase (None: it needs the database; run `run` instead)."""
    entry = _entry(name, principal)
    return None if entry.inline is None else entry.inline(principal, data)


def _entry(name: str, principal: Principal) -> Action:
    entry = REGISTRY.get(name)
    if entry is None:
        known = sorted(REGISTRY)
        raise ApiError(
            f"Unknown action type {name!r}.",
            fields={"type": [f"Unknown action. Known actions: {', '.join(known)}."]},
        )
    if entry.staff_or_global and not principal.is_global:
        raise ApiError(
            f"{name} needs a global API key or a staff session.",
            status_code=403,
            code="permission_denied",
        )
    if principal.is_staff:  # keys (the hot path) skip the call
        require_staff_perms(principal, entry.staff_perms, name)
    return entry


NUL_MESSAGE = "Must not contain NUL characters (\\u0000): the database cannot store them."


def nul_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of the strings in `value` holding a NUL (PostgreSQL text refuses it)."""
    if isinstance(value, str):
        return [path or "non_field_errors"] if "\x00" in value else []
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    found: list[str] = []
    for key, child in items:
        where = f"{path}.{key}" if path else str(key)
        found += [where] if isinstance(key, str) and "\x00" in key else nul_fields(child, where)
    return found


def validate(schema: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError("Invalid input.", fields={"non_field_errors": ["Expected a JSON object."]})
    try:
        params = schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError("Invalid input.", fields=pydantic_field_errors(exc)) from None
    # Checked on every action's input (ingestion checks events itself, usage.schemas): a NUL
    # that reached a write or a lookup would be a 500 from the database.
    bad = nul_fields(data)
    if bad:
        raise ApiError("Invalid input.", fields={path: [NUL_MESSAGE] for path in bad})
    return params
