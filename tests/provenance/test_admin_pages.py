"""The provenance admin pages (issue 11): a usage row's lineage drawn with its costs, collapsed
past a size and downloadable as DOT; workflows with their steps and critical path; who may look."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client, override_settings
from django.utils import timezone

from tests.conftest import Persona, event, settle
from tokenmgr_project.core.principal import GLOBAL, Principal
from usage.models import TokenUsage
from usage.pricing import money
from usage.services import usage_ingest

pytestmark = pytest.mark.django_db

HOSTILE = "<script>alert(1)</script>"
SVG = "{http://www.w3.org/2000/svg}"


def ingest(*events: dict[str, Any]) -> None:
    results = usage_ingest(principal=Principal(scope=GLOBAL), events=list(events))
    assert [r.status for r in results] == ["created"] * len(events), results
    settle()


def linked(rid: str, parent: str = "", minute: int = 0, **fields: Any) -> dict[str, Any]:
    step = fields.pop("step", "")
    provenance = {"parent_request_id": parent, "workflow_step": step}
    at = timezone.now() - timedelta(minutes=30 - minute)
    return event(rid, provenance=provenance, occurred_at=at.isoformat(), **fields)


def pk(rid: str) -> int:
    return TokenUsage.objects.get(request_id=rid).pk


def lineage_page(who: Persona, rid: str, query: str = "") -> str:
    response = who.client.get(f"/admin/provenance/lineage/{pk(rid)}/{query}")
    assert response.status_code == 200, response.content
    return response.content.decode()


def svg_of(html: str) -> ET.Element:
    found = re.search(r'<svg xmlns="http://www.w3.org/2000/svg".*?</svg>', html, re.S)
    assert found, "no drawing in the page"
    return ET.fromstring(found[0])


def family() -> list[str]:
    ingest(
        linked("q", input_tokens=1000),
        linked("plan", "q", input_tokens=2000),
        linked("search", "plan", input_tokens=4000),
        linked("answer", "plan", input_tokens=500),
    )
    return ["q", "plan", "search", "answer"]


def test_it_links_a_usage_row_to_its_lineage_page(admin: Persona) -> None:
    ingest(linked("root"), linked("child", "root", workflow_id="wf-9"))
    change = admin.client.get(f"/admin/usage/tokenusage/{pk('child')}/change/").content.decode()
    lineage = re.search(r'<a href="([^"]+)">Lineage</a>', change)
    assert lineage
    assert 'href="/admin/provenance/workflows/wf-9/">workflow</a>' in change
    page = admin.client.get(lineage[1])
    assert page.status_code == 200
    assert "Lineage of child" in page.content.decode()


def test_it_draws_every_node_linked_to_its_usage_row_with_the_cumulative_cost(
    admin: Persona,
) -> None:
    ids = family()
    html = lineage_page(admin, "q")
    drawing = svg_of(html)
    drawn = {g.get("data-request-id") for g in drawing.iter(f"{SVG}g")}
    assert drawn == set(ids)
    hrefs = {a.get("href") for a in drawing.iter(f"{SVG}a")}
    assert hrefs == {f"/admin/usage/tokenusage/{pk(rid)}/change/" for rid in ids}
    total = sum((r.cost for r in TokenUsage.objects.all()), Decimal(0))
    assert f'id="tm-cost">{money(total)}<' in html
    for rid in ids:
        assert f'<a href="/admin/usage/tokenusage/{pk(rid)}/change/">{rid}</a>' in html


def test_it_collapses_the_tree_past_max_nodes(admin: Persona) -> None:
    ingest(linked("top"), *(linked(f"leaf-{i}", "top") for i in range(5)))
    html = lineage_page(admin, "top", "?max_nodes=2")
    assert len(list(svg_of(html).iter(f"{SVG}rect"))) == 2
    assert "+4 more" in html
    assert "?max_nodes=2" in html  # the folded box opens its own lineage at the same size


def test_it_downloads_the_lineage_as_dot(admin: Persona) -> None:
    family()
    response = admin.client.get(f"/admin/provenance/lineage/{pk('search')}/?format=dot")
    assert response["Content-Type"].startswith("text/vnd.graphviz")
    assert response["Content-Disposition"].startswith("attachment;")
    dot = response.content.decode()
    assert dot.startswith("digraph")
    assert all(f'"{rid}" [' in dot for rid in ["q", "plan", "search"])
    assert '"answer" [' not in dot  # a sibling's branch is not this request's lineage


def test_it_offers_the_whole_tree_from_a_node_below_the_top(admin: Persona) -> None:
    family()
    html = lineage_page(admin, "search")
    assert f'href="/admin/provenance/lineage/{pk("q")}/" id="tm-whole-tree"' in html


def test_it_escapes_a_hostile_request_id(admin: Persona) -> None:
    ingest(linked(HOSTILE, agent=HOSTILE), linked("kid", HOSTILE))
    html = lineage_page(admin, HOSTILE)
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    dot = admin.client.get(f"/admin/provenance/lineage/{pk('kid')}/?format=dot").content.decode()
    assert f'"{HOSTILE}"' in dot  # DOT is text for Graphviz, downloaded, never rendered


@override_settings(TOKENMGR_LINEAGE_MAX_NODES=3)
def test_it_suggests_max_depth_for_a_lineage_too_large_to_draw(admin: Persona) -> None:
    ingest(linked("big"), *(linked(f"k-{i}", "big") for i in range(3)))
    response = admin.client.get(f"/admin/provenance/lineage/{pk('big')}/")
    assert response.status_code == 422
    assert "max_depth" in response.content.decode()
    assert (
        admin.client.get(f"/admin/provenance/lineage/{pk('big')}/?max_depth=0").status_code == 200
    )


def test_it_shows_a_workflows_steps_and_critical_path_in_order(admin: Persona) -> None:
    wf = {"workflow_id": "wf-1"}
    ingest(
        linked("w-plan", "", 1, step="plan", latency_ms=100, **wf),
        linked("w-search", "w-plan", 2, step="search", latency_ms=900, **wf),
        linked("w-lint", "w-plan", 3, step="lint", latency_ms=10, input_tokens=90_000, **wf),
        linked("w-answer", "w-search", 4, step="answer", latency_ms=50, **wf),
    )
    html = admin.client.get("/admin/provenance/workflows/wf-1/").content.decode()
    steps = re.search(r'<table id="tm-steps">(.*?)</table>', html, re.S)
    assert steps
    assert re.findall(r'<td class="tm-rid">(\w+)', steps[1]) == ["plan", "search", "lint", "answer"]
    path = re.search(r'<ol class="tm-path" id="tm-critical-path">(.*?)</ol>', html, re.S)
    assert path
    assert re.findall(r'change/">([\w-]+)</a>', path[1]) == ["w-plan", "w-search", "w-answer"]
    assert "slowest step: <strong>search</strong>" in html
    assert "most expensive step: <strong>lint</strong>" in html


def test_it_lists_recent_workflows_and_opens_one_by_id(admin: Persona) -> None:
    ingest(linked("r-1", workflow_id="nightly/etl"))
    index = admin.client.get("/admin/provenance/workflows/").content.decode()
    assert 'href="/admin/provenance/workflows/nightly/etl/">nightly/etl</a>' in index
    opened = admin.client.get("/admin/provenance/workflows/", {"workflow_id": "nightly/etl"})
    assert opened["Location"] == "/admin/provenance/workflows/nightly/etl/"
    assert admin.client.get("/admin/provenance/workflows/nope/").status_code == 404


def test_it_lists_relationships_read_only(admin: Persona) -> None:
    ingest(linked("parent"), linked("kid", "parent"))
    listing = admin.client.get("/admin/provenance/provenancerelationship/").content.decode()
    assert "?q=kid" in listing
    assert "?q=parent" in listing
    assert admin.client.get("/admin/provenance/provenancerelationship/add/").status_code == 403
    assert admin.client.get("/admin/provenance/cycleattempt/").status_code == 200


def test_it_refuses_staff_without_the_usage_permission(
    staff_noperm: Persona, staff_viewer: Persona
) -> None:
    ingest(linked("x", workflow_id="wf-x"))
    pages = [f"/admin/provenance/lineage/{pk('x')}/", "/admin/provenance/workflows/"]
    pages.append("/admin/provenance/workflows/wf-x/")
    assert [staff_noperm.client.get(p).status_code for p in pages] == [403, 403, 403]
    assert [staff_viewer.client.get(p).status_code for p in pages] == [200, 200, 200]


def test_it_sends_anonymous_visitors_to_the_login() -> None:
    ingest(linked("y"))
    response = Client().get(f"/admin/provenance/lineage/{pk('y')}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
