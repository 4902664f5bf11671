from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import Persona, StaffSession, event, rows
from usage import pricing, services
from usage.models import ApiKey, ManagerConfig, ModelPrice, TokenUsage

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


# --- helpers -----------------------------------------------------------------------------------

SETTINGS_PAGE = "/admin/usage/managerconfig/"
PRICES = "/admin/usage/modelprice/"
# openai/gpt-4o-mini in the catalogue: 0.15 and 0.6 USD per million tokens; event() is 100 + 20.
CATALOGUE_COST = Decimal("0.000027")


def text(response: Any) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def cost_of(request_id: str) -> Decimal:
    rows()
    return TokenUsage.objects.get(request_id=request_id).cost


def price_form(**fields: str) -> dict[str, str]:
    """The add form for a 10 USD/Mtok input price on openai/gpt-4o-mini from today."""
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "effective_from_0": timezone.now().strftime("%Y-%m-%d"),
        "effective_from_1": "00:00:00",
        "input_per_mtok": "10",
        "output_per_mtok": "0",
        "note": "negotiated",
        **fields,
    }


def staff_with(django_user_model: Any, *codenames: str) -> StaffSession:
    user = django_user_model.objects.create_user("settings-staff", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = APIClient()
    client.force_login(user)
    return StaffSession("settings-staff", client, user=user)


# --- manager settings: one page ----------------------------------------------------------------


def test_it_opens_manager_settings_as_one_page_of_defaults_units_and_ranges(
    admin: Persona,
) -> None:
    page = text(admin.client.get(SETTINGS_PAGE))
    buffer_row = re.search(r'<tr id="setting-buffer_size">(.*?)</tr>', page).group(1)
    assert f"{settings.TOKENMGR_BUFFER_SIZE:,} events" in buffer_row
    assert "environment default" in buffer_row
    assert "TOKENMGR_BUFFER_SIZE" in buffer_row
    assert "1 to 100,000 events" in buffer_row
    assert "0.5 to 3,600 seconds" in page
    assert "0 to 36,500 days" in page
    channels = re.findall(r'type="checkbox" name="alert_channels" value="(\w+)"', page)
    assert channels == ["status", "email", "webhook"]
    assert "/admin/usage/managerconfig/add/" not in text(admin.client.get("/admin/"))


def test_it_saves_settings_through_the_service_and_an_empty_number_means_the_default(
    admin: Persona,
) -> None:
    form = {"buffer_size": "250", "retention_days": "30", "alert_channels": ["status", "webhook"]}
    saved = text(admin.client.post(SETTINGS_PAGE, form, follow=True))
    assert "Manager settings saved" in saved
    assert re.search(r'<tr id="setting-buffer_size">.*?250 events.*?override', saved)
    config = services.manager_config()
    assert (config.buffer_size, config.flush_interval, config.retention_days) == (
        250,
        settings.TOKENMGR_FLUSH_INTERVAL,
        30,
    )
    assert (config.alert_channels, config.optimization_enabled) == (["status", "webhook"], False)
    admin.client.post(SETTINGS_PAGE, {**form, "buffer_size": ""})
    assert services.manager_config().buffer_size == settings.TOKENMGR_BUFFER_SIZE
    assert ManagerConfig.objects.get().buffer_size is None


def test_it_refuses_an_out_of_range_setting_with_the_fields_error(admin: Persona) -> None:
    response = admin.client.post(SETTINGS_PAGE, {"buffer_size": "0", "flush_interval": "0.1"})
    assert response.status_code == 200
    page = text(response)
    assert "greater than or equal to 1." in page
    assert "greater than or equal to 0.5." in page
    assert not ManagerConfig.objects.exists()


def test_it_shows_settings_to_a_viewer_but_takes_changes_only_with_the_change_permission(
    django_user_model: Any,
) -> None:
    viewer = staff_with(django_user_model, "view_managerconfig")
    page = text(viewer.client.get(SETTINGS_PAGE))
    assert "TOKENMGR_FLUSH_INTERVAL" in page
    assert 'name="buffer_size"' not in page
    assert viewer.client.post(SETTINGS_PAGE, {"buffer_size": "7"}).status_code == 403
    assert not ManagerConfig.objects.exists()


def test_it_refuses_the_settings_page_to_staff_without_a_permission(
    staff_noperm: StaffSession,
) -> None:
    assert staff_noperm.client.get(SETTINGS_PAGE).status_code == 403


# --- amounts as the API writes them ------------------------------------------------------------


def test_it_shows_a_usage_cost_as_the_api_writes_it(admin: Persona, platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("money-1"), format="json")
    rows()
    row = TokenUsage.objects.get(request_id="money-1")
    api_cost = platform.client.get("/api/v1/usage").json()["results"][0]["cost"]
    assert api_cost == "0.000027"
    listing = text(admin.client.get("/admin/usage/tokenusage/"))
    page = text(admin.client.get(f"/admin/usage/tokenusage/{row.pk}/change/"))
    assert f'<td class="field-cost_usd">{api_cost}</td>' in listing
    assert f"{api_cost} USD" in page
    assert "0.0000270000" not in listing + page


def test_it_shows_override_prices_without_padding_zeros(admin: Persona) -> None:
    price, _ = services.model_price_set(
        provider="openai",
        model="gpt-4o-mini",
        input_per_mtok=Decimal("2.5"),
        output_per_mtok=Decimal(10),
        cache_read_per_mtok=Decimal("1.25"),
    )
    listing = text(admin.client.get(PRICES))
    assert '<td class="field-input">2.5</td>' in listing
    assert '<td class="field-output">10</td>' in listing
    assert '<td class="field-cache_read">1.25</td>' in listing
    form = text(admin.client.get(f"{PRICES}{price.pk}/change/"))
    assert re.search(r'name="input_per_mtok"[^>]*value="2.5"', form)


# --- price overrides through the service, the cache dropped on commit --------------------------


def test_it_prices_with_an_admin_edit_only_once_the_edit_commits(
    admin: Persona,
    platform: Persona,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    platform.client.post("/api/v1/usage", event("before"), format="json")  # loads the prices
    with django_capture_on_commit_callbacks() as on_commit:
        assert admin.client.post(PRICES + "add/", price_form()).status_code == 302
        platform.client.post("/api/v1/usage", event("not-committed"), format="json")
    for callback in on_commit:
        callback()
    platform.client.post("/api/v1/usage", event("committed"), format="json")
    assert cost_of("before") == cost_of("not-committed") == CATALOGUE_COST
    assert cost_of("committed") == Decimal("0.001")


@pytest.mark.parametrize("how", ["delete page", "delete action"])
def test_it_deletes_an_override_through_the_service_and_the_catalogue_prices_again(
    admin: Persona,
    platform: Persona,
    django_capture_on_commit_callbacks: Callable[..., Any],
    how: str,
) -> None:
    price, _ = services.model_price_set(
        provider="openai",
        model="gpt-4o-mini",
        input_per_mtok=Decimal(10),
        output_per_mtok=Decimal(0),
        effective_from=datetime(2015, 1, 1, tzinfo=UTC),
    )
    platform.client.post("/api/v1/usage", event("overridden"), format="json")
    with django_capture_on_commit_callbacks(execute=True):
        if how == "delete page":
            admin.client.post(f"{PRICES}{price.pk}/delete/", {"post": "yes"})
        else:
            action = {"action": "delete_selected", "_selected_action": [price.pk], "post": "yes"}
            admin.client.post(PRICES, action)
    assert not ModelPrice.objects.exists()
    platform.client.post("/api/v1/usage", event("catalogue-again"), format="json")
    assert cost_of("overridden") == Decimal("0.001")
    assert cost_of("catalogue-again") == CATALOGUE_COST


def test_it_changes_only_the_prices_and_note_of_an_existing_override(admin: Persona) -> None:
    price, _ = services.model_price_set(
        provider="openai",
        model="gpt-4o-mini",
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
    )
    url = f"{PRICES}{price.pk}/change/"
    assert 'name="model"' not in text(admin.client.get(url))
    form = {"input_per_mtok": "3", "output_per_mtok": "4", "note": "renegotiated"}
    assert admin.client.post(url, {**form, "model": "other"}).status_code == 302
    saved = ModelPrice.objects.get()
    assert (saved.pk, saved.model, saved.input_per_mtok, saved.note) == (
        price.pk,
        "gpt-4o-mini",
        Decimal(3),
        "renegotiated",
    )


# --- the catalogue the overrides override ------------------------------------------------------


def test_it_says_where_catalogue_prices_come_from_on_an_empty_overrides_list(
    admin: Persona,
) -> None:
    page = text(admin.client.get(PRICES))
    assert "0 model prices" in page
    assert pricing.CATALOGUE_VERSION in page
    assert f'href="{PRICES}catalogue/"' in page
    assert 'href="/api/v1/pricing"' in page


def test_it_lists_catalogue_prices_with_a_link_that_starts_an_override(admin: Persona) -> None:
    page = text(admin.client.get(f"{PRICES}catalogue/?q=gpt-4o-mini&provider=openai"))
    assert "<td>openai</td>" in page
    assert "<td>0.15</td>" in page
    assert "claude" not in page
    link = re.search(r'href="(/admin/usage/modelprice/add/\?[^"]*model=gpt-4o-mini[^"]*)"', page)
    form = text(admin.client.get(link.group(1).replace("&amp;", "&")))
    assert re.search(r'name="model" value="gpt-4o-mini"', form)
    assert re.search(r'name="input_per_mtok" value="0.15"', form)


def test_it_shows_the_catalogue_only_to_staff_who_may_see_prices(
    staff_noperm: StaffSession, staff_viewer: StaffSession
) -> None:
    assert staff_noperm.client.get(f"{PRICES}catalogue/").status_code == 403
    page = text(staff_viewer.client.get(f"{PRICES}catalogue/?q=gpt-4o-mini"))
    assert "gpt-4o-mini" in page
    assert f'href="{PRICES}add/?' not in page  # viewing is not adding


# --- the API key form --------------------------------------------------------------------------


def test_it_offers_a_project_key_by_default_and_says_what_each_scope_needs(
    admin: Persona,
) -> None:
    page = text(admin.client.get("/admin/usage/apikey/add/"))
    assert re.search(r'<input type="radio" name="scope" value="project"[^>]* checked>', page)
    assert "Required for a project key." in page


def test_it_shows_the_services_rule_when_a_key_misses_its_team(admin: Persona) -> None:
    response = admin.client.post("/admin/usage/apikey/add/", {"name": "ci", "scope": "team"})
    assert response.status_code == 200
    assert "A team key needs a team_id." in text(response)
    assert not ApiKey.objects.exists()
