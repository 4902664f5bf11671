from django.apps import AppConfig


class ReportingConfig(AppConfig):
    name = "reporting"
    verbose_name = "Reporting"

    def ready(self) -> None:
        from django.urls import reverse

        from budgets import deliveries
        from budgets.models import AlertChannel
        from reporting import (
            actions,  # noqa: F401  (registers the reporting actions)
            live,  # noqa: F401  (connects the project's events to the live feeds)
            services,
        )
        from tokenmgr_project.core import health
        from usage.admin.display import register_conversation_url

        # /health: the status queue; alerts: the live status feed as a delivery channel.
        unknown = {"queued": None, "dropped": None, "connected_clients": None}
        health.register_probe("status_messages", services.status_queue_stats, unknown=unknown)
        deliveries.register_sender(AlertChannel.Kind.STATUS, services.alert_status_send)
        # Usage rows in the admin link to their conversation's live feed.
        register_conversation_url(
            lambda conversation_id: reverse("live:feed", args=[conversation_id])
        )
