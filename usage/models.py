from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any, ClassVar

from django.conf import settings
from django.db import models
from django.db.models import F, Q

# Columns an attribution filter or group-by may name (GET /usage, /usage/summary, key scopes).
ATTRIBUTION_DIMENSIONS = (
    "team_id",
    "project_id",
    "user_id",
    "feature",
    "agent",
    "workflow_id",
    "conversation_id",
    "task_type",
)


class RelationshipType(models.TextChoices):
    """How a request relates to its parent (`TokenUsage.relationship`); the provenance app
    builds its graph on this vocabulary."""

    TRIGGERED_BY = "triggered_by"
    PART_OF = "part_of"
    DERIVED_FROM = "derived_from"
    RETRY_OF = "retry_of"
    CACHED_FROM = "cached_from"
    FALLBACK_OF = "fallback_of"
    FOLLOW_UP_OF = "follow_up_of"
    TOOL_CALL_OF = "tool_call_of"


class TokenUsage(models.Model):
    """One LLM request's usage: the ledger every budget, report and forecast reads."""

    class Status(models.TextChoices):
        SUCCESS = "success"
        ERROR = "error"

    class PriceSource(models.TextChoices):
        CATALOGUE = "catalogue", "genai-prices catalogue"
        OVERRIDE = "override", "ModelPrice override"
        UNPRICED = "unpriced", "no price known"

    # Whose request_id this is (unique per tenant): "p:<team>/<project>" for a project key,
    # "t:<team>" for a team key, "org" for a global key or staff (core.principal.Principal.tenant).
    tenant = models.CharField(max_length=300, default="org")
    request_id = models.CharField(max_length=128)
    occurred_at = models.DateTimeField()
    received_at = models.DateTimeField()

    provider = models.CharField(max_length=64, blank=True, default="")
    model = models.CharField(max_length=128)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    total_tokens = models.GeneratedField(
        expression=F("input_tokens") + F("output_tokens"),
        output_field=models.BigIntegerField(),
        db_persist=True,
    )

    cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal(0))
    input_cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal(0))
    output_cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal(0))
    currency = models.CharField(max_length=3, default="USD")
    price_source = models.CharField(max_length=16, choices=PriceSource.choices)
    price_ref = models.CharField(max_length=200, blank=True, default="")
    unpriced = models.BooleanField(default=False)
    estimated = models.BooleanField(default=False)

    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    user_id = models.CharField(max_length=128, blank=True, default="")
    feature = models.CharField(max_length=128, blank=True, default="")
    agent = models.CharField(max_length=128, blank=True, default="")
    task_type = models.CharField(max_length=128, blank=True, default="")
    conversation_id = models.CharField(max_length=128, blank=True, default="")
    workflow_id = models.CharField(max_length=128, blank=True, default="")

    status = models.CharField(max_length=8, choices=Status.choices, default=Status.SUCCESS)
    error_type = models.CharField(max_length=128, blank=True, default="")
    latency_ms = models.IntegerField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    reservation_id = models.CharField(max_length=64, blank=True, default="")

    parent_request_id = models.CharField(max_length=128, blank=True, default="")
    root_request_id = models.CharField(max_length=128, blank=True, default="")
    relationship = models.CharField(max_length=32, blank=True, default="")
    intent = models.CharField(max_length=256, blank=True, default="")
    input_hash = models.CharField(max_length=128, blank=True, default="")
    output_hash = models.CharField(max_length=128, blank=True, default="")
    cache_hit = models.BooleanField(null=True, blank=True)
    # Lineage (SPEC §6): 0 for a root; None while the parent has not arrived (out-of-order
    # ingestion), until provenance (ProvenanceLineage.storing) resolves it and root_request_id.
    depth = models.IntegerField(null=True, blank=True, default=0)
    agent_type = models.CharField(max_length=128, blank=True, default="")
    workflow_step = models.CharField(max_length=128, blank=True, default="")
    system_context = models.JSONField(default=dict, blank=True)
    # Only with TOKENMGR_PROVENANCE_STORE_TEXT; otherwise only input_hash / output_hash are kept.
    input_text = models.TextField(blank=True, default="")
    output_text = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            # Idempotency, per tenant; also serves the ledger duplicate check (_ids_in_ledger)
            # and the admin's search by request id. request_id leads: the duplicate check's
            # `request_id = ANY(...)` must be an index condition, and with tenant first the
            # planner (on a young table's statistics) scanned all of a tenant's rows instead.
            models.UniqueConstraint(
                fields=["request_id", "tenant"], name="usage_tenant_request_id_unique"
            ),
            models.CheckConstraint(
                condition=Q(input_tokens__gte=0)
                & Q(output_tokens__gte=0)
                & Q(cache_read_tokens__gte=0)
                & Q(cache_write_tokens__gte=0),
                name="usage_tokens_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(cache_read_tokens__lte=F("input_tokens") - F("cache_write_tokens")),
                name="usage_cache_tokens_within_input",
            ),
            models.CheckConstraint(condition=Q(cost__gte=0), name="usage_cost_non_negative"),
            models.CheckConstraint(
                condition=Q(unpriced=False) | Q(cost=0), name="usage_unpriced_costs_zero"
            ),
        ]
        indexes = [
            # usage_list / usage_summary over a time range with no attribution filter.
            models.Index(fields=["occurred_at", "id"], name="usage_occurred_idx"),
            # usage_list / usage_summary filtered by team (and team-scoped API keys).
            models.Index(fields=["team_id", "occurred_at"], name="usage_team_time_idx"),
            # usage_list / usage_summary filtered by project (and project-scoped API keys).
            models.Index(fields=["project_id", "occurred_at"], name="usage_project_time_idx"),
            # usage_list filtered by user.
            models.Index(fields=["user_id", "occurred_at"], name="usage_user_time_idx"),
            # usage_list filtered by feature.
            models.Index(fields=["feature", "occurred_at"], name="usage_feature_time_idx"),
            # usage_list filtered by agent.
            models.Index(fields=["agent", "occurred_at"], name="usage_agent_time_idx"),
            # usage_list filtered by workflow (workflow usage, provenance analytics).
            models.Index(fields=["workflow_id", "occurred_at"], name="usage_workflow_time_idx"),
            # usage_list filtered by provider and/or model.
            models.Index(fields=["provider", "model", "occurred_at"], name="usage_model_time_idx"),
            # provenance.services.ProvenanceLineage.storing: rows waiting for their parent (depth).
            models.Index(
                fields=["tenant", "parent_request_id"],
                condition=Q(depth__isnull=True),
                name="usage_lineage_pending_idx",
            ),
            # provenance.selectors.duplicate_requests: repeated inputs (same hash) in a range.
            models.Index(
                fields=["input_hash", "occurred_at"],
                condition=~Q(input_hash=""),
                name="usage_input_hash_idx",
            ),
            # provenance.selectors.deep_chains: rows deeper than the limit (few) in a range; for
            # limits from the default (TOKENMGR_PROVENANCE_DEEP_CHAIN, 8) up. Shallower rows, most
            # of a busy ledger, stay out of it.
            models.Index(
                fields=["depth", "occurred_at"], condition=Q(depth__gt=8), name="usage_depth_idx"
            ),
            # health_snapshot: count of unpriced rows without scanning the ledger.
            models.Index(
                fields=["occurred_at"], condition=Q(unpriced=True), name="usage_unpriced_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.provider}/{self.model} {self.total_tokens} tokens"


class DeadLetter(models.Model):
    """Not a table: names the admin page (and its permissions) for the flush's dead letters,
    ledger lines the database refused, parked in Redis (usage.services.usage_dead_letters)."""

    class Meta:
        managed = False
        verbose_name = "dead letter"
        default_permissions = ("view", "change")

    def __str__(self) -> str:
        return "dead letter"


class ApiKey(models.Model):
    """A bearer key: stored as a SHA-256 hash, shown once at creation, scoped."""

    class Scope(models.TextChoices):
        GLOBAL = "global", "Global (admin)"
        TEAM = "team", "One team"
        PROJECT = "project", "One project"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    scope = models.CharField(max_length=8, choices=Scope.choices)
    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        constraints = [
            models.UniqueConstraint(fields=["key_hash"], name="apikey_hash_unique"),
            models.CheckConstraint(
                condition=~Q(scope="team") | ~Q(team_id=""), name="apikey_team_scope_has_team"
            ),
            models.CheckConstraint(
                condition=~Q(scope="project") | ~Q(project_id=""),
                name="apikey_project_scope_has_project",
            ),
            models.CheckConstraint(
                condition=~Q(scope="global") | (Q(team_id="") & Q(project_id="")),
                name="apikey_global_scope_unbound",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…, {self.scope_label})"

    @property
    def scope_label(self) -> str:
        if self.scope == self.Scope.PROJECT:
            return f"project {self.project_id}"
        if self.scope == self.Scope.TEAM:
            return f"team {self.team_id}"
        return "global"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @staticmethod
    def hash_key(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()


class ModelPrice(models.Model):
    """An admin-edited price that wins over the catalogue from `effective_from` on.

    Prices are USD (the catalogue's currency) per million tokens. A cache price left empty bills
    those tokens at the input price.
    """

    provider = models.CharField(
        max_length=64, blank=True, default="", help_text="Empty: any provider."
    )
    model = models.CharField(max_length=128)
    input_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    output_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    cache_read_per_mtok = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    cache_write_per_mtok = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    effective_from = models.DateTimeField()
    note = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "model", "effective_from"], name="modelprice_one_per_start"
            ),
            models.CheckConstraint(
                condition=Q(input_per_mtok__gte=0)
                & Q(output_per_mtok__gte=0)
                & (Q(cache_read_per_mtok__isnull=True) | Q(cache_read_per_mtok__gte=0))
                & (Q(cache_write_per_mtok__isnull=True) | Q(cache_write_per_mtok__gte=0)),
                name="modelprice_non_negative",
            ),
        ]
        indexes = [
            # pricing.price_table: all overrides are loaded at once; this serves the admin list.
            models.Index(fields=["model", "provider"], name="modelprice_model_idx"),
        ]

    def __str__(self) -> str:
        who = f"{self.provider}/{self.model}" if self.provider else self.model
        prices = f"{self.input_per_mtok.normalize():f}/{self.output_per_mtok.normalize():f}"
        return f"{who} from {self.effective_from:%Y-%m-%d}: {prices}"


def default_alert_channels() -> list[str]:
    """Where alerts go when nobody chose: the live status feed (as without a settings row)."""
    return ["status"]


class ManagerConfig(models.Model):
    """Run-time settings (one row). An empty field means "use the environment default"."""

    buffer_size = models.PositiveIntegerField(null=True, blank=True)
    flush_interval = models.FloatField(null=True, blank=True)
    retention_days = models.PositiveIntegerField(null=True, blank=True)
    alert_channels = models.JSONField(default=default_alert_channels, blank=True)
    optimization_enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "manager settings"
        verbose_name_plural = "manager settings"
        constraints = [
            models.CheckConstraint(condition=Q(pk=1), name="managerconfig_singleton"),
            models.CheckConstraint(
                condition=Q(buffer_size__isnull=True) | Q(buffer_size__gte=1),
                name="managerconfig_buffer_size_positive",
            ),
            models.CheckConstraint(
                condition=Q(flush_interval__isnull=True) | Q(flush_interval__gte=0.5),
                name="managerconfig_flush_interval_min",
            ),
        ]

    def __str__(self) -> str:
        return "manager settings"


# --- rollups (usage.rollups): the ledger pre-aggregated per UTC hour ------------------------------


class RollupMeasures(models.Model):
    """What one hour of one group of ledger rows adds up to. Kept by database triggers on the
    ledger (migration 0005), in the same statement as the rows, so a rollup never disagrees
    with the ledger; retention deletes raw rows and leaves these. Money is integer units of
    1e-10 USD (the ledger's scale): exact sums on PostgreSQL and SQLite alike."""

    bucket = models.DateTimeField(help_text="Start of the UTC hour.")
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    cost_units = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    error_cost_units = models.BigIntegerField(default=0)
    unpriced_requests = models.BigIntegerField(default=0)
    unpriced_tokens = models.BigIntegerField(default=0)
    estimated_requests = models.BigIntegerField(default=0)
    estimated_cost_units = models.BigIntegerField(default=0)
    cache_hits = models.BigIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)
    latency_count = models.BigIntegerField(default=0)
    # Successful requests with a short output (usage.rollups.SHORT_OUTPUT_TOKENS): the traffic
    # a cheaper model could serve (the optimization report).
    short_requests = models.BigIntegerField(default=0)
    short_input_tokens = models.BigIntegerField(default=0)
    short_output_tokens = models.BigIntegerField(default=0)
    short_cost_units = models.BigIntegerField(default=0)

    objects: ClassVar[models.Manager[Any]]  # both tables' default manager, for the type checker

    class Meta:
        abstract = True


