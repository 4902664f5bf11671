"""The usage admin: the ledger (read-only) and the flush's dead letters (`ledger`), API keys
(`keys`), price overrides beside the catalogue they override, with repricing past usage from one
(`prices`), the audit of repricings (`repricing`) and the manager settings page (`config`);
`display` holds how every app's admin shows amounts, moments and long ids.

Writes go through usage.services. Lists keep to the columns that fit a 1366 px screen beside the
navigation and the filters; the rest is on each row's page. Importing the modules registers them.
"""

from usage.admin import config, keys, ledger, prices, repricing  # noqa: F401
