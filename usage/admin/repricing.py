"""The audit of applied repricings (read-only: written by usage.services.usage_reprice only)."""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from usage import pricing
from usage.admin.display import ReadOnlyAdmin, amount, clipped, when
from usage.models import Repricing


def signed(value: Decimal) -> str:
    """A difference as the API writes it, with its sign: "+0.25", "-0.1", "0"."""
    return ("+" if value > 0 else "") + pricing.money(value)


def scope_label(provider: str, model: str) -> str:
    """Which usage a repricing covered: "openai/gpt-4o", "any provider/gpt-4o", "all usage"."""
    if not provider and not model:
        return "all usage"
    return f"{provider or 'any provider'}/{model or 'any model'}"


@admin.register(Repricing)
class RepricingAdmin(ReadOnlyAdmin):
    # Before and after are on each entry's page: with them the list is wider than 1366 px.
    list_display = ("applied", "actor", "range", "usage", "rows", "change")
    list_display_links = ("applied",)
    list_filter = (("applied_at", admin.DateFieldListFilter),)
    search_fields = ("actor", "model")
    ordering = ("-applied_at", "-id")
    list_per_page = 50
    fields = (
        "applied_at",
        "actor",
        "since",
        "until",
        "usage",
        "rows_seen",
        "rows_changed",
        "before",
        "after",
        "change",
        "models",
    )
    readonly_fields = fields

    @admin.display(description="applied", ordering="applied_at")
    def applied(self, obj: Repricing) -> str:
        return when(obj.applied_at)

    @admin.display(description="range")
    def range(self, obj: Repricing) -> str:
        return f"{when(obj.since)} to {when(obj.until)}"

    @admin.display(description="usage")
    def usage(self, obj: Repricing) -> SafeString:
        return clipped(scope_label(obj.provider, obj.model), 40)

    @admin.display(description="rows changed")
    def rows(self, obj: Repricing) -> str:
        return f"{obj.rows_changed:,} of {obj.rows_seen:,}"

    @admin.display(description="before (USD)")
    def before(self, obj: Repricing) -> str:
        return amount(obj.cost_before)

    @admin.display(description="after (USD)")
    def after(self, obj: Repricing) -> str:
        return amount(obj.cost_after)

    @admin.display(description="difference (USD)")
    def change(self, obj: Repricing) -> str:
        return signed(obj.difference)

    @admin.display(description="per model")
    def models(self, obj: Repricing) -> SafeString:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    clipped(scope_label(m["provider"], m["model"]), 60),
                    f"{m['rows_changed']:,} of {m['rows']:,}",
                    m["cost_before"],
                    m["cost_after"],
                    m["difference"],
                )
                for m in obj.per_model
            ),
        )
        return format_html(
            "<table><thead><tr><th>model</th><th>rows changed</th><th>before (USD)</th>"
            "<th>after (USD)</th><th>difference (USD)</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )
