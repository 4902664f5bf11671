from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import Persona, event, rows
from usage.models import ApiKey, ModelPrice, TokenUsage

pytestmark = pytest.mark.django_db


def test_the_usage_list_searches_by_request_id_without_counting_the_table(
    admin: Persona, platform: Persona
) -> None:
    platform.client.post(
        "/api/v1/usage/batch", {"events": [event(f"adm-{i}") for i in range(30)]}, format="json"
    )
    rows()
    with CaptureQueriesContext(connection) as queries:
        response = admin.client.get("/admin/usage/tokenusage/?q=adm-7")
    assert response.status_code == 200
    assert "adm-7" in response.content.decode()
    assert "adm-17" not in response.content.decode()
    counts = [
        q["sql"] for q in queries if "COUNT(" in q["sql"].upper() and "usage_tokenusage" in q["sql"]
    ]
    assert counts
    assert all("LIMIT" in sql.upper() for sql in counts)


def test_usage_is_read_only_in_the_admin(admin: Persona, platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("ro"), format="json")
    rows()
    pk = TokenUsage.objects.get(request_id="ro").pk
    assert admin.client.get("/admin/usage/tokenusage/add/").status_code == 403
    assert (
        admin.client.post(f"/admin/usage/tokenusage/{pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert TokenUsage.objects.filter(pk=pk).exists()


def test_creating_a_key_in_the_admin_shows_it_once_and_stores_only_its_hash(admin: Persona) -> None:
    form = {"name": "ci bot", "scope": "project", "team_id": "search", "project_id": "ranker"}
    response = admin.client.post("/admin/usage/apikey/add/", form, follow=True)
    raw = re.search(r"id='new-api-key'>(tm_[^<]+)<", response.content.decode()).group(1)
    key = ApiKey.objects.get(name="ci bot")
    assert key.key_hash == ApiKey.hash_key(raw)
    assert raw not in {key.key_hash, key.prefix, key.name}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.post("/api/v1/usage", event("via-admin-key"), format="json").status_code == 201
    page = admin.client.get(f"/admin/usage/apikey/{key.pk}/change/").content.decode()
    assert raw not in page


def test_revoking_in_the_admin_stops_the_key(admin: Persona, member: Persona) -> None:
    assert member.key is not None
    admin.client.post(
        "/admin/usage/apikey/",
        {"action": "revoke", "_selected_action": [member.key.pk]},
        follow=True,
    )
    assert member.client.get("/api/v1/usage").status_code == 401


def test_a_price_edited_in_the_admin_prices_the_next_event(
    admin: Persona, platform: Persona
) -> None:
    now = timezone.now()
    form = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_per_mtok": "10",
        "output_per_mtok": "0",
        "effective_from_0": now.strftime("%Y-%m-%d"),
        "effective_from_1": "00:00:00",
        "note": "negotiated",
    }
    response = admin.client.post("/admin/usage/modelprice/add/", form, follow=True)
    assert response.status_code == 200
    assert ModelPrice.objects.count() == 1
    platform.client.post("/api/v1/usage", event("after-edit"), format="json")
    rows()
    assert TokenUsage.objects.get(request_id="after-edit").cost == Decimal("0.001")
