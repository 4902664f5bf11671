"""The live admin pages (issue 10): the dashboard and the conversation feeds.

Staff pages inside the admin (its login, its look, its navigation), for users allowed to view
usage — the rule of the websocket routes they open. First figures come from the selectors the
API uses (reporting.selectors); after that only pushed updates change them (static/reporting/
live.js). Mounted under /admin/live/ by the project's URLconf.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse

from reporting import selectors, services
from reporting.models import StatusCategory
from usage.actions import VIEW_USAGE

MAX_CONVERSATION_ID = 128


def _context(request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    if not request.user.has_perm(VIEW_USAGE):
        raise PermissionDenied(f"The live pages need the {VIEW_USAGE} permission.")
    return {
        **admin.site.each_context(request),
        "title": title,
        "live": {
            "dashboard": reverse("live:dashboard"),
            "conversations": reverse("live:conversations"),
            "snapshot": reverse("live:snapshot"),
            "usage": reverse("admin:usage_tokenusage_changelist"),
            "budget": reverse("admin:budgets_budget_change", args=[0]).replace("/0/", "/{id}/"),
            "overrides": reverse("admin:budgets_budgetoverride_changelist")
            + "?status__exact=pending",
            "feed": reverse("live:feed", args=["__id__"]),
        },
        **extra,
    }


def dashboard(request: HttpRequest) -> HttpResponse:
    context = _context(request, "Live dashboard", snapshot=selectors.dashboard_snapshot())
    return TemplateResponse(request, "admin/live/dashboard.html", context)


def snapshot(request: HttpRequest) -> HttpResponse:
    """The dashboard's figures as JSON: what the page refetches once after a reconnect."""
    _context(request, "")
    return JsonResponse(selectors.dashboard_snapshot())


def conversations(request: HttpRequest) -> HttpResponse:
    context = _context(
        request,
        "Live conversations",
        conversations=selectors.active_conversations(),
        within_hours=int(selectors.ACTIVE_WITHIN.total_seconds() // 3600),
    )
    return TemplateResponse(request, "admin/live/conversations.html", context)


def feed(request: HttpRequest, conversation_id: str) -> HttpResponse:
    if len(conversation_id) > MAX_CONVERSATION_ID:
        raise Http404("No such conversation.")
    context = _context(
        request,
        f"Conversation {conversation_id}",
        conversation_id=conversation_id,
        categories=StatusCategory.values,
        dropped=services.status_dropped(),
    )
    return TemplateResponse(request, "admin/live/feed.html", context)


app_name = "live"
urlpatterns = [
    path("", admin.site.admin_view(dashboard), name="dashboard"),
    path("snapshot.json", admin.site.admin_view(snapshot), name="snapshot"),
    path("conversations/", admin.site.admin_view(conversations), name="conversations"),
    path("conversations/<path:conversation_id>/", admin.site.admin_view(feed), name="feed"),
]
