"""Provenance vocabulary. Usage rows carry their provenance fields (usage.TokenUsage); the
relationship graph and lineage models are added by the provenance capability (SPEC §6)."""

from django.db import models


class RelationshipType(models.TextChoices):
    TRIGGERED_BY = "triggered_by"
    PART_OF = "part_of"
    DERIVED_FROM = "derived_from"
    RETRY_OF = "retry_of"
    CACHED_FROM = "cached_from"
    FOLLOW_UP_OF = "follow_up_of"
    TOOL_CALL_OF = "tool_call_of"
