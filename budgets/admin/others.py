"""The budgets app's other models in the admin: agent profiles, alert channels, and the alerts
and reservations (read-only: written by the services only)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from budgets.models import AgentProfile, AlertChannel, BudgetAlert, Reservation


@admin.register(AgentProfile)
class AgentProfileAdmin(admin.ModelAdmin):
    list_display = ("name", "model", "token_budget", "warning_threshold", "updated_at")
    search_fields = ("name", "model")


class AlertChannelForm(forms.ModelForm):
    class Meta:
        model = AlertChannel
        fields = ("kind", "target", "secret", "is_active")
        # Kept out of sight on screen; webhooks sign with it.
        widgets = {"secret": forms.PasswordInput(render_value=True)}


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    form = AlertChannelForm
    list_display = ("kind", "target", "is_active", "created_at")
    list_filter = ("kind", "is_active")


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BudgetAlert)
class BudgetAlertAdmin(_ReadOnlyAdmin):
    list_display = ("created_at", "budget", "kind", "metric", "threshold", "percent", "message")
    list_filter = ("kind", "metric")
    list_select_related = ("budget",)


@admin.register(Reservation)
class ReservationAdmin(_ReadOnlyAdmin):
    list_display = (
        "reservation_id",
        "status",
        "cost",
        "tokens",
        "team_id",
        "project_id",
        "created_at",
        "expires_at",
        "closed_at",
    )
    list_filter = ("status",)
    search_fields = ("=reservation_id",)
