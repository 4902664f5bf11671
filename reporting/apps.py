from django.apps import AppConfig


class ReportingConfig(AppConfig):
    name = "reporting"
    verbose_name = "Reporting"

    def ready(self) -> None:
        from budgets import deliveries
        from budgets.models import AlertChannel
        from reporting import (
            actions,  # noqa: F401  (registers the reporting actions)
            services,
        )
        from tokenmgr_project.core import health

        # /health: the status queue; alerts: the live status feed as a delivery channel.
        unknown = {"queued": None, "dropped": None}
        health.register_probe("status_messages", services.status_queue_stats, unknown=unknown)
        deliveries.register_sender(AlertChannel.Kind.STATUS, services.alert_status_send)
