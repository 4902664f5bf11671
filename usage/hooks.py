"""How other apps take part in ingestion, without usage knowing them.

One accountant (budgets registers its own in BudgetsConfig.ready()) sees every batch of new
ledger rows before they are stored and says what storing them must also do: which counters to
increment and which reservation each row settles. In buffered mode that happens in the same
Redis script that claims the request ids and buffers the rows (core of "overspend is
impossible"); in direct mode in the same database transaction. After the store the accountant
hears what was counted (alert evaluation), and `usage_stored` tells anyone else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.dispatch import Signal

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
