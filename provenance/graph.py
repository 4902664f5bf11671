"""Draw a request lineage tree (a request and the requests it caused) as Graphviz DOT text or as
a self-contained SVG, without Graphviz. Every walk is an explicit loop: chains run 10,000 deep."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal


@dataclass(frozen=True, slots=True)
class Node:
    request_id: str
    parent: str | None
    depth: int
    agent: str
    model: str
    task_type: str
    status: str
    cost: Decimal
    tokens: int
    subtree_cost: Decimal
    subtree_tokens: int
    subtree_size: int
    url: str = ""


@dataclass(frozen=True, slots=True)
class Link:
    from_id: str
    to_id: str
    type: str


BOX_W, BOX_H, BOX_H_COLLAPSED = 180, 54, 68
GAP_X, GAP_Y, MARGIN = 16, 36, 16
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
ERROR_RED = "#d62728"
# A sequential blue ramp (ColorBrewer "Blues"-like): pale for a cheap node, dark for the dearest.
_RAMP = ((0xF3, 0xF6, 0xFB), (0xC6, 0xDB, 0xEF), (0x6B, 0xAE, 0xD6), (0x21, 0x71, 0xB5),
         (0x08, 0x30, 0x6B))  # fmt: skip
_MICRO = Decimal("0.000001")
_ZERO = Decimal(0)
_STYLE = (
    "<style>.e{fill:none;stroke:#9aa5b8;stroke-width:1.2}"
    ".l{fill:none;stroke:#7a5195;stroke-width:1.2;stroke-dasharray:5 4}"
    ".lt{font-size:10px;fill:#5b3a7a;text-anchor:middle;paint-order:stroke;stroke:#fff;"
    "stroke-width:3px}"
    "rect.n{stroke:#8da2c0;stroke-width:1}rect.err{stroke:#d62728;stroke-width:2.5}"
    "g text{text-anchor:middle}.t1{font-size:12px;font-weight:600}.t2{font-size:11px}"
    ".t3{font-size:10px}.t4{font-size:10px;font-style:italic}</style>"
)
# XML 1.0 forbids these code points outright, so one would make the whole document unparsable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    # Chained replace is several times faster than str.translate (10,000 nodes, 6 strings each).
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _NOT_XML.sub("\ufffd", text.replace('"', "&quot;"))


def _dot(text: str) -> str:
    # Graphviz's scanner reads `\\` as a pair (so a trailing backslash cannot eat the closing
    # quote) and `\"` as a quote; in labels the doubled backslash also disarms \N, \l and friends.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'


def _money(value: Decimal) -> str:
    rounded = value.quantize(_MICRO, rounding=ROUND_HALF_UP)
    sign = "-" if rounded < 0 or (rounded == 0 and value < 0) else ""
    if rounded == 0 and value != 0:
        return f"{sign}<$0.000001"
    whole, _, frac = f"{abs(rounded):,f}".partition(".")
    return f"{sign}${whole}.{frac.rstrip('0').ljust(2, '0')}"


def _safe_url(url: str) -> str:
    # Links come from the caller, but a javascript: or data: URL would run in the viewer's page.
    head = url.strip().split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if ":" in head and head.split(":", 1)[0].lower() not in ("http", "https"):
        return ""
    return url.strip()


def _ramp(share: float) -> tuple[str, str]:
    pos = share * (len(_RAMP) - 1)
    i = min(int(pos), len(_RAMP) - 2)
    lo, hi = _RAMP[i], _RAMP[i + 1]
    r, g, b = (round(lo[k] + (hi[k] - lo[k]) * (pos - i)) for k in range(3))
    dark = 0.299 * r + 0.587 * g + 0.114 * b < 140  # perceived luminance: white text reads better
    return f"#{r:02x}{g:02x}{b:02x}", "#ffffff" if dark else "#1b2330"


# 257 steps are finer than the eye can tell apart and spare 10,000 interpolations.
_PALETTE = [_ramp(k / 256) for k in range(257)]


def _colours(cost: Decimal, max_cost: Decimal) -> tuple[str, str]:
    """Fill and text colour for a node by its own cost (the dearest node is darkest)."""
    if max_cost <= 0 or cost <= 0:
        return _PALETTE[0]
    return _PALETTE[min(round(float(cost / max_cost) * 256), 256)]


def _rank(node: Node) -> tuple[Decimal, str]:
    return (-node.subtree_cost, node.request_id)


def _forest(nodes: Sequence[Node]) -> tuple[list[Node], dict[str, list[Node]], list[Node]]:
    """Tops, children by parent id and breadth-first order; siblings dearest subtree first.

    A duplicate request id keeps its first occurrence; a node caught in a parent cycle becomes a
    top so that every node is drawn exactly once."""
    by_id: dict[str, Node] = {}
    for node in nodes:
        by_id.setdefault(node.request_id, node)
    raw: dict[str, list[Node]] = {}
    tops: list[Node] = []
    for node in by_id.values():
        if node.parent is not None and node.parent in by_id and node.parent != node.request_id:
            raw.setdefault(node.parent, []).append(node)
        else:
            tops.append(node)
    for siblings in raw.values():
        siblings.sort(key=_rank)
    tops.sort(key=_rank)
    kids: dict[str, list[Node]] = {}
    order: list[Node] = []
    seen: set[str] = set()
    first_tops = len(tops)
    for index, start in enumerate([*tops, *by_id.values()]):
        if start.request_id in seen:
            continue
        if index >= first_tops:  # only a node in a parent cycle is still unseen here
            tops.append(start)
        seen.add(start.request_id)
        begin = len(order)
        order.append(start)
        while begin < len(order):
            current = order[begin]
            begin += 1
            fresh = [c for c in raw.get(current.request_id, ()) if c.request_id not in seen]
            if fresh:
                kids[current.request_id] = fresh
                seen.update(c.request_id for c in fresh)
                order.extend(fresh)
    return tops, kids, order


def to_dot(nodes: Sequence[Node], *, links: Sequence[Link] = (), title: str = "lineage") -> str:
    _, kids, order = _forest(nodes)
    total = sum((n.cost for n in order), _ZERO)
    max_cost = max((n.cost for n in order), default=_ZERO)
    out = [
        f"digraph {_dot(title)} {{",
        f'  graph [rankdir=TB, label={_dot(title)}, labelloc=t, fontname="sans-serif"];',
        '  node [shape=box, style="rounded,filled", fontname="sans-serif", fontsize=10, '
        'color="#8da2c0"];',
        '  edge [color="#9aa5b8", arrowsize=0.6];',
    ]
    for node in order:
        fill, ink = _colours(node.cost, max_cost)
        costs = f"own {_money(node.cost)} · Σ {_money(node.subtree_cost)}"
        label = f"{node.agent or '—'}\n{node.model}\n{costs}"
        attrs = [
            f"label={_dot(label)}",
            f'fillcolor="{fill}", fontcolor="{ink}"',
            f"tooltip={_dot(_tooltip(node, total, costs))}",
        ]
        if node.status == "error":
            attrs.append(f'color="{ERROR_RED}", penwidth=2.5')
        if url := _safe_url(node.url):
            attrs.append(f"URL={_dot(url)}")
        out.append(f"  {_dot(node.request_id)} [{', '.join(attrs)}];")
    for node in order:
        out.extend(
            f"  {_dot(node.request_id)} -> {_dot(child.request_id)};"
            for child in kids.get(node.request_id, ())
        )
    present = {n.request_id for n in order}
    out.extend(
        f"  {_dot(link.from_id)} -> {_dot(link.to_id)} [style=dashed, constraint=false, "
        f'color="#7a5195", fontcolor="#5b3a7a", fontsize=9, label={_dot(link.type)}];'
        for link in links
        if link.from_id in present and link.to_id in present
    )
    out.append("}")
    return "\n".join(out) + "\n"


def _tooltip(node: Node, total: Decimal, costs: str) -> str:
    share = f" ({float(node.cost / total):.1%} of total)" if total > 0 else ""
    return (
        f"{node.request_id}\ntask: {node.task_type or '—'} · {node.status}\n"
        f"tokens: {node.tokens:,} own · {node.subtree_tokens:,} in subtree\n"
        f"cost: {costs}{share}"
    )


def _select(tops: list[Node], kids: dict[str, list[Node]], budget: int) -> set[str]:
    """Ids to draw: breadth-first from the tops, each level dearest subtree first."""
    drawn: set[str] = set()
    level = tops
    while level and len(drawn) < budget:
        level = sorted(level, key=_rank)[: budget - len(drawn)]
        drawn.update(n.request_id for n in level)
        level = [c for n in level for c in kids.get(n.request_id, ())]
    return drawn


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _collapse(
    tops: list[Node], kids: dict[str, list[Node]], budget: int
) -> tuple[list[Node], dict[str, list[Node]], dict[str, tuple[int, Decimal]]]:
    """The drawn tops and children, and per collapsed node the count and cost it hides."""
    drawn = _select(tops, kids, budget)
    shown: dict[str, list[Node]] = {}
    hidden: dict[str, tuple[int, Decimal]] = {}
    for pid, children in kids.items():
        if pid not in drawn:
            continue
        shown[pid] = [c for c in children if c.request_id in drawn]
        # A left-out child takes its whole subtree with it (a drawn node's parent is drawn).
        left_out = [c for c in children if c.request_id not in drawn]
        if left_out:
            count = sum(c.subtree_size for c in left_out)
            hidden[pid] = (count, sum((c.subtree_cost for c in left_out), _ZERO))
    drawn_tops = [t for t in tops if t.request_id in drawn]
    return drawn_tops, {pid: c for pid, c in shown.items() if c}, hidden


def _layout(
    tops: list[Node], kids: dict[str, list[Node]], row_h: int
) -> tuple[list[tuple[Node, int]], dict[str, tuple[int, int]]]:
    """Nodes in drawing order (depth first) with their depth, and each box's top-left corner.

    Leaves take consecutive slots left to right; a parent sits midway over its outer children,
    so subtrees never overlap."""
    placed: list[tuple[Node, int]] = []
    slot_of: dict[str, float] = {}
    slot = 0.0
    for i, top in enumerate(tops):
        slot += 0.5 if i else 0.0  # a little air between separate trees of a forest
        stack = [(top, 0)]
        while stack:
            node, depth = stack.pop()
            placed.append((node, depth))
            children = kids.get(node.request_id)
            if children:
                stack.extend((c, depth + 1) for c in reversed(children))
            else:
                slot_of[node.request_id] = slot
                slot += 1
    for node, _ in reversed(placed):
        children = kids.get(node.request_id)
        if children:
            first, last = slot_of[children[0].request_id], slot_of[children[-1].request_id]
            slot_of[node.request_id] = (first + last) / 2
    # Whole pixels keep the output short; the 16 px gap leaves room for the rounding.
    corner = {
        node.request_id: (
            MARGIN + round(slot_of[node.request_id] * (BOX_W + GAP_X)),
            MARGIN + depth * (row_h + GAP_Y),
        )
        for node, depth in placed
    }
    return placed, corner


def _link_svg(link: Link, a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[str, int]:
    """A dashed curve with its type as a label, and how far right the curve reaches."""
    (ax, ay, ah), (bx, by, bh) = a, b
    sy, ey = ay + ah // 2, by + bh // 2
    if abs(bx - ax) < BOX_W:  # stacked boxes: leave by the right sides and bulge outwards
        sx, ex = ax + BOX_W, bx + BOX_W
        qx, qy = max(sx, ex) + 24 + abs(ey - sy) // 6, (sy + ey) // 2
    else:  # side by side: join the facing sides with an arch above them
        sx, ex = (ax + BOX_W, bx) if bx > ax else (ax, bx + BOX_W)
        qx, qy = (sx + ex) // 2, max(min(sy, ey) - 28, 4)
    lx, ly = (sx + 2 * qx + ex) // 4, (sy + 2 * qy + ey) // 4  # the curve's midpoint
    return (
        f'<path class="l" marker-end="url(#tm-arrow)" d="M{sx},{sy}Q{qx},{qy} {ex},{ey}"/>'
        f'<text class="lt" x="{lx}" y="{ly - 3}">{_xml(link.type)}</text>',
        qx,
    )


def to_svg(
    nodes: Sequence[Node],
    *,
    links: Sequence[Link] = (),
    max_nodes: int | None = None,
    expand_url: Callable[[str], str] | None = None,
    title: str = "lineage",
) -> str:
    tops, kids, order = _forest(nodes)
    total = sum((n.cost for n in order), _ZERO)
    max_cost = max((n.cost for n in order), default=_ZERO)
    hidden: dict[str, tuple[int, Decimal]] = {}
    if max_nodes is not None and max_nodes < len(order):
        tops, kids, hidden = _collapse(tops, kids, max(max_nodes, 0))
    row_h = BOX_H_COLLAPSED if hidden else BOX_H
    placed, corner = _layout(tops, kids, row_h)
    box = {r: (x, y, BOX_H_COLLAPSED if r in hidden else BOX_H) for r, (x, y) in corner.items()}
    right = max((x + BOX_W for x, _, _ in box.values()), default=MARGIN)
    bottom = max((y + row_h for _, y, _ in box.values()), default=MARGIN)
    half = BOX_W // 2

    edges: list[str] = []
    for pid, children in kids.items():
        px, py, ph = box[pid]
        x1, y1 = px + half, py + ph
        for child in children:
            cx, cy, _ = box[child.request_id]
            x2, ym = cx + half, (y1 + cy) // 2
            edges.append(f"M{x1},{y1}C{x1},{ym} {x2},{ym} {x2},{cy}")

    body: list[str] = []
    for node, _ in placed:
        x, y, h = box[node.request_id]
        fill, ink = _colours(node.cost, max_cost)
        costs = f"own {_money(node.cost)} · Σ {_money(node.subtree_cost)}"
        tip, more, href = _tooltip(node, total, costs), "", node.url
        if node.request_id in hidden:
            count, cost = hidden[node.request_id]
            more = f"+{count:,} more · Σ {_money(cost)}"
            tip += f"\n{more} not drawn"
            more = f'<text class="t4" x="{x + half}" y="{y + 59}">{_xml(more)}</text>'
            if expand_url is not None:
                href = expand_url(node.request_id)
        href = _safe_url(href)
        if href:
            body.append(f'<a href="{_xml(href)}">')
        body.append(
            f'<g fill="{ink}" data-request-id="{_xml(node.request_id)}"><title>{_xml(tip)}</title>'
            f'<rect class="{"n err" if node.status == "error" else "n"}" x="{x}" y="{y}" '
            f'width="{BOX_W}" height="{h}" rx="6" fill="{fill}"/>'
            f'<text class="t1" x="{x + half}" y="{y + 17}">{_xml(_fit(node.agent or "—", 24))}'
            f'</text><text class="t2" x="{x + half}" y="{y + 31}">{_xml(_fit(node.model, 28))}'
            f'</text><text class="t3" x="{x + half}" y="{y + 45}">{_xml(costs)}</text>{more}'
            f"{'</g></a>' if href else '</g>'}"
        )
    for link in links:
        if link.from_id in box and link.to_id in box:
            drawn, reach = _link_svg(link, box[link.from_id], box[link.to_id])
            body.append(drawn)
            right = max(right, reach)

    width, height = right + MARGIN, bottom + MARGIN
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_xml(FONT)}" role="img" '
        f'aria-label="{_xml(title)}"><title>{_xml(title)}</title>{_STYLE}'
        '<defs><marker id="tm-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0L8,4L0,8z" fill="#7a5195"/></marker></defs>',
    ]
    if edges:
        head.append(f'<path class="e" d="{"".join(edges)}"/>')
    return "".join([*head, *body, "</svg>\n"])
