"""Property-based API testing: schemathesis generates requests from the OpenAPI schema for every
operation and checks that no response is a 5xx and every response conforms to the schema
(status code, content type, body). Deterministic (derandomized) and bounded in time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.test import APIClient
from werkzeug.test import Client

from usage import services

# Per operation: 33 operations x 40 = ~1,300 generated requests (positive and negative), about a
# minute of CPU on the 2-core CI machine.
MAX_EXAMPLES = 40
# Only these act on a person's own authority (deciding overrides); everything else runs with
# the platform's global API key.
STAFF_OPERATIONS = {
    "/api/v1/overrides/{override_id}/approve",
    "/api/v1/overrides/{override_id}/reject",
}
CSRF_TOKEN = "schemathesiscsrftoken00000000000"  # 32 characters, as Django makes them

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    # Schema-violating requests are refused (4xx).
    schemathesis.checks.negative_data_rejection,
    # Not positive_data_acceptance: some rules span fields and OpenAPI 3.0 cannot say them (a
    # team budget needs a scope_id; exactly one of input_tokens, messages or prompt; until after
    # since), so a schema-valid body may still be refused with a field-level 400.
]


# Loaded once at collection (schema generation needs no database), from the served document.
APP = get_wsgi_application()
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", APP)
schema.config.generation.update(
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    allow_x00=True,
    # The test sends the credentials itself: a generated Cookie must not replace the session.
    with_security_parameters=False,
)
# A body over a documented maxItems (a batch of 1,001 events) is refused as too large.
schema.config.checks.negative_data_rejection.expected_statuses.append("413")


@pytest.fixture(autouse=True)
def _keep_the_test_connection(db: None) -> Iterator[None]:
    """Like Django's test client: the request signals must not close the test's connection
    (its transaction holds the fixtures' rows)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def credentials(db: None, django_user_model: Any) -> dict[str, dict[str, Any]]:
    """Call arguments per principal: the global API key, and a superuser's session."""
    _key, raw = services.api_key_create(name="schemathesis", scope="global")  # type: ignore[arg-type]
    user = django_user_model.objects.create_superuser("st-admin", "st@example.com", "pw-st-123")
    client = APIClient()
    client.force_login(user)
    session = client.cookies["sessionid"].value
    return {
        "key": {"headers": {"Authorization": f"Bearer {raw}"}},
        "staff": {
            "headers": {"X-CSRFToken": CSRF_TOKEN},
            "cookies": {"sessionid": session, "csrftoken": CSRF_TOKEN},
        },
    }


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,  # derandomized: nothing to replay, and no .hypothesis/ in the tree
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_it_answers_every_generated_request_within_the_schema(
    case: Any, credentials: dict[str, dict[str, Any]]
) -> None:
    who = "staff" if case.path in STAFF_OPERATIONS else "key"
    case.call_and_validate(checks=CHECKS, **credentials[who])


def test_it_reaches_the_staff_operations_as_a_staff_member(
    credentials: dict[str, dict[str, Any]],
) -> None:
    """The harness itself: the session and CSRF token get past authentication, so the staff
    operations above are tested beyond a 401/403."""
    client = Client(APP)
    for name, value in credentials["staff"]["cookies"].items():
        client.set_cookie(name, value, domain="localhost")
    response = client.post(
        "/api/v1/overrides/999999/approve",
        json={"reason": "harness"},
        headers=credentials["staff"]["headers"],
    )
    assert response.status_code == 404, response.get_data(as_text=True)
