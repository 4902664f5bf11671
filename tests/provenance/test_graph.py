"""The lineage drawing: DOT text and SVG from a list of nodes, without Graphviz."""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from decimal import Decimal
from itertools import pairwise

from provenance.graph import Link, Node, to_dot, to_svg

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = ["<script>alert(1)</script>", 'say "hi"', "back\\slash\\", "{brace}", "ünï cödé ->"]


def tree(
    spec: list[tuple[str, str | None, str]], *, errors: frozenset[str] = frozenset()
) -> list[Node]:
    """Nodes from (request id, parent id, own cost); parents are listed before their children."""
    index = {rid: i for i, (rid, _, _) in enumerate(spec)}
    sub_cost = [Decimal(cost) for _, _, cost in spec]
    sub_size = [1] * len(spec)
    for i in range(len(spec) - 1, -1, -1):
        parent = spec[i][1]
        if parent in index:
            sub_cost[index[parent]] += sub_cost[i]
            sub_size[index[parent]] += sub_size[i]
    return [
        Node(
            request_id=rid,
            parent=parent,
            depth=0,
            agent=f"agent-{rid}",
            model="gpt-4o-mini",
            task_type="summarise",
            status="error" if rid in errors else "success",
            cost=Decimal(cost),
            tokens=100,
            subtree_cost=sub_cost[i],
            subtree_tokens=100 * sub_size[i],
            subtree_size=sub_size[i],
            url=f"/requests/{i}/",
        )
        for i, (rid, parent, cost) in enumerate(spec)
    ]


def family() -> list[Node]:
    return tree(
        [
            ("root", None, "0.001"),
            ("a", "root", "0.002"),
            ("b", "root", "0.0005"),
            ("a1", "a", "0.004"),
            ("a2", "a", "0.0001"),
            ("b1", "b", "0.0002"),
        ],
        errors=frozenset({"b1"}),
    )


def heap(count: int, fanout: int = 3) -> list[Node]:
    return tree([(f"r{i}", f"r{(i - 1) // fanout}" if i else None, "0.0001") for i in range(count)])


def drawn(svg: str) -> dict[str, ET.Element]:
    """Each drawn node's <g> by request id."""
    root = ET.fromstring(svg)
    return {g.attrib["data-request-id"]: g for g in root.iter(f"{SVG}g")}


def rect(g: ET.Element) -> ET.Element:
    found = g.find(f"{SVG}rect")
    assert found is not None
    return found


def boxes(svg: str) -> dict[str, tuple[float, float, float, float]]:
    """Each drawn node's rect as (x, y, width, height)."""
    found = {}
    for rid, g in drawn(svg).items():
        x, y, w, h = (float(rect(g).attrib[k]) for k in ("x", "y", "width", "height"))
        found[rid] = (x, y, w, h)
    return found


def lines(g: ET.Element) -> list[str]:
    return [t.text or "" for t in g.iter(f"{SVG}text")]


