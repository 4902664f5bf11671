"""Provider bills in the admin: upload one (the add page: a file, its provider, the tolerance),
compared with the ledger by reporting.reconcile.bill_import (the API's service); the list of
imports; and each import's page with its days and lines, worst days first. Imports are never
edited: a new file is a new import."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from reporting import reconcile
from reporting.models import BillImport, BillLine
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.actions import actor_label
from usage.admin.display import EMPTY, amount, clipped, when
from usage.admin.repricing import signed


def _cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), ROUND_HALF_UP)


# Lines shown on an import's page; the API (GET /api/v1/reconciliations/<id>) has them all.
MAX_LINES_SHOWN = 500
_AUTO = ""


class BillUploadForm(forms.Form):
    file = forms.FileField(
        help_text="The cost export as the console or the admin API downloaded it (CSV or JSON, "
        "at most 20 MB): OpenAI's Usage > Export > Cost data grouped by line item, or "
        "Anthropic's Cost > Export; or their costs / cost_report JSON."
    )
    provider = forms.ChoiceField(
        choices=[(_AUTO, "Detect from the file"), ("openai", "OpenAI"), ("anthropic", "Anthropic")],
        required=False,
        help_text="A file of the other provider is refused (mislabelled).",
    )
    tolerance_pct = forms.DecimalField(
        label="Tolerance (%)",
        initial=reconcile.DEFAULT_TOLERANCE_PCT,
        min_value=Decimal(0),
        max_value=Decimal(100),
        max_digits=6,
        decimal_places=3,
        help_text="A line or a day differing from the bill by more than this percent of the "
        "billed amount is flagged.",
    )
    by_project = forms.ChoiceField(
        label="Per project",
        choices=[
            (_AUTO, "When the export's projects are ledger project ids"),
            ("yes", "Yes"),
            ("no", "No: by day and model only"),
        ],
        required=False,
    )


def _pct(value: Decimal | None) -> str:
    return EMPTY if value is None else f"{signed(value)} %"


def _table(head: tuple[str, ...], rows: Any, row_html: str, table_id: str) -> SafeString:
    header = format_html_join("", "<th>{}</th>", ((h,) for h in head))
    return format_html(
        # The tables scroll inside their own box: a long model name never widens the page.
        '<div style="overflow-x: auto; max-width: 100%;"><table id="{}"><thead><tr>{}</tr>'
        "</thead><tbody>{}</tbody></table></div>",
        table_id,
        header,
        format_html_join("", row_html, rows),
    )


@admin.register(BillImport)
class BillImportAdmin(admin.ModelAdmin):
    # The provider is in the first column (and a filter): a column of its own would widen the
    # list past 1366 px with large amounts.
    list_display = (
        "imported",
        "span",
        "billed_usd",
        "ledger_usd",
        "difference_usd",
        "flagged_days",
    )
    list_display_links = ("imported",)
    list_filter = ("provider", ("imported_at", admin.DateFieldListFilter))
    search_fields = ("filename", "sha256")
    ordering = ("-imported_at", "-id")
    list_per_page = 50
    fields = (
        "imported",
        "imported_by",
        "provider",
        "source_format",
        "file_name",
        "sha256",
        "span",
        "rows",
        "by_project",
        "tolerance",
        "billed_usd",
        "ledger_usd",
        "difference_usd",
        "unexplained",
        "flagged_days",
        "days_table",
        "lines_table",
    )
    readonly_fields = fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # shown, never edited: a new file is a new import

    @admin.display(description="imported", ordering="imported_at")
    def imported(self, obj: BillImport) -> str:
        return f"{when(obj.imported_at)} {obj.provider}"

    @admin.display(description="days", ordering="first_day")
    def span(self, obj: BillImport) -> str:
        days = (obj.last_day - obj.first_day).days + 1
        return f"{obj.first_day}, {days} day{'s' if days > 1 else ''}"

    # The list rounds to cents (it must fit 1366 px); each import's page has the exact amounts.
    @admin.display(description="billed (USD)", ordering="billed")
    def billed_usd(self, obj: BillImport) -> str:
        return amount(_cents(obj.billed))

    @admin.display(description="ledger (USD)", ordering="ledger")
    def ledger_usd(self, obj: BillImport) -> str:
        return amount(_cents(obj.ledger))

    @admin.display(description="difference")
    def difference_usd(self, obj: BillImport) -> str:
        difference = obj.ledger - obj.billed
        percent = _pct(reconcile.percent(difference, obj.billed))
        return f"{signed(_cents(difference))} ({percent})"

    @admin.display(description="filename")
    def file_name(self, obj: BillImport) -> SafeString:
        return clipped(obj.filename or EMPTY, 80)

    @admin.display(description="tolerance")
    def tolerance(self, obj: BillImport) -> str:
        return f"{amount(obj.tolerance_pct)} %"

    @admin.display(description="unexplained (USD)")
    def unexplained(self, obj: BillImport) -> str:
        totals = self._result(obj)["totals"]
        pct = totals["unexplained_pct"]
        return f"{totals['unexplained']} ({pct + ' %' if pct is not None else EMPTY})"

    @admin.display(description="days, worst first")
    def days_table(self, obj: BillImport) -> SafeString:
        return _table(
            ("day", "billed (USD)", "ledger (USD)", "difference (USD)", "%", "lines", "flagged"),
            (
                (
                    d["day"],
                    d["billed"],
                    d["ledger"],
                    d["difference"],
                    d["difference_pct"] or EMPTY,
                    f"{d['flagged_lines']} of {d['lines']}",
                    "beyond tolerance" if d["flagged"] else "",
                )
                for d in self._result(obj)["days"]
            ),
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            "bill-days",
        )

    @admin.display(description="lines, worst days first")
    def lines_table(self, obj: BillImport) -> SafeString:
        result = self._result(obj)
        rank = {d["day"]: i for i, d in enumerate(result["days"])}
        lines = sorted(result["lines"], key=lambda x: rank[x["day"]])  # stable: worst in a day
        shown = lines[:MAX_LINES_SHOWN]
        table = _table(
            (
                "day",
                "model",
                "project",
                "billed (USD)",
                "ledger (USD)",
                "difference",
                "%",
                "status",
            ),
            (
                (
                    line["day"],
                    line["model"],
                    line["project_id"] or EMPTY,
                    line["billed"],
                    line["ledger"],
                    line["difference"],
                    line["difference_pct"] or EMPTY,
                    BillLine.Status(line["status"]).label,
                )
                for line in shown
            ),
            '<tr><td>{}</td><td class="tm-clip">{}</td><td class="tm-clip">{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            "bill-lines",
        )
        if len(lines) > len(shown):
            api = reverse("reconciliation", args=[obj.pk])
            return format_html(
                '{}<p>The first {} of {} lines; <a href="{}">the API</a> has them all.</p>',
                table,
                len(shown),
                len(lines),
                api,
            )
        return table

    def _result(self, obj: BillImport) -> dict[str, Any]:
        cached: dict[str, Any] | None = getattr(obj, "_reconciliation", None)
        if cached is None:
            cached = reconcile.bill_result(obj)
            obj._reconciliation = cached  # type: ignore[attr-defined]  # one read per page
        return cached

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The upload form; a bad file is a form error and nothing is stored."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = BillUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            stored = self._import(request, form)
            if stored is not None:
                self.log_addition(request, stored, [{"added": {}}])
                self.message_user(
                    request,
                    f"Imported {stored}: {stored.flagged_days} day(s) beyond the tolerance.",
                )
                return HttpResponseRedirect(
                    reverse("admin:reporting_billimport_change", args=[stored.pk])
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Import a provider bill",
            "opts": self.opts,
            "form": form,
            "max_mb": reconcile.MAX_BILL_BYTES // (1024 * 1024),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/reporting/billimport/upload.html", context)

    @staticmethod
    def _import(request: HttpRequest, form: BillUploadForm) -> BillImport | None:
        upload = form.cleaned_data["file"]
        principal = Principal.for_staff(request.user)
        choice = form.cleaned_data["by_project"]
        try:
            if upload.size > reconcile.MAX_BILL_BYTES:
                raise reconcile.too_large(upload.size)
            body = reconcile.bill_import(
                principal=principal,
                content=reconcile.decode_upload(upload.read()),
                provider=form.cleaned_data["provider"] or None,
                filename=(upload.name or "")[:255],
                tolerance_pct=form.cleaned_data["tolerance_pct"],
                by_project=None if choice == _AUTO else choice == "yes",
                actor=actor_label(principal),
            )
        except ApiError as exc:
            for name, messages in (exc.fields or {"file": [exc.message]}).items():
                target = name if name in form.fields else None
                for message in messages:
                    form.add_error(target, f"{exc.message} {message}")
            return None
        return BillImport.objects.get(pk=body["id"])
