"""Reporting models. Live status (SPEC §8): the embedded default's status queue."""

from __future__ import annotations

from django.db import models


class StatusCategory(models.TextChoices):
    ENGINE = "engine"
    TOOL = "tool"
    WORKFLOW = "workflow"
    PROGRESS = "progress"
    ERROR = "error"
    INFO = "info"
    CONVERSATION = "conversation"
    ANALYSIS = "analysis"
    BUDGET = "budget"
    USAGE = "usage"


class QueuedStatus(models.Model):
    """A status message waiting for the broadcaster when there is no Redis (embedded default).

    With Redis the queue is a Redis list; this table lets the Celery worker's messages reach the
    server process, where the embedded broadcaster and the in-process channel layer live.
    """

    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "queued statuses"
        # The broadcaster takes the oldest rows by primary key: no other index is needed.

    def __str__(self) -> str:
        return f"status #{self.pk}"
