"""The Celery app and the one place where every periodic schedule is declared."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery
from celery.worker.consumer import Consumer

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")
logger = logging.getLogger(__name__)


class ResilientConsumer(Consumer):
    """Celery's worker consumer, made to survive a Redis broker dying while the worker holds
    messages (a running acks-late task, or one waiting for its countdown).

    On a lost connection Celery 5.7 first `collect()`s the broken kombu connection, which
    detaches its transport (`transport.client = None`), then `close()`s it. Closing the default
    channel restores the unacknowledged messages, which builds a Redis pool from the detached
    transport: `AttributeError: 'NoneType' object has no attribute 'hostname'`. That is not a
    connection error, so it escapes Celery's `ignore_errors` and ends the worker. Nothing needs
    that close: the socket is gone, and the unacknowledged messages stay in Redis's `unacked`
    hash, from which kombu restores them after the visibility timeout (our tasks are idempotent).
    The rest of the method only acts when worker_cancel_long_running_tasks_on_connection_loss is
    on, which settings.py keeps off.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            logger.warning("broker connection lost (%r); reconnecting without a clean close", exc)


app = Celery("tokenmgr")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _make_broker_folders(sender: Celery, **kwargs: object) -> None:
    """The embedded filesystem broker needs its folders before the first message."""
    options = sender.conf.broker_transport_options or {}
    for name in ("data_folder_in", "processed_folder", "control_folder"):
        if name in options:
            Path(options[name]).mkdir(parents=True, exist_ok=True)


app.conf.beat_schedule = {
    # Every second, but the task itself only flushes when the runtime flush interval has passed
    # or the buffer holds at least buffer_size events, so both stay adjustable without a restart.
    "usage-flush-buffer": {"task": "usage.tasks.usage_flush_buffer", "schedule": 1.0},
    # Hourly is plenty: retention is counted in days and each run deletes in bounded chunks.
    "usage-purge-expired": {"task": "usage.tasks.usage_purge_expired", "schedule": 3600.0},
    # With the ledger's retention: the relationships of purged requests go the same hour.
    "provenance-purge-expired": {
        "task": "provenance.tasks.provenance_purge_expired",
        "schedule": 3600.0,
    },
    # Ingestion asks for alert evaluation within a second; this minute-sweep catches what it
    # cannot see: time passing (burn rate), limit changes made elsewhere, a lost request.
    "budgets-alerts-evaluate-all": {
        "task": "budgets.tasks.budget_alerts_evaluate_all",
        "schedule": 60.0,
    },
    # The shortest delivery retry backoff is 30 s: sweeping every 15 s keeps retries (and
    # deliveries whose after-commit task was lost) at most 15 s late.
    "budgets-alert-deliveries": {
        "task": "budgets.tasks.alert_deliveries_send_due",
        "schedule": 15.0,
    },
    # Two small queries when no period ended; every minute keeps the roll-over announcement near
    # the period boundary (status never waits for it: spend is always read per window).
    "budgets-periods-close": {"task": "budgets.tasks.budget_periods_close", "schedule": 60.0},
    # Checks sweep expired holds as they run; this frees them on budgets nobody is checking, so
    # status pages show no stale "reserved" for longer than about 10 s past a reservation's TTL.
    "budgets-reservations-expire": {"task": "budgets.tasks.reservations_expire", "schedule": 10.0},
    # Seeds, usage and rebuilds keep counters exact, so this is a safety net that logs any drift
    # and corrects it both ways (e.g. usage recorded by a process whose budget rules were up to
    # a second old). Each run sums every active budget's current period in the ledger while
    # holding off ledger writes, so every five minutes, not constantly.
    "budgets-counters-reconcile": {"task": "budgets.tasks.counters_reconcile", "schedule": 300.0},
    # Usage written straight to the database while Redis was unreachable leaves a CounterRebuild
    # row. The process that wrote it, and every process at its next rules reload (1 s), rebuild
    # before their next check; this covers processes with no checks. One indexed EXISTS when
    # there is nothing to do, so every two seconds costs nothing and keeps the window short.
    "budgets-counters-rebuild": {"task": "budgets.tasks.counters_rebuild", "schedule": 2.0},
    # Limit checks already ignore an approved override past its expiry; this only flips its status
    # and drops cached limits, so a minute keeps the admin's queue and history honest cheaply.
    "budgets-expire-overrides": {
        "task": "budgets.tasks.overrides_expire",
        "schedule": 60.0,
    },
    # Hourly buckets close on the hour: every 10 minutes catches a spike within minutes of its
    # hour's end; each run reads only the last hours and days from the rollups.
    "reporting-anomalies-detect": {
        "task": "reporting.tasks.anomalies_detect",
        "schedule": 600.0,
    },
    # Recommendations rest on 30 days of rollups and a day-to-week ledger sample: an hour changes
    # little, and each run (organisation-wide, then the scopes of rows it did not see) reads a
    # bounded window, so hourly keeps ids and "stale" marks fresh at a small cost.
    "reporting-recommendations-refresh": {
        "task": "reporting.tasks.recommendations_refresh",
        "schedule": 3600.0,
    },
}
