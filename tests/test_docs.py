from __future__ import annotations

import re

import pytest
from rest_framework.test import APIClient


@pytest.mark.django_db
def test_the_api_docs_are_public_and_load_no_asset_from_the_network() -> None:
    page = APIClient().get("/api/docs/")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.content.decode())
    assert any("swagger-ui" in s for s in sources)
    assert not [s for s in sources if s.startswith(("http://", "https://", "//"))]


@pytest.mark.django_db
def test_the_openapi_schema_lists_the_usage_endpoints() -> None:
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert {"/api/v1/usage", "/api/v1/usage/batch", "/api/v1/signals"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


@pytest.mark.django_db
def test_the_root_sends_a_person_to_the_admin() -> None:
    response = APIClient().get("/")
    assert (response.status_code, response["Location"]) == (302, "/admin/")
