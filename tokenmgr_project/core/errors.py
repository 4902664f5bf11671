"""One error shape for every interface: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from pydantic import ValidationError
from rest_framework import exceptions, status

FieldErrors = dict[str, list[str]]


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        code: str = "invalid",
        fields: FieldErrors | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.fields = fields or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.fields}}


def _friendly(error_type: str, message: str) -> str:
    if error_type == "missing":
        return "This field is required."
    if error_type == "extra_forbidden":
        return "Unknown field."
    if error_type == "value_error":
        # Our validators' own words, without pydantic's "Value error, " in front of them.
        return message.removeprefix("Value error, ")
    return message


def pydantic_field_errors(exc: ValidationError, prefix: str = "") -> FieldErrors:
    fields: FieldErrors = {}
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        # Union members add tags such as "str-enum[RelationshipType]" to the location: not fields.
        parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
        path = ".".join(parts) or "non_field_errors"
        message = _friendly(err["type"], err["msg"])
        if message not in fields.setdefault(prefix + path, []):
            fields[prefix + path].append(message)
    return fields


def body_too_large_error() -> ApiError:
    """A request body over DATA_UPLOAD_MAX_MEMORY_SIZE (the HTTP bridge and the views)."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return ApiError(
        "Request body too large.",
        status_code=413,
        code="too_large",
        fields={"body": [f"At most {limit} bytes."]},
    )


def validation_error(fields: FieldErrors, message: str = "Invalid input.") -> ApiError:
    return ApiError(message, status_code=400, code="invalid", fields=fields)


def _drf_fields(detail: Any) -> FieldErrors:
    if isinstance(detail, dict):
        return {
            str(k): [str(v) for v in (vals if isinstance(vals, list) else [vals])]
            for k, vals in detail.items()
        }
    if isinstance(detail, list):
        return {"non_field_errors": [str(v) for v in detail]}
    return {}


def error_body(exc: exceptions.APIException, status_code: int) -> dict[str, Any]:
    """The JSON error body for a DRF exception (shared by the DRF handler and fast paths)."""
    if isinstance(exc, exceptions.ParseError):
        # Malformed JSON: point at the body, the only "field" there is.
        message = str(exc.detail)
        return {"error": {"code": "parse_error", "message": message, "fields": {"body": [message]}}}
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return {
            "error": {
                "code": "unsupported_media_type",
                "message": str(exc.detail),
                "fields": {"content_type": ["Send Content-Type: application/json."]},
            }
        }
    if isinstance(exc, exceptions.ValidationError):
        return validation_error(_drf_fields(exc.detail)).body()
    detail = exc.detail
    message = str(detail) if not isinstance(detail, (dict, list)) else "Request failed."
    fields = _drf_fields(detail) if isinstance(detail, (dict, list)) else {}
    if status_code == status.HTTP_401_UNAUTHORIZED:
        fields = fields or {"authorization": [message]}
    codes = exc.get_codes()
    return {
        "error": {
            "code": codes if isinstance(codes, str) else "error",
            "message": message,
            "fields": fields,
        }
    }
