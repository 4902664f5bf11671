"""The OpenAPI document is the API's contract: clients are generated from it and schemathesis
tests every operation against it (tests/test_schemathesis.py), so it must be valid OpenAPI
3.0.3 and say what the code really accepts and answers.

drf-spectacular gets request and response bodies from pydantic models as JSON Schema 2020-12
(`exclusiveMinimum: 0`, `anyOf [..., {"type": "null"}]`, `const`), which OpenAPI 3.0 spells
differently; `to_oas30` rewrites those. Every operation also documents the error answers it can
give, all with the one error shape (core.errors). Imports no app.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.contrib.pydantic import PydanticExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent
from pydantic.json_schema import model_json_schema

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error answer: a code, a message and field-level messages.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "fields": {
                    "type": "object",
                    "description": "Messages per input field (dotted paths for nested ones).",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                },
            },
            "required": ["code", "message", "fields"],
        }
    },
    "required": ["error"],
}
ERROR_DESCRIPTIONS = {
    "400": "Invalid input: error.fields says which field and why.",
    "401": "No API key or session, or an unknown or revoked key.",
    "403": "Outside the caller's scope or permissions.",
    "404": "No such object inside the caller's scope.",
    "409": "Conflicts with the object's current state.",
    "413": "Request body too large.",
    "415": "The body is not JSON (send Content-Type: application/json).",
    "422": "Valid, but too large or too deep to answer or store (error.fields says how).",
    "503": "The database is unreachable; retry after Retry-After seconds.",
}
# Operations that name an object in their body (or reach one through an action, /signals) and so
# can answer 404 / 409 besides those with an id in the path.
EXTRA_ERRORS: dict[tuple[str, str], set[str]] = {
    ("get", "/api/v1/alerts"): {"404"},
    ("post", "/api/v1/agent-profiles"): {"409"},
    ("patch", "/api/v1/agent-profiles/{profile_id}"): {"409"},
    ("post", "/api/v1/budgets"): {"409"},
    ("patch", "/api/v1/budgets/{budget_id}"): {"409"},
    ("post", "/api/v1/budgets/check"): {"404", "409"},
    ("post", "/api/v1/budgets/{budget_id}/overrides"): {"409"},
    ("post", "/api/v1/overrides/{override_id}/approve"): {"409"},
    ("post", "/api/v1/overrides/{override_id}/reject"): {"409"},
    ("post", "/api/v1/reservations/cancel"): {"404", "409"},
    ("post", "/api/v1/usage"): {"404", "409"},
    ("post", "/api/v1/usage/batch"): {"404", "409"},
    ("post", "/api/v1/signals"): {"404", "409", "422"},
    ("post", "/api/v1/relationships"): {"404", "409", "422"},
    ("get", "/api/v1/lineage/{request_id}"): {"422"},
}
# Largest database id (BigAutoField): a larger one in a path is a 404, the schema says so.
MAX_ID = 2**63 - 1


class ActionSchema(AutoSchema):
    """An operation is described by what its action does (a view's `action_description`),
    not by the docstring of the view class it shares with every other endpoint."""

    def get_description(self) -> str:  # type: ignore[override]  # drf-spectacular's signature
        describe = getattr(self.view, "action_description", None)
        text = describe(self.method.lower()) if callable(describe) else ""
        return str(text or super().get_description())


class RequestAwarePydanticExtension(PydanticExtension):
    """Request bodies are documented as pydantic *validates* them (a Decimal accepts a number
    or a numeric string), responses as it serializes them; drf-spectacular's own extension uses
    the serialization form for both, which understates what requests may carry."""

    priority = 1

    def map_serializer(self, auto_schema: Any, direction: str) -> Any:
        if direction != "request":
            return super().map_serializer(auto_schema, direction)
        schema = model_json_schema(
            self.target, ref_template="#/components/schemas/{model}", mode="validation"
        )
        for sub_name, sub_schema in schema.pop("$defs", {}).items():
            auto_schema.registry.register_on_missing(
                ResolvedComponent(
                    name=sub_name,
                    type=ResolvedComponent.SCHEMA,
                    object=sub_name,
                    schema=sub_schema,
                )
            )
        return schema


def to_oas30(schema: Any) -> None:
    """Rewrite a JSON Schema 2020-12 node (and its children) into OpenAPI 3.0's dialect."""
    if not isinstance(schema, dict):
        return
    for combiner in ("anyOf", "oneOf"):
        members = schema.get(combiner)
        if not isinstance(members, list):
            continue
        kept = [m for m in members if m != {"type": "null"}]
        if len(kept) < len(members):
            schema["nullable"] = True
        if len(kept) == 1:
            del schema[combiner]
            only = kept[0]
            if "$ref" in only:
                schema["allOf"] = [only]  # siblings of a $ref are ignored in 3.0
            else:
                schema.update({k: v for k, v in only.items() if k != "title"})
        else:
            schema[combiner] = kept
    for key in ("items", "not", "additionalProperties"):
        to_oas30(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for member in schema.get(key) or []:
            to_oas30(member)
    for member in (schema.get("properties") or {}).values():
        to_oas30(member)
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = schema.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            schema[plain] = value
            schema[bound] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "examples" in schema:
        examples = schema.pop("examples")
        if isinstance(examples, list) and examples:
            schema.setdefault("example", examples[0])
    if schema.get("type") == "null":  # a value that can only be null
        del schema["type"]
        schema["nullable"] = True
        schema["enum"] = [None]


def _media_schemas(container: dict[str, Any]) -> list[Any]:
    return [media.get("schema") for media in (container.get("content") or {}).values()]


def _error_codes(method: str, path: str, operation: dict[str, Any]) -> set[str]:
    codes = {"503"}
    if operation.get("security") != [{}] and operation.get("security") is not None:
        codes |= {"401", "403"}
    if operation.get("parameters") or operation.get("requestBody"):
        codes.add("400")
    if any(p.get("in") == "path" for p in operation.get("parameters", [])):
        codes.add("404")
    if operation.get("requestBody"):
        codes |= {"413", "415"}
    return codes | EXTRA_ERRORS.get((method, path), set())


def _drop_path_fields(operation: dict[str, Any], components: dict[str, Any]) -> None:
    """An id that comes from the URL is not asked for in the body too (the view fills it in
    and refuses a different one: core.api.with_url_id)."""
    names = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
    for schema in _media_schemas(operation["requestBody"]):
        ref = (schema or {}).get("$ref", "")
        body = components.get(ref.rsplit("/", 1)[-1]) if ref else schema
        if not isinstance(body, dict) or not names & set(body.get("properties", {})):
            continue
        for name in names:
            body["properties"].pop(name, None)
        body["required"] = [r for r in body.get("required", []) if r not in names]
        if not body["required"]:
            del body["required"]


def postprocess(result: dict[str, Any], generator: Any, request: Any, public: bool) -> Any:
    """drf-spectacular POSTPROCESSING_HOOKS entry: OpenAPI 3.0 dialect and error answers."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    for component in components.values():
        to_oas30(component)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                to_oas30(parameter.get("schema"))
                if parameter.get("in") == "path" and parameter["schema"].get("type") == "integer":
                    # Django's <int:...> converter matches digits only.
                    parameter["schema"].update(minimum=0, maximum=MAX_ID)
            if "requestBody" in operation:
                for schema in _media_schemas(operation["requestBody"]):
                    to_oas30(schema)
                _drop_path_fields(operation, components)
            responses = operation.setdefault("responses", {})
            for response in responses.values():
                for schema in _media_schemas(response):
                    to_oas30(schema)
            for code in sorted(_error_codes(method, path, operation) - set(responses)):
                responses[code] = {
                    "description": ERROR_DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
                if code == "503":
                    responses[code]["headers"] = {
                        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
                    }
    return result
