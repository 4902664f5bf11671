from django.apps import AppConfig


class BudgetsConfig(AppConfig):
    name = "budgets"
    verbose_name = "Budgets"

    def ready(self) -> None:
        # Registers the budget actions in usage.actions.REGISTRY (REST views and /signals).
        from budgets import (
            actions,  # noqa: F401
            guard,  # noqa: F401
            overrides,  # noqa: F401
        )
