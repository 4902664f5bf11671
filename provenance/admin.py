"""Relationships and refused cycles, read-only: ingestion and the relationships API write them
(provenance.services), and a row's depth and root follow from its tree edge, so an edge edited
or deleted here would leave the ledger's lineage columns wrong."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from provenance.models import CycleAttempt, ProvenanceRelationship
from usage.admin.display import ReadOnlyAdmin, clipped, when
from usage.admin.ledger import CappedCountPaginator


def _request_link(request_id: str) -> SafeString:
    # The usage list searched by that id: no query per row, and an edge may name a request
    # that has not arrived yet (the search then says so).
    url = reverse("admin:usage_tokenusage_changelist") + "?" + urlencode({"q": request_id})
    shown = Truncator(request_id).chars(28)
    return format_html('<a class="tm-clip" href="{}" title="{}">{}</a>', url, request_id, shown)


class _ReadOnly(ReadOnlyAdmin):
    paginator = CappedCountPaginator
    show_full_result_count = False
    list_per_page = 50


@admin.register(ProvenanceRelationship)
class ProvenanceRelationshipAdmin(_ReadOnly):
    list_display = (
        "from_request",
        "type",
        "to_request",
        "is_tree",
        "source",
        "tenant_id",
        "created",
    )
    list_filter = ("type", "is_tree", "source")
    # Exact ids only: the edge indexes lead with the tenant, so a search reads the table, and
    # a substring search would be no cheaper and far less precise.
    search_fields = ("=from_request_id", "=to_request_id")
    search_help_text = "Exact request id, at either end."
    ordering = ("-created_at", "-id")
    fields = (
        "from_request_id",
        "type",
        "to_request_id",
        "is_tree",
        "source",
        "tenant",
        "created_at",
        "created_by",
    )

    @admin.display(description="from", ordering="from_request_id")
    def from_request(self, obj: ProvenanceRelationship) -> SafeString:
        return _request_link(obj.from_request_id)

    @admin.display(description="to", ordering="to_request_id")
    def to_request(self, obj: ProvenanceRelationship) -> SafeString:
        return _request_link(obj.to_request_id)

    @admin.display(description="tenant", ordering="tenant")
    def tenant_id(self, obj: ProvenanceRelationship) -> SafeString:
        return clipped(obj.tenant, 24)

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: ProvenanceRelationship) -> str:
        return when(obj.created_at, seconds=True)


@admin.register(CycleAttempt)
class CycleAttemptAdmin(_ReadOnly):
    list_display = ("cycle", "type", "source", "attempted", "attempted_by")
    list_filter = ("type", "source")
    search_fields = ("=from_request_id", "=to_request_id")
    search_help_text = "Exact request id of the refused relationship's ends."
    ordering = ("-attempted_at", "-id")
    fields = (
        "cycle",
        "from_request_id",
        "type",
        "to_request_id",
        "source",
        "tenant",
        "attempted_at",
        "attempted_by",
    )
    readonly_fields = ("cycle",)

    @admin.display(description="cycle it would have closed")
    def cycle(self, obj: CycleAttempt) -> SafeString:
        return clipped(str(obj), 160)

    @admin.display(description="attempted", ordering="attempted_at")
    def attempted(self, obj: CycleAttempt) -> str:
        return when(obj.attempted_at, seconds=True)
