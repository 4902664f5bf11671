"""The ledger (read-only: written by ingestion only) and the flush's dead letters."""

from __future__ import annotations

from typing import Any, cast

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.errors import ApiError
from usage import pricing, selectors, services
from usage.admin.display import (
    ReadOnlyAdmin,
    clipped,
    conversation_link,
    lineage_link,
    usd,
    when,
    workflow_link,
)
from usage.models import DeadLetter, TokenUsage

# The admin never counts a large ledger: it counts at most this many matching rows.
COUNT_CAP = 10_000


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP rows (a bounded LIMIT sub-query), never COUNT(*) of the table."""

    @cached_property
    def count(self) -> int:
        return cast("QuerySet[Any]", self.object_list)[: COUNT_CAP + 1].count()


@admin.register(TokenUsage)
class TokenUsageAdmin(ReadOnlyAdmin):
    list_display = (
        "occurred",
        "request",
        "model_label",
        "total_tokens",
        "cost_usd",
        "outcome",
        "lineage",
    )
    list_display_links = ("request",)
    list_filter = (
        ("occurred_at", admin.DateFieldListFilter),
        "status",
        "unpriced",
        "price_source",
        "estimated",
    )
    # A request id may be used by several tenants (it is unique per tenant): the list shows each.
    search_fields = ("=request_id",)
    search_help_text = "Exact request id (every tenant's)."
    ordering = ("-occurred_at", "-id")
    paginator = CappedCountPaginator
    show_full_result_count = False
    list_per_page = 50
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "request_id",
                    "lineage",
                    "tenant",
                    "occurred_at",
                    "received_at",
                    "status",
                    "error_type",
                    "latency_ms",
                )
            },
        ),
        (
            "Model and tokens",
            {
                "fields": (
                    "provider",
                    "model",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_tokens",
                    "cache_write_tokens",
                    "total_tokens",
                    "estimated",
                )
            },
        ),
        (
            "Cost",
            {"fields": ("cost_total", "cost_input", "cost_output", "price_source", "price_ref")},
        ),
        (
            "Attribution",
            {
                "fields": (
                    "team_id",
                    "project_id",
                    "user_id",
                    "feature",
                    "agent",
                    "task_type",
                    "conversation",
                    "workflow",
                    "reservation_id",
                    "metadata",
                )
            },
        ),
        (
            "Provenance",
            {
                "fields": (
                    "parent_request_id",
                    "root_request_id",
                    "depth",
                    "relationship",
                    "agent_type",
                    "workflow_step",
                    "intent",
                    "input_hash",
                    "output_hash",
                    "cache_hit",
                )
            },
        ),
    )
    readonly_fields = (
        "cost_total",
        "cost_input",
        "cost_output",
        "conversation",
        "workflow",
        "lineage",
    )

    @admin.display(description="occurred", ordering="occurred_at")
    def occurred(self, obj: TokenUsage) -> str:
        return when(obj.occurred_at, seconds=True)

    @admin.display(description="request id", ordering="request_id")
    def request(self, obj: TokenUsage) -> SafeString:
        return clipped(obj.request_id, 28)

    @admin.display(description="model", ordering="model")
    def model_label(self, obj: TokenUsage) -> SafeString:
        return clipped(f"{obj.provider}/{obj.model}" if obj.provider else obj.model, 40)

    @admin.display(description="cost (USD)", ordering="cost")
    def cost_usd(self, obj: TokenUsage) -> str:
        return pricing.money(obj.cost)

    @admin.display(description="status", ordering="status")
    def outcome(self, obj: TokenUsage) -> SafeString:
        # Unpriced (cost 0 until a price is known) shares the status column: it is rare.
        if obj.unpriced:
            return format_html("{}, <strong>unpriced</strong>", obj.status)
        return format_html("{}", obj.status)

    @admin.display(description="conversation id")
    def conversation(self, obj: TokenUsage) -> SafeString | str:
        return conversation_link(obj.conversation_id)

    @admin.display(description="workflow id")
    def workflow(self, obj: TokenUsage) -> SafeString | str:
        return workflow_link(obj.workflow_id)

    @admin.display(description="lineage")
    def lineage(self, obj: TokenUsage) -> SafeString | str:
        return lineage_link(obj.pk)

    @admin.display(description="cost")
    def cost_total(self, obj: TokenUsage) -> str:
        return "unpriced (no price known)" if obj.unpriced else usd(obj.cost)

    @admin.display(description="input cost")
    def cost_input(self, obj: TokenUsage) -> str:
        return usd(obj.input_cost)

    @admin.display(description="output cost")
    def cost_output(self, obj: TokenUsage) -> str:
        return usd(obj.output_cost)


# --- dead letters ------------------------------------------------------------------------------


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    """One page, read from Redis: the flush's dead letters, with replay and discard for staff
    holding the change permission (usage.services.usage_dead_letter_replay / _discard)."""

    def get_urls(self) -> list[URLPattern]:
        # Only the list: there is no row to add, open or delete.
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_change_permission(request):
                raise PermissionDenied
            try:
                self._act(request, request.POST.get("action", ""), request.POST.getlist("ids"))
            except tm_redis.REDIS_ERRORS:
                messages.error(request, "Redis is unreachable: nothing was changed.")
            return HttpResponseRedirect(request.get_full_path())
        try:
            letters = selectors.usage_dead_letters(limit=500)
        except tm_redis.REDIS_ERRORS:
            letters = []
            messages.error(request, "Redis is unreachable: dead letters cannot be listed now.")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Dead letters",
            "letters": letters,
            "can_change": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/usage/deadletter/change_list.html", context)

    def _act(self, request: HttpRequest, action: str, ids: list[str]) -> None:
        if not ids or action not in ("replay", "discard"):
            messages.warning(request, "Select dead letters, then Replay or Discard.")
            return
        try:
            if action == "discard":
                removed = services.usage_dead_letter_discard(ids=ids)
                messages.success(request, f"Discarded {removed} dead letter(s).")
                return
            result = services.usage_dead_letter_replay(ids=ids)
        except ApiError as exc:
            messages.error(request, f"{exc.message} {exc.fields}")
            return
        messages.success(request, f"Replayed {len(result.replayed)} dead letter(s).")
        for dead_id, error in result.failed.items():
            messages.error(request, f"{dead_id} is still refused: {error}")
