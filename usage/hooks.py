"""How other apps take part in ingestion, without usage knowing them.

One accountant (budgets registers its own in BudgetsConfig.ready()) sees every batch of new
ledger rows before they are stored and says what storing them must also do: which counters to
increment and which reservation each row settles. In buffered mode that happens in the same
Redis script that claims the request ids and buffers the rows (core of "overspend is
impossible"); in direct mode in the same database transaction. After the store the accountant
hears what was counted (alert evaluation), and `usage_stored` tells anyone else.
`costs_rewritten` tells whoever keeps totals of its own (budget counters) that repricing
changed the costs of stored rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.dispatch import Signal

from tokenmgr_project.core.errors import FieldErrors
from tokenmgr_project.core.principal import Principal
from usage.buffer import Counting
from usage.rows import Row


@dataclass(frozen=True, slots=True)
class Accounting:
    """What storing one batch of rows must also do, per row (in the rows' order)."""

    counting: list[Counting] | None = None  # None: nothing to count or settle
    reservations: list[str] = field(default_factory=list)  # reservation id per row, '' none
    open_reservations_key: str = ""  # the Redis set of open reservations ('' none)
    state: Any = None  # the accountant's own (e.g. which counters the rows touched)

    def reservation(self, index: int) -> str:
        return self.reservations[index] if self.reservations else ""


class Accountant(Protocol):
    def plan(self, rows: Sequence[Row]) -> Accounting:
        """Called before the store; must not write."""

    def unknown_reservations(self, reservation_ids: set[str], *, principal: Principal) -> set[str]:
        """Direct mode: of these ids, those the principal never reserved (refused)."""

    def stored_direct(
        self, accounting: Accounting, *, settled: dict[str, str], redis_configured: bool
    ) -> None:
        """Direct mode, inside the ledger insert's transaction: settle reservations
        (reservation id -> request id) and note counters that Redis missed."""

    def counted(self, accounting: Accounting) -> None:
        """After the store (committed or buffered): e.g. evaluate alerts soon."""


class _NoAccounting:
    def plan(self, rows: Sequence[Row]) -> Accounting:
        return Accounting()

    def unknown_reservations(self, reservation_ids: set[str], *, principal: Principal) -> set[str]:
        return set(reservation_ids)  # nobody takes reservations: every id is unknown

    def stored_direct(
        self, accounting: Accounting, *, settled: dict[str, str], redis_configured: bool
    ) -> None:
        return None

    def counted(self, accounting: Accounting) -> None:
        return None


_accountant: Accountant = _NoAccounting()


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the lineage refuses a row: field errors, and whether it conflicts with what is
    stored (a cycle: 409 for a single event) rather than being invalid in itself."""

    errors: FieldErrors
    conflict: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    """The lineage fields of a ledger row about to be inserted."""

    tenant: str
    request_id: str
    parent: str  # '' for a root
    root: str
    relationship: str
    depth: int | None  # None: its parent's depth was not known when it was accepted


class Lineage(Protocol):
    """How provenance takes part in ingestion (it registers itself in ready())."""

    def prepare(self, rows: list[Row], *, tenant: str) -> tuple[list[Row], list[Refusal | None]]:
        """Before the store, for one tenant's new rows (may read the database and note refused
        attempts, must not write the ledger): the rows with depth and root filled in where the
        parent is known, and per row the refusal (None keeps it)."""

    def storing(self, links: list[Link], *, new_only: bool = False) -> dict[int, tuple[int, str]]:
        """Inside the transaction that inserts these rows, just before they go in (from here to
        the commit, inserts of the same tenants wait for this one): record the rows' links and
        resolve what waited for them. Returns, by index, the (depth, root) a row is stored with
        where that differs from its own. Must not refuse a row. `new_only`: the insert fails
        if any of them is stored already (no need to look)."""


class _NoLineage:
    def prepare(self, rows: list[Row], *, tenant: str) -> tuple[list[Row], list[Refusal | None]]:
        return rows, [None for _row in rows]

    def storing(self, links: list[Link], *, new_only: bool = False) -> dict[int, tuple[int, str]]:
        return {}


_lineage: Lineage = _NoLineage()


def register_lineage(lineage: Lineage) -> None:
    global _lineage
    _lineage = lineage


def lineage() -> Lineage:
    return _lineage


def register_accountant(accountant: Accountant) -> None:
    global _accountant
    _accountant = accountant


def accountant() -> Accountant:
    return _accountant


# Sent after new usage is stored (buffered or committed): tenant, request_ids (the new ones) and
# rows (their ledger rows, usage.rows layout). Receivers run in the request: they must be quick.
usage_stored = Signal()
# Sent after a flush moved buffered usage into the ledger: inserted, dead (lines parked), at.
usage_flushed = Signal()
# The buffer reached buffer_size: a flush is wanted now (usage.tasks enqueues one).
flush_wanted = Signal()
# Sent inside the transaction that rewrote the costs of ledger rows (usage.services.usage_reprice),
# after the rewrite: `spans`, a list of (attribution, first, last): per attribution (the values of
# usage.services.reprice.SPAN_DIMENSIONS) every changed row of it occurred in [first, last].
# Receivers may write in that transaction; what leaves the database goes in on_commit.
costs_rewritten = Signal()
