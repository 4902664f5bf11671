"""Budget overrides in the admin: the approval queue, requests made by staff, and the
confirmation views that approve or reject (one override, or the selected ones)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.forms.models import construct_instance
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from budgets import overrides
from budgets.models import BudgetOverride
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.admin.display import MONEY_WIDGETS, clipped, when

# --- display helpers ---------------------------------------------------------------------------


def requester_label(override: BudgetOverride) -> str:
    if override.requested_by_user is not None:
        return override.requested_by_user.get_username()
    if override.requested_by_key is not None:
        return f"API key “{override.requested_by_key.name}” ({override.requested_by_key.prefix}…)"
    return "unknown"


def decision_label(override: BudgetOverride) -> str:
    if override.decided_at is None or override.decided_by is None:
        return "—"
    when = timezone.localtime(override.decided_at).strftime("%Y-%m-%d %H:%M")
    return f"{override.decided_by.get_username()}, {when}: {override.decision_reason}"


def _as_user(request: HttpRequest) -> User:
    # admin_view lets only active staff through, so this is never the anonymous user.
    return cast("User", request.user)


# --- overrides: the approval queue -------------------------------------------------------------

DECISION_ACTIONS = {"approve_selected", "reject_selected"}
VERDICTS = {"approve": overrides.override_approve, "reject": overrides.override_reject}
PAST_TENSE = {"approve": "Approved", "reject": "Rejected"}


class OverrideStatusFilter(admin.SimpleListFilter):
    """Status, pending unless told otherwise: the list is first of all the approval queue."""

    title = "status"
    parameter_name = "status"
    ALL = "all"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [*BudgetOverride.Status.choices, (self.ALL, "All")]

    def value(self) -> str:
        return str(super().value() or BudgetOverride.Status.PENDING)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == self.ALL:
            return queryset
        return queryset.filter(status=self.value())

    def choices(self, changelist: Any) -> Any:
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == str(lookup),
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }


class OverrideRequestForm(forms.ModelForm):
    """A staff user asking for an override in the admin; the service's rules, as form errors."""

    class Meta:
        model = BudgetOverride
        fields = ("budget", "extra_cost", "extra_tokens", "unlimited", "reason", "expires_at")

    def clean(self) -> dict[str, Any]:
        # No super().clean(): the service's messages say what the model constraints would.
        data = self.cleaned_data
        if all(name in data for name in ("budget", "reason", "expires_at")):
            errors = overrides.override_request_errors(
                budget=data["budget"],
                extra_cost=data.get("extra_cost"),
                extra_tokens=data.get("extra_tokens"),
                unlimited=bool(data.get("unlimited")),
                reason=data["reason"],
                expires_at=data["expires_at"],
                now=timezone.now(),
            )
            for name, msgs in errors.items():
                self.add_error("budget" if name == "budget_id" else name, msgs)
        return data

    def _post_clean(self) -> None:
        # As BudgetForm: the service's rules above are the validation; the constraints only
        # repeat them as "Constraint … is violated".
        opts = self._meta
        self.instance = construct_instance(self, self.instance, opts.fields, opts.exclude)


