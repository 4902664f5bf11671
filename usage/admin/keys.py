"""API keys: created through usage.services.api_key_create, shown once, revoked in bulk."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from usage import services
from usage.admin.display import clipped, service_errors, when
from usage.models import ApiKey


class ApiKeyForm(forms.ModelForm):
    """A new key: least privilege (one project) unless chosen otherwise; the service's rules."""

    scope = forms.ChoiceField(
        choices=ApiKey.Scope.choices,
        initial=ApiKey.Scope.PROJECT,
        widget=forms.RadioSelect,
        help_text="Global: every team's usage, budgets and the admin signals. Team: one team "
        "(give its team id). Project: one project of one team (give both ids).",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "scope", "team_id", "project_id")
        help_texts = {
            "name": "Who or what uses the key, e.g. “ranker service (production)”.",
            "team_id": "Required for a team or project key; empty for a global key.",
            "project_id": "Required for a project key.",
        }

    def clean(self) -> dict[str, Any]:
        data = self.cleaned_data
        if all(name in data for name in self.Meta.fields):
            errors = service_errors(
                lambda: services.api_key_create(**{n: data[n] for n in self.Meta.fields})
            )
            for name, msgs in errors.items():
                self.add_error(name if name in self.fields else None, msgs)
        return data

    def _post_clean(self) -> None:
        # The service's rules above are the validation; the constraints would only repeat them
        # as "Constraint … is violated".
        opts = self._meta
        self.instance = forms.models.construct_instance(
            self, self.instance, opts.fields, opts.exclude
        )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ("name_label", "prefix", "scope_label", "created", "last_used", "status")
    list_display_links = ("name_label",)
    list_filter = ("scope",)
    search_fields = ("name", "prefix", "team_id", "project_id")
    actions = ("revoke",)
    fields = ("name", "scope", "team_id", "project_id")

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> tuple[str, ...]:
        if obj is None:
            return ()
        return (
            "prefix",
            "scope",
            "team_id",
            "project_id",
            "created_at",
            "created_by",
            "last_used_at",
            "revoked_at",
        )

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        if obj is None:
            return self.fields
        return ("name", *self.get_readonly_fields(request, obj))

    @admin.display(description="name", ordering="name")
    def name_label(self, obj: ApiKey) -> SafeString:
        return clipped(obj.name, 40)

    @admin.display(description="scope", ordering="scope")
    def scope_label(self, obj: ApiKey) -> SafeString:
        return clipped(obj.scope_label, 30)

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: ApiKey) -> str:
        return when(obj.created_at)

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, obj: ApiKey) -> str:
        return when(obj.last_used_at)

    @admin.display(description="status", ordering="revoked_at")
    def status(self, obj: ApiKey) -> str:
        if obj.is_active:
            return "active"
        return format_html("<strong>revoked</strong> {}", when(obj.revoked_at))

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            obj.save(update_fields=["name"])
            return
        key, raw = services.api_key_create(
            name=obj.name,
            scope=obj.scope,
            team_id=obj.team_id,
            project_id=obj.project_id,
            created_by=request.user,
        )
        obj.pk = key.pk
        obj.prefix, obj.key_hash, obj.created_at = key.prefix, key.key_hash, key.created_at
        messages.warning(
            request,
            format_html(
                "Copy this API key now; it will not be shown again: "
                "<code id='new-api-key'>{}</code>",
                raw,
            ),
        )

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            services.api_key_revoke(key=key)
            count += 1
        messages.success(request, f"Revoked {count} key(s).")
