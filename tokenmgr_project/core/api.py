"""The API base view and its helpers: parse the request, run the named action, shape the
response. No rules here: actions hold them (core.actions)."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponseBase, JsonResponse
from drf_spectacular.utils import OpenApiParameter
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import PydanticUndefined
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from tokenmgr_project.core import actions, unavailable
from tokenmgr_project.core.errors import (
    ApiError,
    body_too_large_error,
    error_body,
    pydantic_field_errors,
    validation_error,
)
from tokenmgr_project.core.principal import principal_for

Money = Annotated[str, Field(description="A decimal amount as text, in `currency`.")]
FieldMessages = dict[str, list[str]]

_RESERVED_QUERY = {"format"}
MAX_QUERY_LENGTH = 1024
# What the database cannot compare or store in a text value.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def query_text(name: str, value: Any, *, max_length: int = MAX_QUERY_LENGTH) -> str:
    """A query value the database can compare: a string of at most `max_length` characters
    without control characters or unpaired surrogates; else a 400 naming the parameter."""
    if not isinstance(value, str) or len(value) > max_length:
        raise ApiError(
            "Invalid query parameter.",
            fields={name: [f"Must be a string of at most {max_length} characters."]},
        )
    if _UNSTORABLE.search(value):
        raise ApiError(
            "Invalid query parameter.",
            fields={name: ["Must not contain control characters or unpaired surrogates."]},
        )
    return value


def query_params(request: Request) -> dict[str, Any]:
    """The query string as action input. Every value is checked as body strings are (no
    control characters, bounded length): each GET endpoint answers 400 for what the database
    could not compare, whatever its action does with the value."""
    params: dict[str, Any] = {}
    for name in request.query_params:
        if name in _RESERVED_QUERY:
            continue
        values = request.query_params.getlist(name)
        value = ",".join(values) if name == "group_by" else values[-1]
        params[name] = query_text(name, value)
    return params


class ActionView(APIView):
    """Maps HTTP methods to registered actions: `actions_by_method = {"post": "track_usage"}`.

    With `fast_post`, the POST is one of the hot routes: a Bearer-authenticated JSON POST to it
    is answered by core.hotpath before Django sees it (same action, same authentication, same
    bodies and headers); anything else (sessions, the browsable API, other content types) comes
    here. A body over DATA_UPLOAD_MAX_MEMORY_SIZE is a 413 before
    anything reads it.
    """

    actions_by_method: ClassVar[dict[str, str]] = {}
    fast_post: ClassVar[bool] = False

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        length = request.META.get("CONTENT_LENGTH") or "0"
        if length.isdigit() and int(length) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            error = body_too_large_error()
            return json_response(error.body(), error.status_code)
        return super().dispatch(request, *args, **kwargs)

    def action_description(self, method: str) -> str:
        """What the action behind `method` does (the OpenAPI operation's description)."""
        entry = actions.REGISTRY.get(self.actions_by_method.get(method, ""))
        return entry.description if entry else ""

    def _run(self, request: Request, method: str, data: Any) -> Response:
        outcome = actions.run(self.actions_by_method[method], principal_for(request), data)
        return Response(outcome.body, status=outcome.status)

    def _body(self, request: Request) -> Any:
        data = request.data
        if hasattr(data, "dict") and not isinstance(data, dict):
            raise ApiError("Invalid body.", fields={"body": ["Send a JSON body."]}, status_code=415)
        return data


def with_url_id(data: Any, name: str, value: int) -> Any:
    """The body with the id from the URL; a body naming another id is refused, not overruled."""
    if not isinstance(data, dict):
        return data  # validate() answers "Expected a JSON object."
    if name in data and data[name] != value:
        raise validation_error({name: [f"Comes from the URL ({value}); leave it out."]})
    return {**data, name: value}


def json_response(body: dict[str, Any], status_code: int) -> JsonResponse:
    return JsonResponse(
        body,
        status=status_code,
        json_dumps_params={"separators": (",", ":"), "ensure_ascii": False},
    )


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApiError):
        return Response(exc.body(), status=exc.status_code)
    if isinstance(exc, unavailable.DATABASE_ERRORS):
        # What the caches and the buffer could not answer without the database: retry later.
        request = context.get("request")
        unavailable.note(exc, request.path if request is not None else "api")
        return Response(unavailable.body(), status=503, headers=unavailable.HEADERS)
    if isinstance(exc, ValidationError):
        err = validation_error(pydantic_field_errors(exc))
        return Response(err.body(), status=err.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response
    response.data = error_body(exc, response.status_code)
    return response


def query_parameters(model: type[BaseModel]) -> list[OpenApiParameter]:
    """The OpenAPI query parameters of a pydantic parameters model (each field: its type,
    choices, bounds and description), so a GET endpoint's schema is its validator's."""
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
        first = args[0]
        enum = None
        if get_origin(first) is Literal:
            enum = list(get_args(first))
            kind: Any = type(enum[0])
        elif first in (int, float, bool):
            kind = first
        else:
            kind = str
        default = None if info.default is PydanticUndefined else info.default
        out.append(
            OpenApiParameter(
                name,
                kind,
                enum=enum,
                default=default,
                description=info.description or "",
                required=info.is_required(),
            )
        )
    return out
