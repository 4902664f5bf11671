from typing import Any

from django.apps import AppConfig


class BudgetsConfig(AppConfig):
    name = "budgets"
    verbose_name = "Budgets"

    def ready(self) -> None:
        # The budget actions join core.actions.REGISTRY (REST views and /signals); the tasks
        # module connects the services' after-commit signals; budgets take part in ingestion.
        from budgets import (
            actions,  # noqa: F401
            guard,  # noqa: F401
            overrides,  # noqa: F401
            tasks,  # noqa: F401
        )
        from budgets.enforcement import BudgetAccounting
        from usage import hooks

        hooks.register_accountant(BudgetAccounting())
        # Repricing rewrote ledger costs: correct the counters of the budgets they count on.
        hooks.costs_rewritten.connect(_costs_rewritten, dispatch_uid="budgets.counters")


def _costs_rewritten(sender: Any, *, spans: Any, **kwargs: Any) -> None:
    from budgets import services

    services.counters_costs_rewritten(spans=spans)
