"""The budgets admin: budgets with live utilisation, and the override approval queue.

Writes go through the services (budget_create/budget_update, override_request/approve/reject),
so the admin applies the same rules as the API. Deciding overrides is checked here, in each view
and action, and again in the service: hiding a button is not a permission check.

`budgets` holds the Budget admin (form, inlines), `overrides` the approval queue and its
confirmation views, `others` the remaining models. Importing them registers them.
"""

from budgets.admin import budgets, others, overrides  # noqa: F401
