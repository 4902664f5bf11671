"""The Celery app and the one place where every periodic schedule is declared."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")

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
    # Counters only drift when a seed races an ingestion or usage went straight to the database
    # while Redis was unreachable. Each run sums every active budget's current period in the
    # ledger, so five minutes bounds that drift without re-reading the ledger constantly.
    "budgets-counters-reconcile": {"task": "budgets.tasks.counters_reconcile", "schedule": 300.0},
    # Limit checks already ignore an approved override past its expiry; this only flips its status
    # and drops cached limits, so a minute keeps the admin's queue and history honest cheaply.
    "budgets-expire-overrides": {
        "task": "budgets.tasks.overrides_expire",
        "schedule": 60.0,
    },
}