def luminance(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


def dot_node_ids(dot: str) -> list[str]:
    # Read as Graphviz's scanner reads a quoted string: backslash-quote is a quote, a backslash
    # pair stays two backslashes (so it cannot escape the closing quote), the rest is literal.
    found = re.findall(r'^  "((?:\\.|[^"\\])*)" \[', dot, flags=re.MULTILINE)
    return [re.sub(r'\\(["\\])', lambda m: '"' if m[1] == '"' else "\\\\", raw) for raw in found]


def test_it_draws_every_node_once() -> None:
    nodes = family()
    assert sorted(drawn(to_svg(nodes))) == sorted(n.request_id for n in nodes)
    assert sorted(dot_node_ids(to_dot(nodes))) == sorted(n.request_id for n in nodes)


def test_it_draws_the_same_picture_whatever_the_input_order() -> None:
    nodes = family()
    shuffled = random.Random(7).sample(nodes, len(nodes))
    assert to_svg(shuffled) == to_svg(nodes)
    assert to_dot(shuffled) == to_dot(nodes)


def test_it_shows_agent_model_and_costs_in_each_box() -> None:
    g = drawn(to_svg(family()))["a"]
    assert lines(g) == ["agent-a", "gpt-4o-mini", "own $0.002 · Σ $0.0061"]
    tip = g.findtext(f"{SVG}title") or ""
    assert "a\ntask: summarise" in tip
    assert "tokens: 100 own · 300 in subtree" in tip


def test_it_formats_money_to_at_most_six_decimals() -> None:
    spec = [("r", None, "1234.5678914"), ("x", "r", "1.5"), ("y", "r", "0.00000001")]
    shown = {rid: lines(g)[2] for rid, g in drawn(to_svg(tree(spec))).items()}
    assert shown["r"] == "own $1,234.567891 · Σ $1,236.067891"
    assert shown["x"] == "own $1.50 · Σ $1.50"
    assert shown["y"] == "own <$0.000001 · Σ <$0.000001"


def test_it_escapes_hostile_ids_in_dot() -> None:
    spec = [("top", None, "0.1"), *((rid, "top", "0.1") for rid in HOSTILE)]
    dot = to_dot(tree(spec))
    # Graphviz keeps a backslash pair as it is, so each id stays distinct and the file parses.
    assert sorted(dot_node_ids(dot)) == sorted(["top", *(r.replace("\\", "\\\\") for r in HOSTILE)])
    outside_strings = re.sub(r'"(?:\\.|[^"\\])*"', "", dot)
    assert outside_strings.count("{") == 1
    assert outside_strings.count("}") == 1
    assert "<" not in outside_strings


def test_it_escapes_hostile_ids_and_agents_in_svg() -> None:
    hostile = "<script>alert(1)</script>"
    node = tree([(hostile, None, "0.1")])[0]
    svg = to_svg([replace(node, agent=hostile)], links=[Link(hostile, hostile, hostile)])
    root = ET.fromstring(svg)
    assert not [e for e in root.iter() if e.tag.endswith("script")]
    assert "<script>" not in svg
    assert lines(drawn(svg)[hostile])[0] == "<script>alert(1)</script>"[:23] + "…"
    assert (drawn(svg)[hostile].findtext(f"{SVG}title") or "").startswith(hostile)


def test_it_renders_svg_that_parses_as_xml() -> None:
    spec = [("top", None, "0.1"), *((rid, "top", "0.1") for rid in [*HOSTILE, "ctl\x01\x1f"])]
    root = ET.fromstring(to_svg(tree(spec), title='a "quoted" & <odd> title'))
    assert root.tag == f"{SVG}svg"
    assert root.findtext(f"{SVG}title") == 'a "quoted" & <odd> title'
    assert root.attrib["viewBox"] == f"0 0 {root.attrib['width']} {root.attrib['height']}"


def test_it_puts_children_below_parents_and_keeps_siblings_apart() -> None:
    nodes = heap(40)
    box = boxes(to_svg(nodes))
    for node in nodes:
        if node.parent is not None:
            _, parent_y, _, parent_h = box[node.parent]
            assert box[node.request_id][1] > parent_y + parent_h
    rows: dict[float, list[float]] = {}
    for x, y, _, _ in box.values():
        rows.setdefault(y, []).append(x)
    for xs in rows.values():
        xs.sort()
        assert all(right - left >= 180 for left, right in pairwise(xs))


def test_it_centres_a_parent_over_its_children() -> None:
    box = boxes(to_svg(family()))
    assert box["a"][0] == (box["a1"][0] + box["a2"][0]) / 2
    assert box["b"][0] == box["b1"][0]


def test_it_colours_the_most_expensive_node_darkest() -> None:
    groups = drawn(to_svg(family()))
    fills = {rid: rect(g).attrib["fill"] for rid, g in groups.items()}
    assert min(fills, key=lambda rid: luminance(fills[rid])) == "a1"
    assert luminance(fills["a2"]) > luminance(fills["root"]) > luminance(fills["a1"])
    assert groups["a1"].attrib["fill"] == "#ffffff"
    assert groups["a2"].attrib["fill"] != "#ffffff"


def test_it_marks_error_nodes_with_a_red_border() -> None:
    groups = drawn(to_svg(family()))
    assert rect(groups["b1"]).attrib["class"] == "n err"
    assert rect(groups["b"]).attrib["class"] == "n"
    b1 = next(line for line in to_dot(family()).splitlines() if line.startswith('  "b1" ['))
    assert 'color="#d62728"' in b1


def test_it_collapses_to_max_nodes_and_shows_the_hidden_count_and_cost() -> None:
    svg = to_svg(family(), max_nodes=3)
    groups = drawn(svg)
    assert sorted(groups) == ["a", "b", "root"]
    assert lines(groups["a"])[3] == "+2 more · Σ $0.0041"
    assert lines(groups["b"])[3] == "+1 more · Σ $0.0002"
    assert len(lines(groups["root"])) == 3


def test_it_prefers_the_dearest_children_when_collapsing() -> None:
    groups = drawn(to_svg(family(), max_nodes=4))
    assert sorted(groups) == ["a", "a1", "b", "root"]
    assert lines(groups["a"])[3] == "+1 more · Σ $0.0001"


def test_it_links_collapsed_nodes_to_expand_url() -> None:
    svg = to_svg(family(), max_nodes=3, expand_url=lambda rid: f"/lineage/{rid}/?expand=1")
    root = ET.fromstring(svg)
    hrefs = {a[0].attrib["data-request-id"]: a.attrib["href"] for a in root.iter(f"{SVG}a")}
    assert hrefs == {
        "root": "/requests/0/",
        "a": "/lineage/a/?expand=1",
        "b": "/lineage/b/?expand=1",
    }


def test_it_keeps_a_collapsed_tree_consistent() -> None:
    nodes = tree(
        [
            (f"r{i}", f"r{random.Random(i).randrange(i)}" if i else None, f"0.00{i % 9}")
            for i in range(2000)
        ]
    )
    parent = {n.request_id: n.parent for n in nodes}
    shown = drawn(to_svg(nodes, max_nodes=50))
    assert len(shown) == 50
    assert all(parent[rid] is None or parent[rid] in shown for rid in shown)


def test_it_links_nodes_to_their_url_and_drops_script_urls() -> None:
    nodes = tree([("good", None, "0.1"), ("bad", "good", "0.1")])
    nodes[1] = replace(nodes[1], url="javascript:alert(1)")
    svg = to_svg(nodes)
    assert [a.attrib["href"] for a in ET.fromstring(svg).iter(f"{SVG}a")] == ["/requests/0/"]
    assert "javascript" not in to_dot(nodes)
    assert 'URL="/requests/0/"' in to_dot(nodes)


def test_it_draws_dot_edges_for_each_parent_and_dashed_links() -> None:
    links = [Link("a2", "a1", "retry_of"), Link("b1", "gone", "cached_from")]
    dot = to_dot(family(), links=links, title="lineage of root")
    assert dot.startswith('digraph "lineage of root" {')
    assert "rankdir=TB" in dot
    edges = re.findall(r'^  "(\w+)" -> "(\w+)";$', dot, flags=re.MULTILINE)
    assert sorted(edges) == [("a", "a1"), ("a", "a2"), ("b", "b1"), ("root", "a"), ("root", "b")]
    dashed = [line for line in dot.splitlines() if "style=dashed" in line]
    assert len(dashed) == 1
    assert dashed[0].startswith('  "a2" -> "a1" [')
    assert 'label="retry_of"' in dashed[0]


def test_it_draws_svg_links_only_between_drawn_nodes() -> None:
    links = [Link("a2", "a1", "retry_of"), Link("b1", "a", "cached_from")]
    root = ET.fromstring(to_svg(family(), links=links, max_nodes=4))
    labels = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "lt"]
    assert labels == []
    root = ET.fromstring(to_svg(family(), links=links))
    labels = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "lt"]
    assert labels == ["retry_of", "cached_from"]
    assert len([p for p in root.iter(f"{SVG}path") if p.attrib.get("class") == "l"]) == 2