@admin.register(BudgetOverride)
class BudgetOverrideAdmin(admin.ModelAdmin):
    form = OverrideRequestForm
    formfield_overrides = MONEY_WIDGETS
    # What fits beside the navigation and the filters at 1366 px; the decision's reason and the
    # whole request reason are on the override's page.
    list_display = ("override", "amount", "status_label", "requested", "expires", "reason_short")
    list_display_links = ("override",)
    list_filter = (OverrideStatusFilter, ("budget", admin.RelatedOnlyFieldListFilter))
    ordering = ("-requested_at", "-id")
    actions = ("approve_selected", "reject_selected")
    readonly_fields = (
        "budget",
        "status",
        "amount",
        "reason",
        "expires_at",
        "requested_by",
        "requested_at",
        "decided_by",
        "decided_at",
        "decision_reason",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[BudgetOverride]:
        return (
            super()
            .get_queryset(request)
            .select_related("budget", "requested_by_user", "requested_by_key", "decided_by")
        )

    def get_fields(self, request: HttpRequest, obj: BudgetOverride | None = None) -> Any:
        if obj is None:
            return OverrideRequestForm.Meta.fields
        return self.readonly_fields

    def get_readonly_fields(self, request: HttpRequest, obj: BudgetOverride | None = None) -> Any:
        return () if obj is None else self.readonly_fields

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"expires_at": timezone.now() + timedelta(days=7), **request.GET.dict()}

    # Requests are made, decisions taken, nothing edited or deleted: the rows are the audit trail.
    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="override", ordering="pk")
    def override(self, obj: BudgetOverride) -> SafeString:
        return clipped(f"#{obj.pk} {obj.budget.name}", 30)

    @admin.display(description="raise")
    def amount(self, obj: BudgetOverride) -> str:
        return obj.amount_label

    @admin.display(description="status", ordering="status")
    def status_label(self, obj: BudgetOverride) -> str:
        if obj.decided_by is None:
            return obj.status
        return Truncator(f"{obj.status} by {obj.decided_by.get_username()}").chars(30)

    @admin.display(description="requested", ordering="requested_at")
    def requested(self, obj: BudgetOverride) -> SafeString:
        return clipped(f"{requester_label(obj)}, {when(obj.requested_at)}", 40)

    @admin.display(description="requested by")
    def requested_by(self, obj: BudgetOverride) -> str:
        return requester_label(obj)

    @admin.display(description="expires", ordering="expires_at")
    def expires(self, obj: BudgetOverride) -> str:
        return when(obj.expires_at)

    @admin.display(description="reason")
    def reason_short(self, obj: BudgetOverride) -> SafeString:
        return clipped(obj.reason, 60)

    @admin.display(description="decision")
    def decision(self, obj: BudgetOverride) -> str:
        return decision_label(obj)

    def save_model(
        self, request: HttpRequest, obj: BudgetOverride, form: Any, change: bool
    ) -> None:
        if change:
            raise PermissionDenied  # decisions go through approve/reject, never an edit
        created = overrides.override_request(
            budget=obj.budget,
            extra_cost=obj.extra_cost,
            extra_tokens=obj.extra_tokens,
            unlimited=obj.unlimited,
            reason=obj.reason,
            expires_at=obj.expires_at,
            principal=Principal.for_staff(request.user),
        )
        obj.pk, obj.requested_at = created.pk, created.requested_at
        obj.requested_by_user_id = created.requested_by_user_id
        obj._state.adding = False

    # The permission to decide is checked by every entry point below, not only by hiding them.

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if not overrides.user_may_decide(request.user):
            for name in DECISION_ACTIONS:
                actions.pop(name, None)
        return actions

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        posted = set(request.POST.getlist("action")) if request.method == "POST" else set()
        if posted & DECISION_ACTIONS and not overrides.user_may_decide(request.user):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        override = self.get_object(request, object_id)
        can_decide = (
            override is not None
            and override.status == BudgetOverride.Status.PENDING
            and override.expires_at > timezone.now()
            and overrides.user_may_decide(request.user)
            and not overrides.user_requested(override, request.user)
        )
        context = {**(extra_context or {}), "can_decide": can_decide}
        return super().change_view(request, object_id, form_url, context)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path(
                "<int:object_id>/approve/",
                wrap(self.decide_view),
                {"verdict": "approve"},
                name="budgets_budgetoverride_approve",
            ),
            path(
                "<int:object_id>/reject/",
                wrap(self.decide_view),
                {"verdict": "reject"},
                name="budgets_budgetoverride_reject",
            ),
            *super().get_urls(),
        ]

    @admin.action(description="Approve selected overrides…")
    def approve_selected(
        self, request: HttpRequest, queryset: QuerySet[BudgetOverride]
    ) -> HttpResponse | None:
        return self._decide_selected(request, queryset, "approve")

    @admin.action(description="Reject selected overrides…")
    def reject_selected(
        self, request: HttpRequest, queryset: QuerySet[BudgetOverride]
    ) -> HttpResponse | None:
        return self._decide_selected(request, queryset, "reject")

    def _decide_selected(
        self, request: HttpRequest, queryset: QuerySet[BudgetOverride], verdict: str
    ) -> HttpResponse | None:
        if not overrides.user_may_decide(request.user):
            raise PermissionDenied
        chosen = list(queryset.order_by("requested_at", "pk"))
        reason = request.POST.get("reason", "")
        if request.POST.get("post") == "yes" and reason.strip():
            self._decide(request, chosen, verdict, reason)
            return None  # back to the queue, which shows the messages
        return self._confirmation(
            request,
            chosen,
            verdict,
            reason=reason,
            missing_reason=request.POST.get("post") == "yes",
            action=f"{verdict}_selected",
            cancel_url=request.get_full_path(),
        )

    def decide_view(self, request: HttpRequest, object_id: int, verdict: str) -> HttpResponse:
        if not overrides.user_may_decide(request.user):
            raise PermissionDenied
        override = self.get_object(request, str(object_id))
        if override is None:
            raise Http404(f"Override {object_id} does not exist.")
        change_url = reverse("admin:budgets_budgetoverride_change", args=[override.pk])
        reason = request.POST.get("reason", "")
        if request.method == "POST" and reason.strip():
            self._decide(request, [override], verdict, reason)
            return HttpResponseRedirect(change_url)
        return self._confirmation(
            request,
            [override],
            verdict,
            reason=reason,
            missing_reason=request.method == "POST",
            action="",
            cancel_url=change_url,
        )

    def _decide(
        self, request: HttpRequest, chosen: list[BudgetOverride], verdict: str, reason: str
    ) -> None:
        decide = VERDICTS[verdict]
        done = []
        for override in chosen:
            try:
                decided = decide(override_id=override.pk, user=_as_user(request), reason=reason)
            except ApiError as exc:
                detail = "; ".join(m for msgs in exc.fields.values() for m in msgs)
                messages.error(
                    request,
                    f"Override #{override.pk} was not {verdict}d: {exc.message}"
                    + (f" ({detail})" if detail else ""),
                )
            else:
                done.append(f"#{override.pk}")
                # The override row is the audit record; this also lists it in the admin History.
                self.log_change(request, decided, f"{PAST_TENSE[verdict]}: {reason.strip()}")
        if done:
            messages.success(request, f"{PAST_TENSE[verdict]} override(s) {', '.join(done)}.")

    def _confirmation(
        self,
        request: HttpRequest,
        chosen: list[BudgetOverride],
        verdict: str,
        *,
        reason: str,
        missing_reason: bool,
        action: str,
        cancel_url: str,
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": f"{verdict.capitalize()} budget override{'s' if len(chosen) != 1 else ''}",
            "opts": self.opts,
            "rows": [(o, requester_label(o)) for o in chosen],
            "verdict": verdict,
            "action": action,
            "reason": reason,
            "error": "Give a reason: it is recorded with your decision and shown on the budget."
            if missing_reason
            else "",
            "cancel_url": cancel_url,
            "media": self.media,
        }
        return TemplateResponse(request, "admin/budgets/budgetoverride/decide.html", context)
