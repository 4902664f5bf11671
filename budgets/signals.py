"""What the budgets services announce after commit. budgets.tasks turns the first two into
Celery messages (connected when BudgetsConfig.ready() imports it), so no service imports a task."""

from django.dispatch import Signal

# budget_ids: evaluate these budgets' alerts shortly (alerts.alerts_evaluate_soon).
evaluations_wanted = Signal()
# delivery_ids: new pending alert deliveries to send.
deliveries_created = Signal()
# alerts: BudgetAlert rows just created (committed). The live dashboard shows them.
alerts_created = Signal()
# override, change ("requested" | "approved" | "rejected" | "expired"), after commit.
override_changed = Signal()
