"""The manager settings: one page, not a list of one row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from usage import services
from usage.models import ManagerConfig
from usage.schemas import ConfigureIn

_CONFIGURE = ConfigureIn.model_json_schema()["properties"]


@dataclass(frozen=True, slots=True)
class _Setting:
    """A run-time setting the environment gives a default for (usage.services.manager_config)."""

    name: str
    label: str
    unit: str
    env: str
    help: str
    field: type[forms.IntegerField] | type[forms.FloatField] = forms.IntegerField

    @property
    def bounds(self) -> tuple[Any, Any]:  # int, or float for flush_interval
        # The API's own limits (ConfigureIn), so this page and the API accept the same values.
        schema = _CONFIGURE[self.name]["anyOf"][0]
        return schema["minimum"], schema["maximum"]


SETTINGS = (
    _Setting(
        "buffer_size",
        "Buffer size",
        "events",
        "TOKENMGR_BUFFER_SIZE",
        "A flush starts as soon as this many events wait in the Redis buffer.",
    ),
    _Setting(
        "flush_interval",
        "Flush interval",
        "seconds",
        "TOKENMGR_FLUSH_INTERVAL",
        "Buffered events are written to the ledger at least this often.",
        forms.FloatField,
    ),
    _Setting(
        "retention_days",
        "Retention",
        "days",
        "TOKENMGR_RETENTION_DAYS",
        "Usage older than this is deleted by the daily purge; 0 keeps everything.",
    ),
)
CHANNEL_LABELS = {"status": "live status feed", "email": "email", "webhook": "webhook (signed)"}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else f"{value:,}"


class ManagerSettingsForm(forms.Form):
    alert_channels = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=[
            (kind, CHANNEL_LABELS.get(kind, kind))
            for kind in _CONFIGURE["alert_channels"]["anyOf"][0]["items"]["enum"]
        ],
        help_text="Alerts are delivered to the active alert channels (Budgets, Alert channels) "
        "of the kinds ticked here.",
    )
    optimization_enabled = forms.BooleanField(
        required=False, label="Optimisation suggestions", help_text="Offer optimisation advice."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for setting in SETTINGS:
            low, high = setting.bounds
            self.fields[setting.name] = setting.field(
                required=False,
                min_value=low,
                max_value=high,
                label=setting.label,
                widget=forms.NumberInput(attrs={"placeholder": "default"}),
            )


@admin.register(ManagerConfig)
class ManagerConfigAdmin(admin.ModelAdmin):
    """The run-time settings on one page: what is in effect, the environment's default, the
    override, units and ranges. Saved through usage.services.manager_config_update."""

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("", wrap(self.settings_view), name=f"{info}_changelist"),
            # The one row's history entries link here: it is the same page.
            path("<path:object_id>/change/", wrap(self.settings_view), name=f"{info}_change"),
        ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def settings_view(self, request: HttpRequest, object_id: str = "") -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        can_change = self.has_change_permission(request)
        row = ManagerConfig.objects.filter(pk=1).first()
        effective = services.manager_config()
        if request.method == "POST":
            if not can_change:
                raise PermissionDenied
            form = ManagerSettingsForm(request.POST, initial=self._initial(row, effective))
            if form.is_valid():
                self._save(request, form)
                return HttpResponseRedirect(reverse("admin:usage_managerconfig_changelist"))
        else:
            form = ManagerSettingsForm(initial=self._initial(row, effective))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Manager settings",
            "form": form,
            "can_change": can_change,
            "rows": [self._row(s, form, row, effective) for s in SETTINGS],
            "effective": effective,
            "updated_at": row.updated_at if row else None,
        }
        return TemplateResponse(request, "admin/usage/managerconfig/settings.html", context)

    @staticmethod
    def _initial(row: ManagerConfig | None, effective: services.EffectiveConfig) -> dict[str, Any]:
        initial: dict[str, Any] = {s.name: getattr(row, s.name) if row else None for s in SETTINGS}
        initial["alert_channels"] = effective.alert_channels
        initial["optimization_enabled"] = effective.optimization_enabled
        return initial

    @staticmethod
    def _row(
        setting: _Setting,
        form: ManagerSettingsForm,
        row: ManagerConfig | None,
        effective: services.EffectiveConfig,
    ) -> dict[str, Any]:
        override = getattr(row, setting.name) if row else None
        low, high = setting.bounds
        return {
            "setting": setting,
            "field": form[setting.name],
            "effective": f"{_number(getattr(effective, setting.name))} {setting.unit}",
            "source": "environment default" if override is None else "override",
            "default": f"{_number(getattr(settings, setting.env))} {setting.unit}",
            "range": f"{_number(low)} to {_number(high)} {setting.unit}",
        }

    def _save(self, request: HttpRequest, form: ManagerSettingsForm) -> None:
        data = form.cleaned_data
        numbers = {s.name: data[s.name] for s in SETTINGS}
        services.manager_config_update(
            defaults=[name for name, value in numbers.items() if value is None],
            **{name: value for name, value in numbers.items() if value is not None},
            alert_channels=data["alert_channels"],
            optimization_enabled=data["optimization_enabled"],
        )
        if form.changed_data:
            changed = ", ".join(str(form.fields[name].label or name) for name in form.changed_data)
            self.log_change(request, ManagerConfig.objects.get(pk=1), f"Changed {changed}.")
        messages.success(
            request, "Manager settings saved. Every process applies them within 5 seconds."
        )
