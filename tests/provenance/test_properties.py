"""Properties of the provenance graph (issue 11), over random inputs: no sequence of edge
insertions leaves a cycle, and a lineage's totals are always the sum of its nodes' own costs."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provenance import selectors
from provenance.models import CycleAttempt, ProvenanceRelationship
from provenance.services import EdgeIn, relationships_create
from tests.conftest import event, settle
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import GLOBAL, Principal
from usage import services
from usage.models import RelationshipType, TokenUsage

pytestmark = pytest.mark.django_db
ORG = Principal(scope=GLOBAL)
NODES = [f"n{i}" for i in range(8)]
TYPES = list(RelationshipType.values)
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


_examples = itertools.count()


def _clear() -> str:
    """Empty graph and ledger; a fresh id prefix (the buffer remembers ids it has seen)."""
    settle()
    TokenUsage.objects.all().delete()
    ProvenanceRelationship.objects.all().delete()
    CycleAttempt.objects.all().delete()
    return f"x{next(_examples)}-"


def _has_cycle() -> bool:
    out: dict[str, list[str]] = {}
    for frm, to in ProvenanceRelationship.objects.values_list("from_request_id", "to_request_id"):
        out.setdefault(frm, []).append(to)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in out:
        stack = [(start, iter(out.get(start, [])))]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                return True
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(out.get(child, []))))
    return False


edges = st.lists(
    st.tuples(st.sampled_from(NODES), st.sampled_from(NODES), st.sampled_from(TYPES)),
    min_size=1,
    max_size=25,
)


@PROPERTY
@given(attempts=edges)
def test_it_never_leaves_a_cycle_whatever_edges_are_tried(
    attempts: list[tuple[str, str, str]],
) -> None:
    x = _clear()
    services.usage_ingest(principal=ORG, events=[event(x + n) for n in NODES])
    settle()
    for frm, to, type_ in attempts:
        if frm == to:
            continue
        edge = EdgeIn(x + frm, x + to, type_)
        refused = None
        try:
            relationships_create(principal=ORG, tenant="org", edges=[edge])
        except ApiError as exc:
            refused = exc.status_code
        assert refused in (None, 409, 422)
        assert not _has_cycle()


# Each node's parent is one of the nodes before it (or none): any random forest.
forests = st.integers(min_value=1, max_value=30).flatmap(
    lambda n: st.tuples(
        st.tuples(*(st.integers(min_value=-1, max_value=i - 1) for i in range(n))),
        st.lists(st.integers(min_value=0, max_value=5000), min_size=n, max_size=n),
        st.booleans(),
    )
)


@PROPERTY
@given(forest=forests)
def test_it_sums_lineage_totals_from_the_nodes_own_costs(
    forest: tuple[tuple[int, ...], list[int], bool],
) -> None:
    parents, outputs, reverse = forest
    x = _clear()
    evs = []
    for i, (parent, out) in enumerate(zip(parents, outputs, strict=True)):
        prov = {"parent_request_id": f"{x}f{parent}"} if parent >= 0 else {}
        evs.append(event(f"{x}f{i}", output_tokens=out, **({"provenance": prov} if prov else {})))
    # Out of order too: children before their parents, one event per call.
    for ev in reversed(evs) if reverse else evs:
        services.usage_ingest(principal=ORG, events=[ev])
    settle()
    for root in (f"{x}f{i}" for i, p in enumerate(parents) if p < 0):
        row = selectors.node_for_principal(ORG, root)
        lineage = selectors.lineage_of(ORG, row)
        own = sum((n.row["cost"] for n in lineage.nodes), Decimal(0))
        assert lineage.totals()["cost"] == own
        assert lineage.nodes[0].subtree_cost == own
        assert lineage.nodes[0].subtree_size == len(lineage.nodes)
        ids = {n.request_id for n in lineage.nodes}
        assert all(TokenUsage.objects.get(request_id=i).depth is not None for i in ids)
