"""The reporting admin: provider bills and their reconciliation (`admin_bills`), recorded
anomalies (`admin_anomalies`), savings recommendations and their decisions
(`admin_recommendations`). Importing the modules registers them."""

from reporting import admin_anomalies, admin_bills, admin_recommendations  # noqa: F401
