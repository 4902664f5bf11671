"""Every error under /api/ is the JSON error shape, whatever route (or none) answers it."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from tests.conftest import Persona

pytestmark = pytest.mark.django_db


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"code", "message", "fields"}
    return body


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/nope", "/api", "/api/v2/usage"])
def test_it_answers_an_unknown_api_path_with_a_json_404(
    platform: Persona, path: str, debug: bool
) -> None:
    with override_settings(DEBUG=debug):
        for call in (platform.client.get, platform.client.post, platform.client.delete):
            assert _error(call(path), 404)["code"] == "not_found"


def test_a_trailing_slash_variant_is_a_json_404_naming_the_real_path(platform: Persona) -> None:
    for call in (platform.client.get, platform.client.post):
        error = _error(call("/api/v1/usage/"), 404)
        assert error["message"] == "Not found. API paths have no trailing slash: /api/v1/usage"


def test_the_schema_and_docs_without_their_slash_still_redirect() -> None:
    response = APIClient().get("/api/schema?format=json")
    assert (response.status_code, response["Location"]) == (301, "/api/schema/?format=json")
    assert APIClient().get("/api/docs")["Location"] == "/api/docs/"


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/api/v1/health"), ("post", "/api/schema/"), ("delete", "/api/docs/")],
)
def test_a_method_the_route_does_not_take_is_a_json_405(method: str, path: str) -> None:
    response = getattr(APIClient(), method)(path)
    assert _error(response, 405)["code"] == "method_not_allowed"
    assert "GET" in response["Allow"]


def test_a_revoked_key_on_the_schema_gets_the_json_401(revoked: Persona) -> None:
    assert _error(revoked.client.get("/api/schema/"), 401)["code"] == "authentication_failed"


def test_a_sessions_post_to_an_unknown_path_is_a_404_not_a_csrf_page(admin: Persona) -> None:
    admin.client.enforce_csrf_checks = True
    assert _error(admin.client.post("/api/v1/nope", {}), 404)["code"] == "not_found"


def test_a_host_outside_allowed_hosts_is_a_json_400() -> None:
    response = APIClient().get("/api/v1/usage", HTTP_HOST="evil.example")
    assert _error(response, 400)["code"] == "bad_request"


def test_pages_outside_the_api_keep_djangos_404() -> None:
    response = APIClient().get("/nope")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
