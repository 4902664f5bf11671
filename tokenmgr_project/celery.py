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
}
