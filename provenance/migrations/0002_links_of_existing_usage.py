"""Edges and depth for usage recorded before lineage existed: each row with a parent gets its
tree edge, then depth and root are resolved level by level from the roots (bounded)."""

from typing import Any

from django.db import migrations
from django.db.models import OuterRef, Subquery
from django.utils import timezone

_LEVELS = 1000


def forwards(apps: Any, schema_editor: Any) -> None:
    usage = apps.get_model("usage", "TokenUsage")
    edge = apps.get_model("provenance", "ProvenanceRelationship")
    linked = usage.objects.exclude(parent_request_id="")
    linked.update(depth=None)
    now = timezone.now()
    batch = []
    for tenant, rid, parent, rel in linked.values_list(
        "tenant", "request_id", "parent_request_id", "relationship"
    ).iterator(chunk_size=2000):
        if rid == parent:
            continue
        batch.append(
            edge(
                tenant=tenant,
                from_request_id=rid,
                to_request_id=parent,
                type=rel or "triggered_by",
                is_tree=True,
                source="event",
                created_at=now,
            )
        )
        if len(batch) >= 2000:
            edge.objects.bulk_create(batch, ignore_conflicts=True)
            batch = []
    edge.objects.bulk_create(batch, ignore_conflicts=True)
    parents = usage.objects.filter(
        tenant=OuterRef("tenant"), request_id=OuterRef("parent_request_id"), depth__isnull=False
    )
    for _level in range(_LEVELS):
        waiting = usage.objects.filter(depth__isnull=True).annotate(
            parent_depth=Subquery(parents.values("depth")[:1]),
            parent_root=Subquery(parents.values("root_request_id")[:1]),
        )
        ready = list(
            waiting.exclude(parent_depth=None).values_list(
                "pk", "parent_depth", "parent_root", "parent_request_id", "root_request_id"
            )[:10_000]
        )
        if not ready:
            break
        for pk, depth, parent_root, parent, root in ready:
            usage.objects.filter(pk=pk).update(
                depth=depth + 1, root_request_id=root or parent_root or parent
            )


class Migration(migrations.Migration):
    dependencies = [
        ("provenance", "0001_relationships"),
        ("usage", "0004_lineage_columns"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