class UsageRollup(RollupMeasures):
    """Per hour and combination of every rollup dimension (usage.rollups.FINE_DIMENSIONS)."""

    team_id = models.CharField(max_length=128, default="")
    project_id = models.CharField(max_length=128, default="")
    user_id = models.CharField(max_length=128, default="")
    feature = models.CharField(max_length=128, default="")
    agent = models.CharField(max_length=128, default="")
    task_type = models.CharField(max_length=128, default="")
    provider = models.CharField(max_length=64, default="")
    model = models.CharField(max_length=128)

    class Meta:
        constraints = [
            # The triggers' ON CONFLICT target: one row per hour and group.
            models.UniqueConstraint(
                fields=[
                    "bucket",
                    "team_id",
                    "project_id",
                    "user_id",
                    "feature",
                    "agent",
                    "task_type",
                    "provider",
                    "model",
                ],
                name="usage_rollup_group_unique",
            ),
        ]
        indexes = [
            # rollups.aggregate for a team- or project-scoped principal over a range.
            models.Index(fields=["team_id", "project_id", "bucket"], name="usage_rollup_scope_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H:00} {self.model}: {self.requests} requests"


class ModelGroupRollup(RollupMeasures):
    """Both team/project/provider/model rollups' group (usage.rollups.COARSE_DIMENSIONS)."""

    team_id = models.CharField(max_length=128, default="")
    project_id = models.CharField(max_length=128, default="")
    provider = models.CharField(max_length=64, default="")
    model = models.CharField(max_length=128)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H:00} {self.model}: {self.requests} requests"


class ModelRollup(ModelGroupRollup):
    """The same per hour, team, project, provider and model only: the small table that reports
    by those dimensions (the common ones) read."""

    class Meta:
        constraints = [
            # The triggers' ON CONFLICT target; bucket first also serves every range scan.
            models.UniqueConstraint(
                fields=["bucket", "team_id", "project_id", "provider", "model"],
                name="usage_model_rollup_group_unique",
            ),
        ]


class ModelDayRollup(ModelGroupRollup):
    """`ModelRollup` per UTC day (`bucket` is its midnight): reports over weeks of days or
    months in UTC, totals over long ranges and budget windows read ~24 times fewer rows."""

    class Meta:
        constraints = [
            # The triggers' ON CONFLICT target; bucket first also serves every range scan.
            models.UniqueConstraint(
                fields=["bucket", "team_id", "project_id", "provider", "model"],
                name="usage_model_day_rollup_unique",
            ),
        ]


class LedgerPurge(models.Model):
    """One retention run that deleted raw usage: before `cutoff` only rollups answer."""

    cutoff = models.DateTimeField()
    deleted = models.BigIntegerField()
    purged_at = models.DateTimeField()

    class Meta:
        indexes = [
            # rollups.purged_before: the latest cutoff.
            models.Index(fields=["-cutoff"], name="usage_ledgerpurge_cutoff_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.deleted} rows before {self.cutoff:%Y-%m-%d %H:%M}"


# --- repricing (usage.services.usage_reprice): the audit of rewritten costs ---------------------


class Repricing(models.Model):
    """One applied re-pricing of past usage: who rewrote the costs of which ledger rows with the
    prices in effect when they occurred, and the totals before and after. Money is USD at the
    ledger's scale; `per_model` is the table of differences per provider and model as the API
    answers it (usage.actions.reprice_out: amounts as text)."""

    actor = models.CharField(max_length=200, help_text='"staff user #3", "api key #5", "cli".')
    applied_at = models.DateTimeField()
    since = models.DateTimeField()
    until = models.DateTimeField()
    provider = models.CharField(
        max_length=64, blank=True, default="", help_text="Empty: every provider."
    )
    model = models.CharField(
        max_length=128, blank=True, default="", help_text="Empty: every model."
    )
    rows_seen = models.BigIntegerField()
    rows_changed = models.BigIntegerField()
    cost_before = models.DecimalField(max_digits=28, decimal_places=10)
    cost_after = models.DecimalField(max_digits=28, decimal_places=10)
    per_model = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-applied_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(since__lt=F("until")), name="repricing_range_ordered"
            ),
            models.CheckConstraint(
                condition=Q(rows_changed__gte=0) & Q(rows_changed__lte=F("rows_seen")),
                name="repricing_rows_changed_within_seen",
            ),
            models.CheckConstraint(
                condition=Q(cost_before__gte=0) & Q(cost_after__gte=0),
                name="repricing_costs_non_negative",
            ),
        ]
        indexes = [
            # The admin's list of repricings (usage.admin.repricing), newest first.
            models.Index(fields=["-applied_at", "-id"], name="usage_repricing_applied_idx"),
        ]

    def __str__(self) -> str:
        return f"repricing #{self.pk}: {self.since:%Y-%m-%d %H:%M} to {self.until:%Y-%m-%d %H:%M}"

    @property
    def difference(self) -> Decimal:
        return self.cost_after - self.cost_before
