"""Price overrides, beside the catalogue they override (a read-only page of its own), and the
action that re-prices past usage from an override's start (a dry run to confirm, then applied)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import pricing, services
from usage.admin.display import EMPTY, MONEY_WIDGETS, amount, clipped, when
from usage.admin.repricing import scope_label, signed
from usage.models import ModelPrice

CATALOGUE_PAGE = 100
# An override's prices have this many decimals (ModelPrice): catalogue prices can have more.
_OVERRIDE_QUANTUM = Decimal(1).scaleb(-ModelPrice._meta.get_field("input_per_mtok").decimal_places)


def _catalogue_amount(value: str | None, *, for_override: bool = False) -> str:
    if value is None:
        return EMPTY
    try:
        number = Decimal(value)
    except InvalidOperation:
        return value
    return pricing.money(number.quantize(_OVERRIDE_QUANTUM) if for_override else number)


def _posted_until(request: HttpRequest) -> datetime | None:
    """The end of the range the confirmation page showed, so what is applied is what was shown
    (and any usage that arrived inside that range since)."""
    try:
        until = datetime.fromisoformat(request.POST.get("until", ""))
    except ValueError:
        return None
    return None if timezone.is_naive(until) else until


PRICE_FIELDS = (
    "provider",
    "model",
    "effective_from",
    "input_per_mtok",
    "output_per_mtok",
    "cache_read_per_mtok",
    "cache_write_per_mtok",
    "note",
)


class ModelPriceForm(forms.ModelForm):
    class Meta:
        model = ModelPrice
        fields = PRICE_FIELDS
        labels = {
            "input_per_mtok": "Input (USD per million tokens)",
            "output_per_mtok": "Output (USD per million tokens)",
            "cache_read_per_mtok": "Cache read (USD per million tokens)",
            "cache_write_per_mtok": "Cache write (USD per million tokens)",
        }
        help_texts = {
            "effective_from": "Usage that occurred from then on is priced with this override.",
            "cache_read_per_mtok": "Empty: cache reads cost the input price.",
            "cache_write_per_mtok": "Empty: cache writes cost the input price.",
        }


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Overrides are written by usage.services.model_price_set / model_price_delete, which drop
    the price cache once the transaction commits. (provider, model, start) name an override: on
    an existing one only the prices and the note change; a new start is a new override."""

    list_display = ("model_label", "input", "output", "cache_read", "cache_write", "starts")
    search_fields = ("model", "provider")
    list_filter = ("provider",)
    form = ModelPriceForm
    formfield_overrides = MONEY_WIDGETS
    fields = PRICE_FIELDS
    actions = ("reprice_from_start",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return () if obj is None else ("provider", "model", "effective_from")

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"effective_from": timezone.now(), **super().get_changeform_initial_data(request)}

    @admin.display(description="model", ordering="model")
    def model_label(self, obj: ModelPrice) -> SafeString:
        return clipped(f"{obj.provider or 'any provider'}/{obj.model}", 40)

    @admin.display(description="input (USD/Mtok)", ordering="input_per_mtok")
    def input(self, obj: ModelPrice) -> str:
        return amount(obj.input_per_mtok)

    @admin.display(description="output", ordering="output_per_mtok")
    def output(self, obj: ModelPrice) -> str:
        return amount(obj.output_per_mtok)

    @admin.display(description="cache read")
    def cache_read(self, obj: ModelPrice) -> str:
        return "= input" if obj.cache_read_per_mtok is None else amount(obj.cache_read_per_mtok)

    @admin.display(description="cache write")
    def cache_write(self, obj: ModelPrice) -> str:
        return "= input" if obj.cache_write_per_mtok is None else amount(obj.cache_write_per_mtok)

    @admin.display(description="from", ordering="effective_from")
    def starts(self, obj: ModelPrice) -> str:
        return when(obj.effective_from)

    def save_model(self, request: HttpRequest, obj: ModelPrice, form: Any, change: bool) -> None:
        row, _created = services.model_price_set(
            provider=obj.provider,
            model=obj.model,
            input_per_mtok=obj.input_per_mtok,
            output_per_mtok=obj.output_per_mtok,
            cache_read_per_mtok=obj.cache_read_per_mtok,
            cache_write_per_mtok=obj.cache_write_per_mtok,
            effective_from=obj.effective_from,
            note=obj.note,
        )
        # The admin logs and redirects with `obj`: give it the row the service saved.
        obj.pk, obj.provider, obj._state.adding = row.pk, row.provider, False

    def delete_model(self, request: HttpRequest, obj: ModelPrice) -> None:
        services.model_price_delete(price=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelPrice]) -> None:
        for price in queryset:
            services.model_price_delete(price=price)

    @admin.action(
        description="Re-price usage from this price's effective date…", permissions=["change"]
    )
    def reprice_from_start(
        self, request: HttpRequest, queryset: QuerySet[ModelPrice]
    ) -> HttpResponse | None:
        """The selected price's usage (its model, and its provider unless any) from its start to
        now, priced again (usage.services.usage_reprice): a dry run shown for confirmation,
        then applied from the confirmation's button."""
        chosen = list(queryset[:2])
        if len(chosen) != 1:
            self.message_user(
                request,
                "Select one price: its usage is re-priced from its effective date.",
                messages.WARNING,
            )
            return None
        price = chosen[0]
        apply = request.POST.get("post") == "yes"
        until = _posted_until(request) if apply else timezone.now()
        if until is None:
            self.message_user(
                request, "The confirmation was incomplete: try again.", messages.ERROR
            )
            return None
        if price.effective_from >= until:
            self.message_user(
                request, f"{price} starts in the future: no usage to re-price.", messages.WARNING
            )
            return None
        try:
            result = services.usage_reprice(
                since=price.effective_from,
                until=until,
                provider=price.provider,
                model=price.model,
                apply=apply,
                actor=Principal.for_staff(request.user).label,
            )
        except ApiError as exc:
            detail = "; ".join(m for msgs in exc.fields.values() for m in msgs)
            self.message_user(
                request,
                f"Usage of {price} was not re-priced: {exc.message}"
                + (f" ({detail})" if detail else ""),
                messages.ERROR,
            )
            return None
        if apply:
            assert result.repricing is not None
            self.message_user(
                request,
                format_html(
                    "Re-priced {} of {} rows of {}: {} USD before, {} USD after ({} USD). "
                    '<a href="{}">Audit entry #{}</a>.',
                    f"{result.rows_changed:,}",
                    f"{result.rows_seen:,}",
                    scope_label(price.provider, price.model),
                    pricing.money(result.cost_before),
                    pricing.money(result.cost_after),
                    signed(result.difference),
                    reverse("admin:usage_repricing_change", args=[result.repricing.pk]),
                    result.repricing.pk,
                ),
                messages.SUCCESS,
            )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Re-price usage",
            "opts": self.opts,
            "price": price,
            "usage": scope_label(price.provider, price.model),
            "since": when(result.since),
            "until": when(result.until),
            "until_iso": result.until.isoformat(),
            "rows": [
                {
                    "model": scope_label(m.provider, m.model),
                    "rows": f"{m.rows:,}",
                    "rows_changed": f"{m.rows_changed:,}",
                    "before": pricing.money(m.cost_before),
                    "after": pricing.money(m.cost_after),
                    "difference": signed(m.difference),
                }
                for m in result.models
            ],
            "rows_seen": f"{result.rows_seen:,}",
            "rows_changed": f"{result.rows_changed:,}",
            "changing": result.rows_changed,
            "can_apply": result.rows_changed > 0,
            "before": pricing.money(result.cost_before),
            "after": pricing.money(result.cost_after),
            "difference": signed(result.difference),
            "action": "reprice_from_start",
            "cancel_url": request.get_full_path(),
        }
        return TemplateResponse(request, "admin/usage/modelprice/reprice.html", context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {**self._catalogue_context(), **(extra_context or {})}
        return super().changelist_view(request, context)

    def _catalogue_context(self) -> dict[str, Any]:
        return {
            "catalogue_version": pricing.CATALOGUE_VERSION,
            "catalogue_size": f"{len(pricing.catalogue_entries()):,}",
            "catalogue_url": reverse("admin:usage_modelprice_catalogue"),
            "pricing_api_url": reverse("pricing"),
        }

    def get_urls(self) -> list[URLPattern]:
        catalogue = path(
            "catalogue/",
            self.admin_site.admin_view(self.catalogue_view),
            name="usage_modelprice_catalogue",
        )
        return [catalogue, *super().get_urls()]

    def catalogue_view(self, request: HttpRequest) -> HttpResponse:
        """The genai-prices catalogue, read-only, searchable by model, with a link that starts
        an override of each price."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        query = request.GET.get("q", "").strip()[:128]
        provider = request.GET.get("provider", "").strip()[:64]
        entries = pricing.catalogue_entries()
        providers = sorted({e["provider"] for e in entries})
        if provider:
            entries = [e for e in entries if e["provider"] == provider]
        if query:
            needle = query.lower()
            entries = [
                e for e in entries if needle in e["model"].lower() or needle in e["name"].lower()
            ]
        page = Paginator(entries, CATALOGUE_PAGE).get_page(request.GET.get("p"))
        add_url = reverse("admin:usage_modelprice_add")
        rows = [
            {
                **entry,
                "input": _catalogue_amount(entry["input_per_mtok"]),
                "output": _catalogue_amount(entry["output_per_mtok"]),
                "cache_read": _catalogue_amount(entry["cache_read_per_mtok"]),
                "cache_write": _catalogue_amount(entry["cache_write_per_mtok"]),
                "context": f"{entry['context_window']:,}" if entry["context_window"] else EMPTY,
                "override_url": add_url
                + "?"
                + urlencode(
                    {
                        "provider": entry["provider"],
                        "model": entry["model"],
                        "input_per_mtok": _catalogue_amount(
                            entry["input_per_mtok"] or "0", for_override=True
                        ),
                        "output_per_mtok": _catalogue_amount(
                            entry["output_per_mtok"] or "0", for_override=True
                        ),
                    }
                ),
            }
            for entry in page.object_list
        ]
        context = {
            **self.admin_site.each_context(request),
            **self._catalogue_context(),
            "opts": self.opts,
            "title": "Catalogue prices",
            "rows": rows,
            "page": page,
            "query": query,
            "provider": provider,
            "providers": providers,
            "can_add": self.has_add_permission(request),
            "base_query": urlencode({"q": query, "provider": provider}),
        }
        return TemplateResponse(request, "admin/usage/modelprice/catalogue.html", context)
