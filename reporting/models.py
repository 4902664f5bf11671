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


# --- analytics (issue 13) ------------------------------------------------------------------------


class Anomaly(models.Model):
    """An hour or day whose cost or tokens for one series (a team, a model, …) lay outside that
    series' expected range (reporting.anomalies). Stored by the detection beat job, alerted once
    (alerted_at), resolved when the series is back in range."""

    class Granularity(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    class Metric(models.TextChoices):
        COST = "cost"
        TOKENS = "tokens"

    class Status(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    dimension = models.CharField(max_length=32)
    series = models.CharField(max_length=128, help_text="The dimension's value.")
    granularity = models.CharField(max_length=8, choices=Granularity.choices)
    metric = models.CharField(max_length=8, choices=Metric.choices)
    bucket = models.DateTimeField(help_text="Start of the anomalous hour or UTC day.")
    # Cost in integer units of 1e-10 USD (as the rollups), tokens as tokens.
    value = models.BigIntegerField()
    expected = models.BigIntegerField()
    lower = models.BigIntegerField()
    upper = models.BigIntegerField()
    score = models.DecimalField(max_digits=12, decimal_places=2)
    direction = models.CharField(max_length=8, default="up")  # up | down
    drivers = models.JSONField(default=list, blank=True)
    # Who may see it: a team or project series carries its scope; others are organisation-wide.
    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN)
    detected_at = models.DateTimeField(auto_now_add=True)
    alerted_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-bucket", "dimension", "series"]
        verbose_name_plural = "anomalies"
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "dimension",
                    "series",
                    "team_id",
                    "project_id",
                    "granularity",
                    "metric",
                    "bucket",
                ],
                name="anomaly_once",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "dimension", "series"], name="anomaly_open_idx"),
        ]

    def __str__(self) -> str:
        series = self.series if len(self.series) <= 40 else self.series[:39] + "…"
        return f"{self.dimension}={series} {self.metric} {self.bucket:%Y-%m-%d %H:%M}"


class Recommendation(models.Model):
    """A savings recommendation seen by the recommendations job or endpoint, keyed by what it is
    about (kind, target, scope), and what a person decided about it. An accepted one is
    tracked: its waste per day before acceptance (baseline) against since."""

    class Status(models.TextChoices):
        OPEN = "open"
        DISMISSED = "dismissed"
        ACCEPTED = "accepted"

    key = models.CharField(max_length=400, unique=True)
    kind = models.CharField(max_length=32)
    dimension = models.CharField(max_length=32)
    target = models.CharField(max_length=300)
    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    monthly_savings = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    confidence = models.CharField(max_length=8, default="medium")  # high | medium | low
    action = models.CharField(max_length=500, blank=True, default="")
    evidence = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(auto_now=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.CharField(max_length=200, blank=True, default="")
    note = models.CharField(max_length=500, blank=True, default="")
    # At acceptance: the waste per day the recommendation would remove, in 1e-10 USD units, and
    # the window it was measured over.
    baseline_daily_units = models.BigIntegerField(null=True, blank=True)
    baseline_days = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-monthly_savings", "key"]
        indexes = [models.Index(fields=["status", "kind"], name="recommendation_status_idx")]

    def __str__(self) -> str:
        target = self.target if len(self.target) <= 60 else self.target[:59] + "…"
        return f"{self.kind}: {target}"


class BillImport(models.Model):
    """One provider bill (usage/cost export) compared with the ledger (reporting.reconcile)."""

    provider = models.CharField(max_length=32)
    source_format = models.CharField(max_length=32, help_text="Which export layout was read.")
    filename = models.CharField(max_length=255, blank=True, default="")
    sha256 = models.CharField(max_length=64)
    currency = models.CharField(max_length=3, default="USD")
    first_day = models.DateField()
    last_day = models.DateField()
    rows = models.IntegerField()
    billed = models.DecimalField(max_digits=24, decimal_places=10)
    ledger = models.DecimalField(max_digits=24, decimal_places=10)
    tolerance_pct = models.DecimalField(max_digits=6, decimal_places=3)
    flagged_days = models.IntegerField(default=0)
    by_project = models.BooleanField(default=False)
    imported_by = models.CharField(max_length=200, blank=True, default="")
    imported_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-imported_at"]

    def __str__(self) -> str:
        return f"{self.provider} bill {self.first_day}..{self.last_day}"


class BillLine(models.Model):
    """One day x model (x project) of an imported bill against the ledger."""

    class Status(models.TextChoices):
        MATCHED = "matched"
        OVER = "over", "ledger over bill"
        UNDER = "under", "ledger under bill"
        MISSING_IN_LEDGER = "missing_in_ledger", "not in the ledger"
        MISSING_IN_BILL = "missing_in_bill", "not on the bill"

    bill = models.ForeignKey(BillImport, on_delete=models.CASCADE, related_name="lines")
    day = models.DateField()
    model = models.CharField(max_length=128)
    project_id = models.CharField(max_length=128, blank=True, default="")
    billed = models.DecimalField(max_digits=24, decimal_places=10)
    ledger = models.DecimalField(max_digits=24, decimal_places=10)
    difference = models.DecimalField(max_digits=24, decimal_places=10)  # ledger - billed
    difference_pct = models.DecimalField(max_digits=12, decimal_places=3, null=True, blank=True)
    billed_tokens = models.BigIntegerField(null=True, blank=True)
    ledger_tokens = models.BigIntegerField(default=0)
    status = models.CharField(max_length=20, choices=Status.choices)
    flagged = models.BooleanField(default=False)

    class Meta:
        ordering = ["bill", "-flagged", "day", "model"]
        constraints = [
            models.UniqueConstraint(
                fields=["bill", "day", "model", "project_id"], name="billline_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.model}: {self.status}"
