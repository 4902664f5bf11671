"""Budgets, their periods and alerts, reservations, overrides and agent profiles (SPEC §5)."""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import F, Q

# The ledger's earliest accepted occurred_at: the start of every lifetime budget's window.
LIFETIME_START = datetime(2015, 1, 1, tzinfo=UTC)
LIFETIME_END = datetime(9999, 1, 1, tzinfo=UTC)
DEFAULT_THRESHOLDS = (Decimal(50), Decimal(80), Decimal(90))


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        """Names the period in Redis counter keys."""
        return str(int(self.start.timestamp()))


class Budget(models.Model):
    """A spending limit on one attribution scope over calendar-aligned periods.

    `scope`/`scope_id` say whose usage counts (scope_id is empty for global). `team_id` and
    `project_id` narrow it further: a budget made with a team key only counts usage inside that
    team, e.g. a user's spend within team "search".
    """

    class Scope(models.TextChoices):
        GLOBAL = "global"
        TEAM = "team"
        PROJECT = "project"
        USER = "user"
        AGENT = "agent"
        FEATURE = "feature"

    class Period(models.TextChoices):
        DAILY = "daily"
        WEEKLY = "weekly"
        MONTHLY = "monthly"
        YEARLY = "yearly"
        LIFETIME = "lifetime"

    class Enforcement(models.TextChoices):
        HARD = "hard", "hard (deny)"
        SOFT = "soft", "soft (allow and alert)"

    name = models.CharField(max_length=200)
    scope = models.CharField(max_length=16, choices=Scope.choices)
    scope_id = models.CharField(max_length=128, blank=True, default="")
    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    period = models.CharField(max_length=16, choices=Period.choices, default=Period.MONTHLY)
    timezone = models.CharField(max_length=64, default="UTC")
    cost_limit = models.DecimalField(
        max_digits=20, decimal_places=6, null=True, blank=True, help_text="USD per period."
    )
    token_limit = models.BigIntegerField(null=True, blank=True, help_text="Tokens per period.")
    enforcement = models.CharField(
        max_length=8, choices=Enforcement.choices, default=Enforcement.HARD
    )
    is_active = models.BooleanField(default=True)
    created_by_key = models.ForeignKey(
        "usage.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(cost_limit__isnull=False) | Q(token_limit__isnull=False),
                name="budget_has_a_limit",
            ),
            models.CheckConstraint(
                condition=Q(cost_limit__isnull=True) | Q(cost_limit__gt=0),
                name="budget_cost_limit_positive",
            ),
            models.CheckConstraint(
                condition=Q(token_limit__isnull=True) | Q(token_limit__gt=0),
                name="budget_token_limit_positive",
            ),
            models.CheckConstraint(
                condition=Q(scope__in=["global", "team", "project", "user", "agent", "feature"]),
                name="budget_scope_known",
            ),
            models.CheckConstraint(
                condition=Q(period__in=["daily", "weekly", "monthly", "yearly", "lifetime"]),
                name="budget_period_known",
            ),
            models.CheckConstraint(
                condition=Q(enforcement__in=["hard", "soft"]), name="budget_enforcement_known"
            ),
            models.CheckConstraint(
                condition=(Q(scope="global") & Q(scope_id=""))
                | (~Q(scope="global") & ~Q(scope_id="")),
                name="budget_scope_id_iff_not_global",
            ),
            models.CheckConstraint(
                condition=~Q(scope="team") | Q(team_id=F("scope_id")),
                name="budget_team_scope_is_its_team",
            ),
            models.CheckConstraint(
                condition=~Q(scope="project") | Q(project_id=F("scope_id")),
                name="budget_project_scope_is_its_project",
            ),
            models.UniqueConstraint(
                fields=["scope", "scope_id", "team_id", "project_id", "period"],
                condition=Q(is_active=True),
                name="budget_one_active_per_scope_period",
            ),
        ]
        indexes = [
            # budgets.selectors.budgets_for_principal: a scoped key's budgets.
            models.Index(fields=["team_id", "project_id"], name="budget_owner_idx"),
        ]

    def __str__(self) -> str:
        who = self.scope if self.scope == self.Scope.GLOBAL else f"{self.scope} {self.scope_id}"
        return f"{self.name} ({who}, {self.period})"

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def window_at(self, at: datetime) -> Window:
        """The calendar period containing `at`, aligned in the budget's time zone."""
        return period_window(self.period, self.tz, at)

    def filters(self) -> dict[str, str]:
        """Attribution values an event must carry to count against this budget."""
        wanted = {}
        if self.team_id:
            wanted["team_id"] = self.team_id
        if self.project_id:
            wanted["project_id"] = self.project_id
        column = SCOPE_COLUMNS.get(self.scope)
        if column:
            wanted[column] = self.scope_id
        return wanted


# Which usage column each scope's scope_id is matched against.
SCOPE_COLUMNS = {
    "team": "team_id",
    "project": "project_id",
    "user": "user_id",
    "agent": "agent",
    "feature": "feature",
}


