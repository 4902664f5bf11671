from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
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


def _schema() -> dict[str, Any]:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    return response.json()  # type: ignore[no-any-return]


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _nodes(child)


@pytest.mark.django_db
def test_the_openapi_schema_speaks_openapi_3_0_not_json_schema_2020() -> None:
    schema = _schema()
    assert schema["openapi"] == "3.0.3"
    nodes = list(_nodes(schema["components"]["schemas"]))
    # 3.0: exclusiveMinimum is a flag beside minimum; null is `nullable`, not a type; no const.
    assert all(isinstance(n.get("exclusiveMinimum", True), bool) for n in nodes)
    assert all(n.get("type") != "null" for n in nodes)
    assert not [n for n in nodes if "const" in n]
    token_limit = schema["components"]["schemas"]["BudgetInRequest"]["properties"]["token_limit"]
    assert (token_limit["minimum"], token_limit["exclusiveMinimum"]) == (0, True)


@pytest.mark.django_db
def test_every_operation_documents_its_errors_with_the_error_shape() -> None:
    schema = _schema()
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in schema["paths"].items():
        if path == "/api/v1/health":  # public, no input; its 503 is the health body
            continue
        for method, operation in item.items():
            codes = operation["responses"]
            expected = {"400", "401", "403", "503"}
            if operation.get("requestBody"):
                expected |= {"413", "415"}
            if "{" in path:
                expected.add("404")
            assert expected <= set(codes), (method, path, sorted(codes))
            for code in expected:
                assert codes[code]["content"]["application/json"]["schema"] == error


@pytest.mark.django_db
def test_the_query_parameters_say_what_the_api_accepts() -> None:
    operation = _schema()["paths"]["/api/v1/usage"]["get"]
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 1000)
    assert params["since"]["format"] == "date-time"
    assert params["team_id"]["maxLength"] == 128
    summary = _schema()["paths"]["/api/v1/usage/summary"]["get"]
    interval = next(p for p in summary["parameters"] if p["name"] == "interval")
    assert set(interval["schema"]["enum"]) == {"hour", "day", "week", "month"}


def test_the_schema_generates_without_a_warning(tmp_path: Any) -> None:
    """drf-spectacular warns (and numbers the ids) when two operations share an operationId, as
    a list and a detail view of one APIView-based resource do unless one is named."""
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml")
    )
