"""Celery tasks of the reporting app (analytics beat jobs): each calls one service and is safe
to run twice."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import OperationalError

from tokenmgr_project.core.redis import REDIS_ERRORS

logger = logging.getLogger(__name__)

# Transient: a dropped database connection, a deadlock victim, Redis failing over.
TRANSIENT = (OperationalError, *REDIS_ERRORS)


# --- analytics: anomalies ---


# --- analytics: recommendations ---
