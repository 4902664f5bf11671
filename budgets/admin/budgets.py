"""Budgets in the admin: live utilisation, a form that validates through the services, and the
thresholds, overrides, alerts and closed periods of each budget as inlines."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet, construct_instance
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from budgets.admin.overrides import requester_label
from budgets.models import Budget, BudgetAlert, BudgetOverride, BudgetPeriod, BudgetThreshold
from budgets.selectors import BudgetStatus, Burn, budget_burn, budget_status
from budgets.services import budget_create, budget_deactivate, budget_update
from usage.admin.display import MONEY_WIDGETS, clipped, service_errors, usd, when

# --- display helpers ---------------------------------------------------------------------------


def _tokens(value: int) -> str:
    return f"{value:,} tokens"


def _bar_colour(percent: Decimal) -> str:
    if percent >= 100:
        return "#ba2121"  # exhausted
    if percent >= 80:
        return "#e48b00"  # past the usual warning threshold
    return "#3f8f3f"


def utilisation_bar(percent: Decimal | None, label: str = "", width: int = 120) -> SafeString:
    if percent is None:
        return format_html("<span>{}</span>", "no limit")
    return format_html(
        '<span class="tm-bar" title="{}" style="display:inline-block;width:{}px;height:10px;'
        'background:#e6e6e6;border-radius:3px;vertical-align:middle;overflow:hidden">'
        '<span style="display:block;height:100%;width:{}%;background:{}"></span></span>'
        ' <span class="tm-bar-percent">{} %{}</span>',
        f"{percent:.2f} % of the effective limit",
        width,
        f"{min(percent, Decimal(100)):.1f}",
        _bar_colour(percent),
        f"{percent:.1f}",
        f" ({label})" if label else "",
    )


def _status(budget: Budget) -> BudgetStatus:
    """The budget's live status, once per request (the list calls several columns per row)."""
    cache = vars(budget)
    if "_admin_status" not in cache:
        cache["_admin_status"] = budget_status(budget)
    return cast("BudgetStatus", cache["_admin_status"])


def _burn_rate(burn: Burn) -> str:
    return (
        f"{usd(burn.cost_per_day)} and {_tokens(burn.tokens_per_day)} a day, "
        f"over {when(burn.start)} to {when(burn.end)}"
    )


def _runs_out(burn: Burn) -> str:
    """The exhaustion date as the change page says it (the basis holds the figures)."""
    if burn.exhausts_at is not None:
        return f"~{when(burn.exhausts_at)} ({burn.exhausts_by} limit), at {burn.rate_label}"
    return burn.basis


def _worst(status: BudgetStatus) -> tuple[Decimal | None, str]:
    """The fuller of the cost and token meters, and which one it is when both exist."""
    meters = [
        (p, name)
        for p, name in ((status.cost_percent, "cost"), (status.tokens_percent, "tokens"))
        if p is not None
    ]
    if not meters:
        return None, ""
    percent, name = max(meters, key=lambda m: m[0])
    return percent, name if len(meters) > 1 else ""


# --- budgets -----------------------------------------------------------------------------------

BUDGET_FIELDS = (
    "name",
    "scope",
    "scope_id",
    "team_id",
    "project_id",
    "period",
    "timezone",
    "cost_limit",
    "token_limit",
    "enforcement",
    "is_active",
)


class BudgetForm(forms.ModelForm):
    class Meta:
        model = Budget
        fields = BUDGET_FIELDS

    def clean(self) -> dict[str, Any]:
        # No super().clean(): the service validates, including what the database constraints
        # say, after filling team_id/project_id from the scope the way the API does.
        data = self.cleaned_data
        if any(name not in data for name in BUDGET_FIELDS):
            return data  # a field is already invalid; the service would only repeat it
        if self.instance.pk is None:
            values = {name: data[name] for name in BUDGET_FIELDS}
            errors = service_errors(lambda: budget_create(principal=None, **values))
        else:
            changes = {name: data[name] for name in self.changed_data}
            copy = Budget.objects.get(pk=self.instance.pk)
            errors = service_errors(lambda: budget_update(budget=copy, principal=None, **changes))
        for name, msgs in errors.items():
            self.add_error(name if name in self.fields else None, msgs)
        return data

    def _post_clean(self) -> None:
        # Build the instance without the model's constraint checks: they would judge the raw
        # values before the service fills team_id/project_id, and repeat its errors in worse words.
        opts = self._meta
        self.instance = construct_instance(self, self.instance, opts.fields, opts.exclude)


class ThresholdFormSet(BaseInlineFormSet):
    def percents(self) -> list[Decimal]:
        kept = []
        for form in self.forms:
            if form in self.deleted_forms or not form.cleaned_data:
                continue
            kept.append(form.cleaned_data["percent"])
        return kept


