"""Recorded anomalies in the admin (read-only: written by the detection beat job,
reporting.anomalies.anomalies_record), newest first, open ones filterable."""

from __future__ import annotations

from django.contrib import admin
from django.utils.html import format_html_join
from django.utils.safestring import SafeString

from reporting.anomalies import anomaly_message
from reporting.models import Anomaly
from usage import rollups
from usage.admin.display import ReadOnlyAdmin, clipped, when

WHOLE = 10_000


def _amount(value: int, metric: str) -> str:
    return f"{rollups.units_text(value)} USD" if metric == "cost" else f"{value:,} tokens"


@admin.register(Anomaly)
class AnomalyAdmin(ReadOnlyAdmin):
    list_display = ("bucket_at", "series_label", "granularity", "actual", "expected_value", "score")
    list_display_links = ("bucket_at",)
    list_filter = ("status", "granularity", "dimension", "metric", "direction")
    search_fields = ("series", "team_id", "project_id")
    ordering = ("-bucket", "-score")
    list_per_page = 50
    fields = (
        "summary",
        "dimension",
        "series_text",
        "team_text",
        "project_text",
        "granularity",
        "metric",
        "bucket",
        "actual",
        "expected_value",
        "expected_range",
        "score",
        "direction",
        "driver_table",
        "status",
        "detected_at",
        "alerted_at",
        "resolved_at",
    )
    readonly_fields = fields

    @admin.display(description="hour or day", ordering="bucket")
    def bucket_at(self, obj: Anomaly) -> str:
        return when(obj.bucket)

    @admin.display(description="series", ordering="series")
    def series_label(self, obj: Anomaly) -> SafeString:
        state = "" if obj.status == Anomaly.Status.OPEN else " (resolved)"
        return clipped(f"{obj.dimension} = {obj.series}{state}", 80)

    # Ids have no spaces to wrap at: the page shows them whole, broken anywhere.
    @admin.display(description="series")
    def series_text(self, obj: Anomaly) -> SafeString:
        return clipped(obj.series, WHOLE)

    @admin.display(description="team")
    def team_text(self, obj: Anomaly) -> SafeString:
        return clipped(obj.team_id, WHOLE)

    @admin.display(description="project")
    def project_text(self, obj: Anomaly) -> SafeString:
        return clipped(obj.project_id, WHOLE)

    @admin.display(description="value")
    def actual(self, obj: Anomaly) -> str:
        return _amount(obj.value, obj.metric)

    @admin.display(description="expected")
    def expected_value(self, obj: Anomaly) -> str:
        return _amount(obj.expected, obj.metric)

    @admin.display(description="expected range")
    def expected_range(self, obj: Anomaly) -> str:
        return f"{_amount(obj.lower, obj.metric)} to {_amount(obj.upper, obj.metric)}"

    @admin.display(description="what happened")
    def summary(self, obj: Anomaly) -> SafeString:
        return clipped(anomaly_message(obj), WHOLE)

    @admin.display(description="drivers")
    def driver_table(self, obj: Anomaly) -> SafeString | str:
        if not obj.drivers:
            return "-"
        return format_html_join(
            "",
            '<div class="tm-clip">{} {}: {} against {} (excess {}, {} % of it)</div>',
            (
                (
                    d["dimension"],
                    d["value"],
                    d["actual"],
                    d["expected"],
                    d["excess"],
                    d.get("share_of_excess") or "-",
                )
                for d in obj.drivers
            ),
        )
