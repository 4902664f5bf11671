"""The provenance admin pages (issue 11): a usage row's lineage drawn as a tree with its costs and
a DOT download, and workflows with their steps, critical path and bottleneck.

Staff pages inside the admin (its login, its look), for users allowed to view usage — the rule
of the lineage and workflow APIs, whose selectors they run. Mounted under /admin/provenance/ by
the project's URLconf, before the admin's catch-all.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Max, Sum
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.safestring import mark_safe

from provenance import actions, graph, selectors
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage.admin.display import EMPTY
from usage.models import TokenUsage
from usage.pricing import money
from usage.selectors import usage_for_principal

DEFAULT_MAX_NODES, MAX_MAX_NODES = 300, 5000
MAX_DEPTH = 1000  # as the lineage API (provenance.schemas.LineageIn)
MAX_WORKFLOW_ID = 128  # TokenUsage.workflow_id
RECENT_WORKFLOWS, RECENT_DAYS = 50, 30
DOT_TYPE = "text/vnd.graphviz; charset=utf-8"


def _principal(request: HttpRequest) -> Principal:
    if not request.user.has_perm(actions.VIEW_USAGE):
        raise PermissionDenied(f"The provenance pages need the {actions.VIEW_USAGE} permission.")
    return Principal.for_staff(request.user)


def _context(request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    return {
        **admin.site.each_context(request),
        "title": title,
        "workflows_url": reverse("lineage_pages:workflows"),
        **extra,
    }


def _number(request: HttpRequest, name: str, bounds: tuple[int, int]) -> int | None:
    # A person typed it: a value that is no number is ignored, one out of bounds is clamped.
    raw = request.GET.get(name, "").strip()
    return max(bounds[0], min(int(raw), bounds[1])) if raw.isdigit() else None


def _share(part: Decimal, whole: Decimal) -> str:
    return f"{part / whole * 100:.1f} %" if whole else EMPTY


def _lineage_url(pk: int, **params: int | str | None) -> str:
    query = {k: v for k, v in params.items() if v is not None}
    url = reverse("lineage_pages:lineage", args=[pk])
    return f"{url}?{urlencode(query)}" if query else url


# --- lineage -------------------------------------------------------------------------------------


def lineage(request: HttpRequest, pk: int) -> HttpResponse:
    principal = _principal(request)
    try:
        row = usage_for_principal(principal).get(pk=pk)
    except TokenUsage.DoesNotExist:
        raise Http404("No such usage row.") from None
    max_nodes = _number(request, "max_nodes", (1, MAX_MAX_NODES)) or DEFAULT_MAX_NODES
    max_depth = _number(request, "max_depth", (0, MAX_DEPTH))
    dot = request.GET.get("format") == "dot"
    title = f"Lineage of {row.request_id}"
    try:
        found = selectors.lineage_of(principal, row, max_depth=max_depth)
    except ApiError as exc:
        if exc.status_code != 422:
            raise
        if dot:
            return HttpResponse(exc.message, status=422, content_type="text/plain; charset=utf-8")
        context = _context(
            request, title, row=row, too_large=exc.message, max_nodes=max_nodes, max_depth=max_depth
        )
        return TemplateResponse(request, "admin/provenance/lineage.html", context, status=422)

    nodes, links = actions.graph_nodes(found), actions.graph_links(found)
    if dot:
        response = HttpResponse(
            graph.to_dot(nodes, links=links, title=title.lower()), content_type=DOT_TYPE
        )
        response["Content-Disposition"] = f'attachment; filename="lineage-{row.pk}.dot"'
        return response

    pks = {n.request_id: int(n.row["pk"]) for n in found.nodes}
    keep = {
        "max_nodes": None if max_nodes == DEFAULT_MAX_NODES else max_nodes,
        "max_depth": max_depth,
    }
    svg = graph.to_svg(
        nodes,
        links=links,
        max_nodes=max_nodes,
        expand_url=lambda request_id: _lineage_url(pks[request_id], **keep),
        title=title.lower(),
    )
    totals = found.totals()
    top = found.nodes[0]
    context = _context(
        request,
        title,
        row=row,
        usage_url=actions.usage_admin_url(row.pk),
        svg=mark_safe(svg),  # graph.to_svg escapes every text and attribute it writes
        totals={
            **totals,
            "tokens": f"{totals['tokens']:,}",
            "input_tokens": f"{totals['input_tokens']:,}",
            "output_tokens": f"{totals['output_tokens']:,}",
            "cost": money(totals["cost"]),
        },
        drawn=min(max_nodes, len(found.nodes)),
        nodes=[_node_row(n, row.request_id, totals["cost"]) for n in found.nodes[:max_nodes]],
        max_nodes=max_nodes,
        max_depth=max_depth,
        limit_max_nodes=MAX_MAX_NODES,
        dot_url=_lineage_url(row.pk, **keep, format="dot"),
        whole_tree_url=(
            _lineage_url(int(top.row["pk"]), **keep) if top.request_id != row.request_id else ""
        ),
        top=top,
        waiting_for=found.waiting_for,
        cut_at_depth=found.cut_at_depth,
        workflow_url=(
            reverse("lineage_pages:workflow", args=[row.workflow_id]) if row.workflow_id else ""
        ),
    )
    return TemplateResponse(request, "admin/provenance/lineage.html", context)


def _node_row(node: selectors.LineageNode, focus: str, total: Decimal) -> dict[str, Any]:
    r = node.row
    return {
        "request_id": node.request_id,
        "focus": node.request_id == focus,
        "usage_url": actions.usage_admin_url(r["pk"]),
        "lineage_url": _lineage_url(r["pk"]),
        "agent": r["agent"],
        "model": f"{r['provider']}/{r['model']}" if r["provider"] else r["model"],
        "depth": r["depth"],
        "level": node.level,
        "status": r["status"],
        "tokens": f"{node.tokens:,}",
        "cost": money(r["cost"]),
        "subtree_cost": money(node.subtree_cost),
        "subtree_size": node.subtree_size,
        "share": _share(r["cost"], total),
    }


# --- workflows -----------------------------------------------------------------------------------


def workflows(request: HttpRequest) -> HttpResponse:
    principal = _principal(request)
    wanted = request.GET.get("workflow_id", "").strip()
    if wanted:
        return HttpResponseRedirect(reverse("lineage_pages:workflow", args=[wanted]))
    since = timezone.now() - timedelta(days=RECENT_DAYS)
    recent = (
        usage_for_principal(principal)
        .filter(occurred_at__gte=since)
        .exclude(workflow_id="")
        .values("workflow_id")
        .annotate(requests=Count("id"), cost=Sum("cost"), last=Max("occurred_at"))
        .order_by("-last", "workflow_id")[:RECENT_WORKFLOWS]
    )
    context = _context(
        request,
        "Workflows",
        recent=[
            {
                **w,
                "cost": money(w["cost"]),
                "url": reverse("lineage_pages:workflow", args=[w["workflow_id"]]),
            }
            for w in recent
        ],
        limit=RECENT_WORKFLOWS,
        days=RECENT_DAYS,
        max_length=MAX_WORKFLOW_ID,
    )
    return TemplateResponse(request, "admin/provenance/workflows.html", context)


def workflow(request: HttpRequest, workflow_id: str) -> HttpResponse:
    principal = _principal(request)
    title = f"Workflow {workflow_id}"
    try:
        if len(workflow_id) > MAX_WORKFLOW_ID:
            raise ApiError("No such workflow.", status_code=404)
        found = selectors.workflow_usage(principal, workflow_id, None, None)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        context = _context(request, title, workflow_id=workflow_id, missing=exc.message)
        return TemplateResponse(request, "admin/provenance/workflow.html", context, status=404)

    totals = found["totals"]
    path_rows = found["critical_path"]
    slowest = found["bottleneck"]["slowest_step"]
    dearest = found["bottleneck"]["most_expensive_step"]
    context = _context(
        request,
        title,
        workflow_id=workflow_id,
        truncated=found["truncated"],
        totals={
            "requests": f"{totals['requests']:,}",
            "tokens": f"{totals['tokens']:,}",
            "cost": money(totals["cost"]),
            "errors": totals["errors"],
            "latency_ms": f"{totals['latency_ms']:,}",
        },
        steps=[
            {
                "step": s["step"],
                "requests": s["requests"],
                "tokens": f"{s['input_tokens'] + s['output_tokens']:,}",
                "cost": money(s["cost"]),
                "share": f"{s['cost_share_percent']} %",
                "errors": s["errors"],
                "latency_ms": f"{s['latency_ms']:,}",
                "mean_latency_ms": f"{s['mean_latency_ms']:,}",
                "slowest": s["step"] == slowest,
                "dearest": s["step"] == dearest,
            }
            for s in found["steps"]
        ],
        slowest=slowest,
        dearest=dearest,
        path=[
            {
                "request_id": r["request_id"],
                "usage_url": actions.usage_admin_url(r["pk"]),
                "lineage_url": _lineage_url(r["pk"]),
                "step": r["workflow_step"] or r["task_type"] or EMPTY,
                "agent": r["agent"] or EMPTY,
                "latency_ms": f"{r['latency_ms'] or 0:,}",
                "cost": money(r["cost"]),
                "status": r["status"],
            }
            for r in path_rows
        ],
        path_latency_ms=f"{sum(r['latency_ms'] or 0 for r in path_rows):,}",
        path_cost=money(sum((r["cost"] for r in path_rows), Decimal(0))),
        requests_url=reverse("admin:usage_tokenusage_changelist")
        + "?"
        + urlencode({"workflow_id": workflow_id}),
    )
    return TemplateResponse(request, "admin/provenance/workflow.html", context)


app_name = "lineage_pages"
urlpatterns = [
    path("lineage/<int:pk>/", admin.site.admin_view(lineage), name="lineage"),
    path("workflows/", admin.site.admin_view(workflows), name="workflows"),
    path("workflows/<path:workflow_id>/", admin.site.admin_view(workflow), name="workflow"),
]