class BudgetThresholdInline(admin.TabularInline):
    model = BudgetThreshold
    formset = ThresholdFormSet
    extra = 1
    formfield_overrides = MONEY_WIDGETS  # "80", not "80.00"
    verbose_name_plural = "alert thresholds (left empty on a new budget: 50, 80 and 90 %)"


class _ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # History belongs to the budget: whoever may see the budget sees it.
        return request.user.has_perm("budgets.view_budget") or request.user.has_perm(
            "budgets.change_budget"
        )


class BudgetPeriodInline(_ReadOnlyInline):
    model = BudgetPeriod
    verbose_name_plural = "closed periods"
    fields = ("period_start", "period_end", "spent", "tokens_spent", "requests", "limit")
    readonly_fields = fields

    @admin.display(description="cost spent")
    def spent(self, obj: BudgetPeriod) -> str:
        return usd(obj.cost_spent)

    @admin.display(description="cost limit")
    def limit(self, obj: BudgetPeriod) -> str:
        return usd(obj.cost_limit)


class BudgetAlertInline(_ReadOnlyInline):
    model = BudgetAlert
    verbose_name_plural = "alerts"
    fields = ("created_at", "kind", "metric", "threshold", "percent", "message")
    readonly_fields = fields


class BudgetOverrideInline(_ReadOnlyInline):
    model = BudgetOverride
    verbose_name_plural = "overrides (history)"
    fields = (
        "status",
        "amount",
        "requested",
        "reason",
        "expires_at",
        "decided_by",
        "decided_at",
        "decision_reason",
    )
    readonly_fields = fields
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[BudgetOverride]:
        return (
            super()
            .get_queryset(request)
            .select_related("requested_by_user", "requested_by_key", "decided_by")
        )

    @admin.display(description="raise")
    def amount(self, obj: BudgetOverride) -> str:
        return obj.amount_label

    @admin.display(description="requested by")
    def requested(self, obj: BudgetOverride) -> str:
        return f"{requester_label(obj)}, {when(obj.requested_at)}"


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    form = BudgetForm
    formfield_overrides = MONEY_WIDGETS
    # What fits beside the navigation and the filters at 1366 px; the rest is on the budget page.
    list_display = (
        "name_label",
        "scope_label",
        "rule",
        "utilisation",
        "spent",
        "remaining",
        "period_end",
    )
    list_filter = ("scope", "period", "enforcement", "is_active")
    search_fields = ("name", "scope_id", "team_id", "project_id")
    list_per_page = 50
    actions = ("deactivate",)
    readonly_fields = ("current_status", "created_by_key", "created_by_user", "created_at")

    def get_fieldsets(self, request: HttpRequest, obj: Budget | None = None) -> Any:
        fieldsets: list[Any] = [
            (None, {"fields": ("name", "is_active")}),
            ("Whose usage counts", {"fields": ("scope", "scope_id", "team_id", "project_id")}),
            (
                "Limit",
                {"fields": ("period", "timezone", "cost_limit", "token_limit", "enforcement")},
            ),
        ]
        if obj is not None:
            fieldsets.insert(0, ("Now", {"fields": ("current_status",)}))
            fieldsets.append(
                (
                    "Created",
                    {"fields": ("created_by_key", "created_by_user", "created_at")},
                )
            )
        return fieldsets

    def get_inlines(self, request: HttpRequest, obj: Budget | None) -> list[Any]:
        if obj is None:
            return [BudgetThresholdInline]
        return [BudgetThresholdInline, BudgetOverrideInline, BudgetAlertInline, BudgetPeriodInline]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # periods, alerts and decisions are an audit trail: deactivate instead

    @admin.display(description="name", ordering="name")
    def name_label(self, obj: Budget) -> SafeString:
        if obj.is_active:
            return clipped(obj.name, 40)
        return format_html("{} <strong>(inactive)</strong>", clipped(obj.name, 40))

    @admin.display(description="scope", ordering="scope")
    def scope_label(self, obj: Budget) -> SafeString:
        if obj.scope == Budget.Scope.GLOBAL:
            return clipped("global", 30)
        return clipped(f"{obj.scope} {obj.scope_id}", 30)

    @admin.display(description="period", ordering="period")
    def rule(self, obj: Budget) -> str:
        return f"{obj.period}, {obj.enforcement}"

    @admin.display(description="utilisation")
    def utilisation(self, obj: Budget) -> SafeString:
        status = _status(obj)
        if status.unlimited_until is not None:
            return format_html("<span>unlimited until {}</span>", when(status.unlimited_until))
        return utilisation_bar(*_worst(status), width=80)

    @admin.display(description="spent")
    def spent(self, obj: Budget) -> str:
        status = _status(obj)
        parts = []
        if status.cost_limit is not None or status.cost_spent:
            parts.append(usd(status.cost_spent))
        if status.token_limit is not None:
            parts.append(_tokens(status.tokens_spent))
        return ", ".join(parts)

    @admin.display(description="remaining")
    def remaining(self, obj: Budget) -> str:
        status = _status(obj)
        parts = []
        if status.cost_remaining is not None:
            parts.append(usd(status.cost_remaining))
        if status.tokens_remaining is not None:
            parts.append(_tokens(status.tokens_remaining))
        return ", ".join(parts) or "no limit"

    @admin.display(description="period ends")
    def period_end(self, obj: Budget) -> str:
        end = _status(obj).period_end
        return "never (lifetime)" if end is None else when(end)

    @admin.display(description="current period")
    def current_status(self, obj: Budget) -> SafeString:
        status = _status(obj)
        rows: list[tuple[str, str]] = [
            ("period", f"{status.period_start:%Y-%m-%d %H:%M} to {self.period_end(obj)}"),
        ]
        if status.unlimited_until is not None:
            rows.append(("override", f"unlimited until {status.unlimited_until:%Y-%m-%d %H:%M}"))
        if status.cost_limit is not None:
            limit = usd(status.cost_limit)
            if status.effective_cost_limit not in (None, status.cost_limit):
                limit += f" (with overrides {usd(status.effective_cost_limit)})"
            rows += [
                ("cost limit", limit),
                ("cost spent", usd(status.cost_spent)),
                ("cost reserved", usd(status.cost_reserved)),
            ]
            if status.cost_remaining is not None:
                rows.append(("cost remaining", usd(status.cost_remaining)))
        if status.token_limit is not None:
            limit = _tokens(status.token_limit)
            if status.effective_token_limit not in (None, status.token_limit):
                limit += f" (with overrides {_tokens(status.effective_token_limit)})"
            rows += [
                ("token limit", limit),
                ("tokens spent", _tokens(status.tokens_spent)),
                ("tokens reserved", _tokens(status.tokens_reserved)),
            ]
            if status.tokens_remaining is not None:
                rows.append(("tokens remaining", _tokens(status.tokens_remaining)))
        if status.projected_cost is not None and status.cost_limit is not None:
            rows.append(("projected cost at period end", usd(status.projected_cost)))
        burn = budget_burn(obj, status, now=timezone.now())
        rows.append(("burn rate", _burn_rate(burn)))
        rows.append(("runs out", _runs_out(burn)))
        pending = obj.overrides.filter(status=BudgetOverride.Status.PENDING).count()
        queue = reverse("admin:budgets_budgetoverride_changelist")
        add = reverse("admin:budgets_budgetoverride_add")
        return format_html(
            "{}<table>{}</table><p>{} <a href='{}?budget__id__exact={}&amp;status=pending'>"
            "pending override(s)</a> · <a href='{}?budget={}'>request an override</a></p>",
            utilisation_bar(*_worst(status)),
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
            pending,
            queue,
            obj.pk,
            add,
            obj.pk,
        )

    def save_model(self, request: HttpRequest, obj: Budget, form: Any, change: bool) -> None:
        if change:
            changes = {name: form.cleaned_data[name] for name in form.changed_data}
            saved = budget_update(
                budget=Budget.objects.get(pk=obj.pk), principal=None, user=request.user, **changes
            )
        else:
            values = {name: form.cleaned_data[name] for name in BUDGET_FIELDS}
            saved = budget_create(principal=None, user=request.user, **values)
        # The admin logs and redirects with `obj`; give it what the service saved.
        for name in (*BUDGET_FIELDS, "pk", "created_by_user_id", "created_at", "updated_at"):
            setattr(obj, name, getattr(saved, name))
        obj._state.adding = False

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        if not isinstance(formset, ThresholdFormSet):
            formset.save()
            return
        formset.save(commit=False)  # only works out new/changed/deleted for the change message
        if not formset.has_changed():
            return  # a new budget keeps the default thresholds
        budget = Budget.objects.get(pk=form.instance.pk)
        budget_update(
            budget=budget, principal=None, user=request.user, thresholds=formset.percents()
        )

    @admin.action(description="Deactivate selected budgets (keeps their history)")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Budget]) -> None:
        count = 0
        for budget in queryset.filter(is_active=True):
            budget_deactivate(budget=budget)
            count += 1
        messages.success(request, f"Deactivated {count} budget(s).")
