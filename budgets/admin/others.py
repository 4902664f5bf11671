"""The budgets app's other models in the admin: agent profiles, alert channels, and the alerts
and reservations (read-only: written by the services only)."""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.contrib import admin
from django.utils.safestring import SafeString

from budgets.models import AgentProfile, AlertChannel, BudgetAlert, Reservation
from usage.admin.display import ReadOnlyAdmin, amount, clipped, usd, when


@admin.register(AgentProfile)
class AgentProfileAdmin(admin.ModelAdmin):
    list_display = ("name_label", "model_label", "token_budget", "warning_threshold", "updated")
    list_display_links = ("name_label",)
    search_fields = ("name", "model")

    @admin.display(description="name", ordering="name")
    def name_label(self, obj: AgentProfile) -> SafeString:
        return clipped(obj.name, 40)

    @admin.display(description="model", ordering="model")
    def model_label(self, obj: AgentProfile) -> SafeString:
        return clipped(obj.model, 40)

    @admin.display(description="updated", ordering="updated_at")
    def updated(self, obj: AgentProfile) -> str:
        return when(obj.updated_at)


class AlertChannelForm(forms.ModelForm):
    class Meta:
        model = AlertChannel
        fields = ("kind", "target", "secret", "is_active")
        # Kept out of sight on screen; webhooks sign with it.
        widgets = {"secret": forms.PasswordInput(render_value=True)}
        help_texts = {
            "kind": "Alerts reach a kind only while it is ticked under Usage, Manager settings, "
            "Alert channels.",
            "target": "Live status feed: the conversation id the alert is published to (viewers "
            "of that conversation whose scope covers the budget see it). Email: one address. "
            "Webhook: the http(s) URL the alert is POSTed to as JSON; redirects are not "
            "followed.",
            "secret": "Webhooks only, and required for them: each POST carries "
            "X-Tokenmgr-Timestamp and X-Tokenmgr-Signature, “sha256=” followed by the hex "
            "HMAC-SHA256, under this secret, of the timestamp, a dot and the raw body; the "
            "receiver checks it with the same secret. Leave empty for the status feed and "
            "email.",
        }


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    form = AlertChannelForm
    list_display = ("kind", "target_label", "is_active", "created")
    list_display_links = ("kind", "target_label")
    list_filter = ("kind", "is_active")

    @admin.display(description="target", ordering="target")
    def target_label(self, obj: AlertChannel) -> SafeString:
        return clipped(obj.target, 60)

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: AlertChannel) -> str:
        return when(obj.created_at)


def _metric_amount(alert: BudgetAlert, value: Decimal | None) -> str:
    if alert.metric == BudgetAlert.Metric.COST:
        return usd(value)
    return "-" if value is None else f"{value.normalize():,f} tokens"


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("created", "budget_name", "alert", "percent_label", "text")
    list_filter = ("kind", "metric")
    list_select_related = ("budget",)
    fields = (
        "budget",
        "period_start",
        "kind",
        "metric",
        "threshold_label",
        "spent_label",
        "limit_label",
        "percent_label",
        "message",
        "created_at",
    )
    readonly_fields = ("threshold_label", "spent_label", "limit_label", "percent_label")

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: BudgetAlert) -> str:
        return when(obj.created_at)

    @admin.display(description="budget", ordering="budget__name")
    def budget_name(self, obj: BudgetAlert) -> SafeString:
        return clipped(obj.budget.name, 30)

    @admin.display(description="alert", ordering="kind")
    def alert(self, obj: BudgetAlert) -> str:
        return f"{obj.get_kind_display().lower()}, {obj.metric}"

    @admin.display(description="message")
    def text(self, obj: BudgetAlert) -> SafeString:
        return clipped(obj.message, 50)

    @admin.display(description="threshold")
    def threshold_label(self, obj: BudgetAlert) -> str:
        return f"{amount(obj.threshold)} %"

    @admin.display(description="spent")
    def spent_label(self, obj: BudgetAlert) -> str:
        return _metric_amount(obj, obj.spent)

    @admin.display(description="limit")
    def limit_label(self, obj: BudgetAlert) -> str:
        return _metric_amount(obj, obj.limit)

    @admin.display(description="percent", ordering="percent")
    def percent_label(self, obj: BudgetAlert) -> str:
        return "-" if obj.percent is None else f"{amount(obj.percent)} %"


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    # What fits at 1366 px; created, closed and the settling request are on the row's page.
    list_display = ("reservation", "status", "cost_usd", "tokens", "holder", "expires")
    list_display_links = ("reservation",)
    list_filter = ("status",)
    search_fields = ("=reservation_id",)
    fields = (
        "reservation_id",
        "status",
        "cost_label",
        "tokens",
        "team_id",
        "project_id",
        "budgets",
        "created_at",
        "expires_at",
        "closed_at",
        "settled_request_id",
    )
    readonly_fields = ("cost_label",)

    @admin.display(description="reservation", ordering="reservation_id")
    def reservation(self, obj: Reservation) -> SafeString:
        return clipped(obj.reservation_id, 24)

    @admin.display(description="cost (USD)", ordering="cost")
    def cost_usd(self, obj: Reservation) -> str:
        return amount(obj.cost)

    @admin.display(description="cost")
    def cost_label(self, obj: Reservation) -> str:
        return usd(obj.cost)

    @admin.display(description="held for")
    def holder(self, obj: Reservation) -> SafeString:
        who = "/".join(part for part in (obj.team_id, obj.project_id) if part)
        return clipped(who or "organisation", 30)

    @admin.display(description="expires", ordering="expires_at")
    def expires(self, obj: Reservation) -> str:
        return when(obj.expires_at)
