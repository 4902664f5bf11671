"""Provenance. Usage rows carry their provenance fields and the relationship vocabulary
(usage.models.TokenUsage, RelationshipType); the relationship graph and lineage models are
added by the provenance capability (SPEC §6)."""

from usage.models import RelationshipType

__all__ = ["RelationshipType"]
