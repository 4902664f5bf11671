from __future__ import annotations

import pytest

from tests.conftest import Persona, event, rows
from tokenmgr_project.core import actions
from usage import services

pytestmark = pytest.mark.django_db


def test_track_usage_through_a_signal_is_the_same_action_as_rest(platform: Persona) -> None:
    signal = {"type": "track_usage", "data": event("sig-1")}
    response = platform.client.post("/api/v1/signals", signal, format="json")
    assert response.status_code == 201
    assert response.json()["result"]["duplicate"] is False
    again = platform.client.post("/api/v1/usage", event("sig-1"), format="json")
    assert again.json()["duplicate"] is True
    assert rows(request_id="sig-1") == 1


def test_a_bad_signal_payload_gets_the_same_field_errors(platform: Persona) -> None:
    signal = {"type": "track_usage", "data": event("sig-2", input_tokens=-1)}
    response = platform.client.post("/api/v1/signals", signal, format="json")
    assert response.status_code == 400
    assert "input_tokens" in response.json()["error"]["fields"]
    assert rows() == 0


def test_an_unknown_signal_type_lists_the_known_ones(platform: Persona) -> None:
    response = platform.client.post("/api/v1/signals", {"type": "launch_rockets"}, format="json")
    assert response.status_code == 400
    message = response.json()["error"]["fields"]["type"][0]
    assert all(name in message for name in actions.REGISTRY)


@pytest.mark.parametrize(
    "body", [{"data": {}}, {"type": 3}, {"type": "get_status", "extra": 1}, ["x"]]
)
def test_a_malformed_envelope_is_rejected(platform: Persona, body: object) -> None:
    response = platform.client.post("/api/v1/signals", body, format="json")
    assert response.status_code == 400


def test_get_usage_and_get_status_signals(platform: Persona) -> None:
    platform.client.post("/api/v1/usage", event("sig-3"), format="json")
    rows()
    usage = platform.client.post(
        "/api/v1/signals", {"type": "get_usage", "data": {}}, format="json"
    )
    assert [r["request_id"] for r in usage.json()["result"]["results"]] == ["sig-3"]
    status = platform.client.post("/api/v1/signals", {"type": "get_status"}, format="json")
    assert status.json()["result"]["database"]["reachable"] is True


def test_configure_manager_changes_run_time_settings(admin: Persona) -> None:
    data = {"buffer_size": 250, "flush_interval": 2.5, "retention_days": 30}
    response = admin.client.post(
        "/api/v1/signals", {"type": "configure_manager", "data": data}, format="json"
    )
    assert response.status_code == 200
    config = services.manager_config()
    assert (config.buffer_size, config.flush_interval, config.retention_days) == (250, 2.5, 30)


def test_it_keeps_alerts_on_the_status_feed_when_a_first_change_names_no_channels(
    admin: Persona,
) -> None:
    assert services.manager_config().alert_channels == ["status"]
    signal = {"type": "configure_manager", "data": {"buffer_size": 300}}
    assert admin.client.post("/api/v1/signals", signal, format="json").status_code == 200
    assert services.manager_config().alert_channels == ["status"]


def test_configure_manager_needs_staff_or_a_global_key(member: Persona) -> None:
    signal = {"type": "configure_manager", "data": {"buffer_size": 5}}
    assert member.client.post("/api/v1/signals", signal, format="json").status_code == 403
    assert services.manager_config().buffer_size != 5


@pytest.mark.parametrize(
    "data", [{"buffer_size": 0}, {"flush_interval": 0.1}, {"retention_days": -1}, {"x": 1}]
)
def test_configure_manager_rejects_bad_values(platform: Persona, data: dict) -> None:
    signal = {"type": "configure_manager", "data": data}
    response = platform.client.post("/api/v1/signals", signal, format="json")
    assert response.status_code == 400
    assert set(data) <= set(response.json()["error"]["fields"])
