"""Models of the budgets app (SPEC §2); its capability adds them."""
