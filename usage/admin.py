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

from tokenmgr_project import redis as tm_redis
from usage import pricing, selectors, services
from usage.errors import ApiError
from usage.models import ApiKey, DeadLetter, ManagerConfig, ModelPrice, TokenUsage

# The admin never counts a large ledger: it counts at most this many matching rows.
COUNT_CAP = 10_000


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP rows (a bounded LIMIT sub-query), never COUNT(*) of the table."""

    @cached_property
    def count(self) -> int:
        return cast("QuerySet[Any]", self.object_list)[: COUNT_CAP + 1].count()


@admin.register(TokenUsage)
class TokenUsageAdmin(admin.ModelAdmin):
    list_display = (
        "request_id",
        "tenant",
        "occurred_at",
        "provider",
        "model",
        "total_tokens",
        "cost_usd",
        "team_id",
        "project_id",
        "agent",
        "status",
        "unpriced",
    )
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

    @admin.display(description="cost (USD)", ordering="cost")
    def cost_usd(self, obj: TokenUsage) -> str:
        return pricing.money(obj.cost)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


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


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "prefix",
        "scope",
        "team_id",
        "project_id",
        "created_at",
        "last_used_at",
        "status",
    )
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

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        return (
            "active"
            if obj.is_active
            else format_html("<strong>revoked</strong> {}", obj.revoked_at)
        )

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


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "provider",
        "input_per_mtok",
        "output_per_mtok",
        "cache_read_per_mtok",
        "cache_write_per_mtok",
        "effective_from",
        "note",
    )
    search_fields = ("model", "provider")
    list_filter = ("provider",)

    def save_model(self, request: HttpRequest, obj: ModelPrice, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        pricing.overrides.invalidate()

    def delete_model(self, request: HttpRequest, obj: ModelPrice) -> None:
        super().delete_model(request, obj)
        pricing.overrides.invalidate()


@admin.register(ManagerConfig)
class ManagerConfigAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "buffer_size",
        "flush_interval",
        "retention_days",
        "optimization_enabled",
        "updated_at",
    )
    fields = (
        "buffer_size",
        "flush_interval",
        "retention_days",
        "alert_channels",
        "optimization_enabled",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not ManagerConfig.objects.exists()

    def save_model(self, request: HttpRequest, obj: ManagerConfig, form: Any, change: bool) -> None:
        obj.pk = 1
        super().save_model(request, obj, form, change)
        services.manager_config_update()