# The last window computed per (period, time zone): every check needs one per applicable budget,
# and nearly all fall into the window of the check before.
_last_windows: dict[tuple[str, zoneinfo.ZoneInfo], Window] = {}


def period_window(period: str, tz: zoneinfo.ZoneInfo, at: datetime) -> Window:
    if period == Budget.Period.LIFETIME:
        return Window(LIFETIME_START, LIFETIME_END)
    last = _last_windows.get((period, tz))
    if last is not None and last.start <= at < last.end:
        return last
    window = _calendar_window(period, tz, at)
    _last_windows[(period, tz)] = window
    return window


def _calendar_window(period: str, tz: zoneinfo.ZoneInfo, at: datetime) -> Window:
    local = at.astimezone(tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == Budget.Period.DAILY:
        start, end = day, day + timedelta(days=1)
    elif period == Budget.Period.WEEKLY:  # ISO weeks: Monday 00:00
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == Budget.Period.MONTHLY:
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    elif period == Budget.Period.YEARLY:
        start = day.replace(month=1, day=1)
        end = start.replace(year=start.year + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Local midnights become aware instants; across a DST change the period is 23 or 25 hours.
    return Window(start.replace(tzinfo=tz).astimezone(UTC), end.replace(tzinfo=tz).astimezone(UTC))


class BudgetThreshold(models.Model):
    """An alert threshold, percent of the effective limit (each fires once per period)."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="thresholds")
    percent = models.DecimalField(max_digits=5, decimal_places=2)

    class Meta:
        ordering = ["budget", "percent"]
        constraints = [
            models.CheckConstraint(
                condition=Q(percent__gt=0) & Q(percent__lte=100), name="threshold_in_0_100"
            ),
            models.UniqueConstraint(fields=["budget", "percent"], name="threshold_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.percent.normalize():f} %"


class BudgetPeriod(models.Model):
    """A closed period's totals, archived by the period job (budgets.tasks)."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="periods")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    cost_spent = models.DecimalField(max_digits=24, decimal_places=10, default=Decimal(0))
    tokens_spent = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0)
    cost_limit = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    token_limit = models.BigIntegerField(null=True, blank=True)
    closed_at = models.DateTimeField()

    class Meta:
        ordering = ["budget", "-period_start"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "period_start"], name="period_once"),
            models.CheckConstraint(
                condition=Q(period_end__gt=F("period_start")), name="period_end_after_start"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.budget} {self.period_start:%Y-%m-%d}: {self.cost_spent} USD"


