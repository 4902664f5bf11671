"""Savings recommendations in the admin: the rows the endpoint and the beat job store
(reporting.recommendations), filtered by status and kind, with their evidence, and dismiss /
accept actions that go through the API's service (who and when recorded; accepting stores the
baseline that realized savings are tracked against). Rows are computed, never edited."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from reporting import recommendations
from reporting.models import Recommendation
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import rollups
from usage.admin.display import EMPTY, amount, clipped, when


@admin.register(Recommendation)
class RecommendationAdmin(admin.ModelAdmin):
    # Dimension, who decided and the evidence are on each row's page: with them the list is
    # wider than 1366 px.
    list_display = (
        "kind",
        "target_text",
        "scope",
        "savings_a_month",
        "confidence",
        "status",
        "seen",
    )
    list_filter = ("status", "kind", "confidence", "dimension")
    search_fields = ("target", "key", "team_id", "project_id")
    ordering = ("-monthly_savings", "key")
    actions = ("dismiss_selected", "accept_selected")
    fields = (
        "key",
        "kind",
        "dimension",
        "target",
        "scope",
        "savings_a_month",
        "confidence",
        "action",
        "status",
        "decided_at",
        "decided_by",
        "note",
        "baseline",
        "first_seen",
        "last_seen",
        "evidence_json",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # computed from the ledger, never typed in

    @admin.display(description="target", ordering="target")
    def target_text(self, row: Recommendation) -> SafeString:
        return clipped(row.target, 60)

    @admin.display(description="scope")
    def scope(self, row: Recommendation) -> str:
        if row.project_id:
            label = f"{row.team_id}/{row.project_id}" if row.team_id else row.project_id
            return clipped(label, 40)
        return clipped(row.team_id, 40) if row.team_id else "organisation"

    @admin.display(description="a month (USD)", ordering="monthly_savings")
    def savings_a_month(self, row: Recommendation) -> str:
        return amount(row.monthly_savings)

    @admin.display(description="last seen", ordering="last_seen")
    def seen(self, row: Recommendation) -> str:
        stale = " (no longer seen)" if row.evidence.get("stale") else ""
        return f"{when(row.last_seen)}{stale}"

    @admin.display(description="baseline (USD a day)")
    def baseline(self, row: Recommendation) -> str:
        if row.baseline_daily_units is None:
            return EMPTY
        daily = rollups.units_text(row.baseline_daily_units)
        return f"{daily} over {row.baseline_days} days"

    @admin.display(description="evidence")
    def evidence_json(self, row: Recommendation) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(row.evidence, indent=2, sort_keys=True))

    @admin.action(description="Dismiss selected recommendations", permissions=["change"])
    def dismiss_selected(self, request: HttpRequest, queryset: QuerySet[Recommendation]) -> None:
        self._decide(request, queryset, Recommendation.Status.DISMISSED)

    @admin.action(description="Accept selected recommendations", permissions=["change"])
    def accept_selected(self, request: HttpRequest, queryset: QuerySet[Recommendation]) -> None:
        self._decide(request, queryset, Recommendation.Status.ACCEPTED)

    def _decide(
        self, request: HttpRequest, queryset: QuerySet[Recommendation], status: str
    ) -> None:
        principal = Principal.for_staff(request.user)
        done, refused = 0, []
        for row in queryset.order_by("pk"):
            try:
                recommendations.recommendation_decide(
                    principal=principal, rec_id=row.pk, status=status
                )
            except ApiError as exc:
                refused.append(f"{row}: {exc.message}")
                if exc.code == "optimization_disabled":
                    break
            else:
                done += 1
        if done:
            messages.success(request, f"{status.capitalize()} {done} recommendation(s).")
        for message in refused:
            messages.warning(request, message)
