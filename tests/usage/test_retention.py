from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import Persona, event, settle
from usage import services
from usage.models import TokenUsage
from usage.tasks import usage_purge_expired

pytestmark = pytest.mark.django_db


def _ledger(platform: Persona) -> None:
    now = timezone.now()
    batch = [
        event("ancient", occurred_at=(now - timedelta(days=500)).isoformat()),
        event("recent", occurred_at=(now - timedelta(days=10)).isoformat()),
    ]
    platform.client.post("/api/v1/usage/batch", {"events": batch}, format="json")
    settle()


def test_the_purge_job_deletes_usage_older_than_the_retention(platform: Persona) -> None:
    _ledger(platform)
    services.manager_config_update(retention_days=400)
    assert usage_purge_expired.apply().get() == 1
    assert list(TokenUsage.objects.values_list("request_id", flat=True)) == ["recent"]


def test_retention_zero_keeps_everything(platform: Persona) -> None:
    _ledger(platform)
    services.manager_config_update(retention_days=0)
    assert usage_purge_expired.apply().get() == 0
    assert TokenUsage.objects.count() == 2