class Reservation(models.Model):
    """A hold of a request's worst-case cost against every applicable budget (database mode;
    with Redis, holds live in Redis)."""

    class Status(models.TextChoices):
        OPEN = "open"
        SETTLED = "settled"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    reservation_id = models.CharField(max_length=64)
    cost = models.DecimalField(max_digits=20, decimal_places=10)
    tokens = models.BigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    expires_at = models.DateTimeField()
    team_id = models.CharField(max_length=128, blank=True, default="")
    project_id = models.CharField(max_length=128, blank=True, default="")
    settled_request_id = models.CharField(max_length=128, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    budgets = models.ManyToManyField(Budget, related_name="reservations", blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["reservation_id"], name="reservation_id_unique"),
            models.CheckConstraint(
                condition=Q(cost__gte=0) & Q(tokens__gte=0), name="reservation_non_negative"
            ),
        ]
        indexes = [
            # budgets.counters (database mode): open holds, and the expiry sweep.
            models.Index(
                fields=["expires_at"], condition=Q(status="open"), name="reservation_open_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reservation_id} ({self.status})"


class BudgetOverride(models.Model):
    """A request to raise a budget's limit, decided by someone holding the approve permission."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EXPIRED = "expired"

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="overrides")
    extra_cost = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    extra_tokens = models.BigIntegerField(null=True, blank=True)
    unlimited = models.BooleanField(default=False, help_text="No limit until it expires.")
    reason = models.TextField()
    expires_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    requested_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_key = models.ForeignKey(
        "usage.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField(auto_now_add=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-requested_at"]
        permissions = [("approve_budgetoverride", "Can approve or reject budget overrides")]
        constraints = [
            models.CheckConstraint(
                condition=Q(unlimited=True) | Q(extra_cost__gt=0) | Q(extra_tokens__gt=0),
                name="override_raises_something",
            ),
            models.CheckConstraint(
                condition=(Q(extra_cost__isnull=True) | Q(extra_cost__gt=0))
                & (Q(extra_tokens__isnull=True) | Q(extra_tokens__gt=0)),
                name="override_amounts_positive",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "approved", "rejected", "expired"]),
                name="override_status_known",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["approved", "rejected"], decided_at__isnull=False)
                | (~Q(status__in=["approved", "rejected"]) & Q(decided_at__isnull=True))
                | Q(status="expired"),
                name="override_decision_has_time",
            ),
            models.CheckConstraint(
                condition=Q(decided_by__isnull=True)
                | Q(requested_by_user__isnull=True)
                | ~Q(decided_by=F("requested_by_user")),
                name="override_not_decided_by_requester",
            ),
        ]
        indexes = [
            # budgets.counters effective limits and the expiry job: approved, still running.
            models.Index(
                fields=["budget", "expires_at"],
                condition=Q(status="approved"),
                name="override_active_idx",
            ),
            # The admin's pending queue.
            models.Index(
                fields=["requested_at"], condition=Q(status="pending"), name="override_pending_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"override #{self.pk} on {self.budget.name} ({self.status})"

    @property
    def amount_label(self) -> str:
        if self.unlimited:
            return f"unlimited until {self.expires_at:%Y-%m-%d %H:%M} UTC"
        parts = []
        if self.extra_cost:
            parts.append(f"+{self.extra_cost.normalize():f} USD")
        if self.extra_tokens:
            parts.append(f"+{self.extra_tokens:,} tokens")
        return ", ".join(parts)


class BudgetAlert(models.Model):
    """One alert event. The unique constraint makes each fire at most once per budget and period."""

    class Kind(models.TextChoices):
        THRESHOLD = "threshold"
        EXHAUSTED = "exhausted"
        RESOLVED = "resolved"
        BURN_RATE = "burn_rate", "burn rate"
        ROLLOVER = "rollover", "roll-over"

    class Metric(models.TextChoices):
        COST = "cost"
        TOKENS = "tokens"

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateTimeField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    metric = models.CharField(max_length=8, choices=Metric.choices)
    # Percent for threshold/resolved alerts, 100 for exhausted, 0 for the others.
    threshold = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal(0))
    spent = models.DecimalField(max_digits=24, decimal_places=10)
    limit = models.DecimalField(max_digits=24, decimal_places=10, null=True, blank=True)
    percent = models.DecimalField(max_digits=9, decimal_places=2, null=True, blank=True)
    message = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "period_start", "kind", "metric", "threshold"],
                name="alert_once_per_period",
            ),
            models.CheckConstraint(
                condition=Q(threshold__gte=0) & Q(threshold__lte=100), name="alert_threshold_range"
            ),
        ]

    def __str__(self) -> str:
        return self.message


class AlertChannel(models.Model):
    """Where alerts go: the live status feed (target: conversation id), an email address, or a
    webhook URL (signed with `secret`)."""

    class Kind(models.TextChoices):
        STATUS = "status", "live status feed"
        EMAIL = "email"
        WEBHOOK = "webhook"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    target = models.CharField(max_length=500)
    secret = models.CharField(max_length=200, blank=True, default="")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind", "target"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "target"], name="alertchannel_unique"),
            models.CheckConstraint(
                condition=~Q(kind="webhook") | ~Q(secret=""), name="alertchannel_webhook_signed"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}: {self.target}"


class AlertDelivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    # A budget alert, or (alert empty) another app's notice (budgets.deliveries.Notice as JSON:
    # an anomaly from reporting), sent through the same channels with the same retries.
    alert = models.ForeignKey(
        BudgetAlert, on_delete=models.CASCADE, related_name="deliveries", null=True, blank=True
    )
    notice = models.JSONField(null=True, blank=True)
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel"], name="delivery_once"),
            models.CheckConstraint(
                condition=Q(alert__isnull=False) | Q(notice__isnull=False),
                name="delivery_has_subject",
            ),
        ]
        indexes = [
            # budgets.tasks retry sweep: deliveries still to attempt.
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="delivery_pending_idx",
            ),
        ]

    def __str__(self) -> str:
        subject = self.alert_id if self.alert_id else (self.notice or {}).get("kind", "notice")
        return f"{subject} → {self.channel} ({self.status})"


class AgentProfile(models.Model):
    """Per-run token limits for one agent (SPEC §5, agent token guard)."""

    name = models.CharField(max_length=128)
    model = models.CharField(max_length=128)
    token_budget = models.PositiveIntegerField(help_text="Tokens one run may use.")
    warning_threshold = models.PositiveIntegerField(
        null=True, blank=True, help_text="Warn above this many tokens (default 80 % of budget)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["name"], name="agentprofile_name_unique"),
            models.CheckConstraint(condition=Q(token_budget__gt=0), name="agent_budget_positive"),
            models.CheckConstraint(
                condition=Q(warning_threshold__isnull=True)
                | (Q(warning_threshold__gt=0) & Q(warning_threshold__lte=F("token_budget"))),
                name="agent_warning_within_budget",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.model}, {self.token_budget:,} tokens/run)"


class CounterRebuild(models.Model):
    """Usage went straight to the database while Redis is configured (Redis was unreachable), so
    these budget counters in Redis may lack it. Written in the same transaction as that usage;
    whoever next relies on the counters with Redis back rebuilds them from the ledger and deletes
    the rows (budgets.services.counters_rebuild)."""

    created_at = models.DateTimeField(auto_now_add=True)
    # [[budget id, an occurred_at (ISO) inside the counter's window], …]: one per counter.
    counters = models.JSONField(default=list)

    def __str__(self) -> str:
        return f"rebuild {len(self.counters)} counter(s) after {self.created_at:%Y-%m-%d %H:%M:%S}"
