"""Provenance (SPEC §6): the typed relationship graph between requests, and refused cycles.

Nodes are ledger rows (usage.models.TokenUsage), named by (tenant, request_id). The tree a
lineage walks is the `is_tree` edges: each request's link to the parent its usage event named.
Other relationships (retries, cache sources, fallbacks, …) are edges too, and no edge may close
a cycle. An edge may name a request that has not arrived yet: out-of-order ingestion is normal.
"""

from __future__ import annotations

from django.db import models
from django.db.models import F, Q

from usage.models import RelationshipType

__all__ = ["CycleAttempt", "ProvenanceRelationship", "RelationshipType"]


class ProvenanceRelationship(models.Model):
    """`from_request_id` <type> `to_request_id`: the retry is `retry_of` the original."""

    class Source(models.TextChoices):
        EVENT = "event", "usage event"
        API = "api", "relationships API"

    tenant = models.CharField(max_length=300)
    from_request_id = models.CharField(max_length=128)
    to_request_id = models.CharField(max_length=128)
    type = models.CharField(max_length=32, choices=RelationshipType.choices)
    is_tree = models.BooleanField(default=False)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.API)
    created_at = models.DateTimeField()
    created_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        verbose_name = "relationship"
        constraints = [
            # Also serves the ancestors walk (lineage up: from -> to).
            models.UniqueConstraint(
                fields=["tenant", "from_request_id", "to_request_id", "type"],
                name="provenance_edge_unique",
            ),
            models.UniqueConstraint(
                fields=["tenant", "from_request_id"],
                condition=Q(is_tree=True),
                name="provenance_one_tree_parent",
            ),
            models.CheckConstraint(
                condition=~Q(from_request_id=F("to_request_id")), name="provenance_edge_not_self"
            ),
            models.CheckConstraint(
                condition=Q(type__in=RelationshipType.values), name="provenance_edge_type_known"
            ),
        ]
        indexes = [
            # lineage (descendants walk: to -> from), fan-out outliers, edges into a request.
            models.Index(fields=["tenant", "to_request_id"], name="provenance_edge_to_idx"),
            # selectors.retry_storms: retries grouped by the operation they retry.
            models.Index(
                fields=["to_request_id", "tenant"],
                condition=Q(type=RelationshipType.RETRY_OF),
                name="provenance_retry_idx",
            ),
            # services.provenance_purge_expired: edges past retention, oldest first.
            models.Index(fields=["created_at"], name="provenance_edge_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.from_request_id} {self.type} {self.to_request_id}"


class CycleAttempt(models.Model):
    """A relationship refused because it would have closed a cycle (pattern analysis reports
    these): `path` is the cycle it would have made, from_request_id first and last."""

    tenant = models.CharField(max_length=300)
    from_request_id = models.CharField(max_length=128)
    to_request_id = models.CharField(max_length=128)
    type = models.CharField(max_length=32, choices=RelationshipType.choices)
    path = models.JSONField(default=list)
    source = models.CharField(
        max_length=8,
        choices=ProvenanceRelationship.Source.choices,
        default=ProvenanceRelationship.Source.API,
    )
    attempted_at = models.DateTimeField()
    attempted_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        verbose_name = "refused cycle"
        indexes = [
            # selectors.cycle_attempts: the attempts in a time range.
            models.Index(fields=["attempted_at"], name="provenance_cycle_time_idx"),
        ]

    def __str__(self) -> str:
        return " → ".join(self.path) or f"{self.from_request_id} → {self.to_request_id}"