def test_it_draws_a_forest_side_by_side() -> None:
    nodes = tree([("one", None, "0.2"), ("two", None, "0.1"), ("one-1", "one", "0.1")])
    box = boxes(to_svg(nodes))
    assert box["one"][1] == box["two"][1]
    assert box["two"][0] >= box["one-1"][0] + 180
    assert len(dot_node_ids(to_dot(nodes))) == 3


def test_it_treats_a_parent_that_is_not_given_as_a_top() -> None:
    nodes = tree([("orphan", "elsewhere", "0.1"), ("kid", "orphan", "0.1")])
    box = boxes(to_svg(nodes))
    assert box["orphan"][1] < box["kid"][1]
    assert '"elsewhere"' not in to_dot(nodes)


def test_it_draws_nodes_caught_in_a_parent_cycle_once() -> None:
    nodes = tree([("top", None, "0.1"), ("x", "y", "0.1"), ("y", "x", "0.1")])
    assert sorted(drawn(to_svg(nodes))) == ["top", "x", "y"]
    assert to_dot(nodes).count(" -> ") == 1


def test_it_renders_an_empty_list() -> None:
    root = ET.fromstring(to_svg([]))
    assert drawn(to_svg([])) == {}
    assert int(root.attrib["width"]) > 0
    assert to_dot([]).startswith("digraph")


def test_it_renders_a_10k_tree() -> None:
    nodes = heap(10_000)
    assert len(drawn(to_svg(nodes))) == 10_000
    assert to_dot(nodes).count(" -> ") == 9_999


def test_it_renders_a_10k_deep_chain_without_recursion() -> None:
    nodes = heap(10_000, fanout=1)
    box = boxes(to_svg(nodes))
    assert len(box) == 10_000
    assert box["r9999"][1] > box["r0"][1]
    assert to_dot(nodes).count(" -> ") == 9_999
    assert len(drawn(to_svg(nodes, max_nodes=100))) == 100
