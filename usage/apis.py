"""REST views: parse the request, run the named action, shape the response. No rules here."""

from __future__ import annotations

import json
from typing import Any, ClassVar
from urllib.parse import urlencode

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from usage import actions
from usage.auth import BEARER_CHALLENGE, principal_for, principal_for_bearer
from usage.errors import ApiError, body_too_large_error, error_body, validation_error
from usage.schemas import (
    CompareIn,
    PriceOverrideIn,
    QuoteIn,
    TokenizeIn,
    TruncateIn,
    UsageBatchIn,
    UsageEventIn,
)
from usage.selectors import FILTER_FIELDS

_RESERVED_QUERY = {"format"}


def _query(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in request.query_params:
        if name in _RESERVED_QUERY:
            continue
        values = request.query_params.getlist(name)
        params[name] = ",".join(values) if name == "group_by" else values[-1]
    return params


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class ActionView(APIView):
    """Maps HTTP methods to registered actions: `actions_by_method = {"post": "track_usage"}`.

    With `fast_post`, a POST carrying a Bearer key and a JSON body (what agents send, many times
    a second) skips DRF's request wrapping, negotiation and rendering, about a fifth of the
    request's CPU, and runs the same action with the same authentication and error bodies.
    Everything else (sessions, the browsable API, other content types) takes the DRF path.
    """

    actions_by_method: ClassVar[dict[str, str]] = {}
    fast_post = False

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        length = request.META.get("CONTENT_LENGTH") or "0"
        if length.isdigit() and int(length) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            error = body_too_large_error()
            return _json(error.body(), error.status_code)
        if (
            self.fast_post
            and request.method == "POST"
            and request.content_type == "application/json"
            and request.META.get("HTTP_AUTHORIZATION", "")[:7].lower() == "bearer "
        ):
            return self._fast_post(request)
        return super().dispatch(request, *args, **kwargs)

    def _fast_post(self, request: HttpRequest) -> HttpResponseBase:
        code, body, headers = fast_action(
            self.actions_by_method["post"], request.META["HTTP_AUTHORIZATION"], request.body
        )
        response = _json(body, code)
        for name, value in headers.items():
            response[name] = value
        return response

    def _run(self, request: Request, method: str, data: Any) -> Response:
        outcome = actions.run(self.actions_by_method[method], principal_for(request), data)
        return Response(outcome.body, status=outcome.status)

    def _body(self, request: Request) -> Any:
        data = request.data
        if hasattr(data, "dict") and not isinstance(data, dict):
            raise ApiError("Invalid body.", fields={"body": ["Send a JSON body."]}, status_code=415)
        return data


def fast_action(
    name: str, authorization: str, raw_body: bytes
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Run action `name` for a Bearer-authenticated JSON POST: (status, body, extra headers).

    Shared by `ActionView`'s fast path and the ASGI bridge's (tokenmgr_project.asgi), which
    calls it without building a Django request at all.
    """
    try:
        principal = principal_for_bearer(authorization)
        try:
            data = json.loads(raw_body, parse_constant=_reject_constant)
        except ValueError as exc:  # the same words as DRF's JSONParser
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        outcome = actions.run(name, principal, data)
    except ApiError as exc:
        return exc.status_code, exc.body(), {}
    except exceptions.APIException as exc:
        headers = {}
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            headers["WWW-Authenticate"] = BEARER_CHALLENGE
        return exc.status_code, error_body(exc, exc.status_code), headers
    return outcome.status, outcome.body, {}


def with_url_id(data: Any, name: str, value: int) -> Any:
    """The body with the id from the URL; a body naming another id is refused, not overruled."""
    if not isinstance(data, dict):
        return data  # validate() answers "Expected a JSON object."
    if name in data and data[name] != value:
        raise validation_error({name: [f"Comes from the URL ({value}); leave it out."]})
    return {**data, name: value}


def _json(body: dict[str, Any], status_code: int) -> JsonResponse:
    return JsonResponse(
        body,
        status=status_code,
        json_dumps_params={"separators": (",", ":"), "ensure_ascii": False},
    )


_filters_doc = [
    OpenApiParameter(name, str, description=f"Only usage with this {name}.")
    for name in FILTER_FIELDS
] + [
    OpenApiParameter("since", str, description="ISO 8601, inclusive."),
    OpenApiParameter("until", str, description="ISO 8601, exclusive."),
]


class UsageApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_usage", "post": "track_usage"}
    fast_post = True

    @extend_schema(
        parameters=[*_filters_doc, OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: dict},
        summary="List usage (keyset-paginated)",
    )
    def get(self, request: Request) -> Response:
        response = self._run(request, "get", _query(request))
        cursor = response.data.get("next_cursor")
        if cursor:
            params = {**_query(request), "cursor": cursor}
            response.data["next"] = (
                request.build_absolute_uri(request.path) + "?" + urlencode(params)
            )
        else:
            response.data["next"] = None
        return response

    @extend_schema(
        request=UsageEventIn, responses={201: dict, 200: dict}, summary="Track one request's usage"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class UsageBatchApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "track_usage_batch"}
    fast_post = True

    @extend_schema(request=UsageBatchIn, responses={200: dict}, summary="Track up to 1,000 events")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class UsageSummaryApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_usage_summary"}

    @extend_schema(
        parameters=[
            *_filters_doc,
            OpenApiParameter("group_by", str, description="Comma-separated dimensions."),
            OpenApiParameter("interval", str, enum=["hour", "day", "week", "month"]),
            OpenApiParameter("tz", str, description="IANA time zone for interval buckets."),
        ],
        responses={200: dict},
        summary="Usage totals grouped by dimensions and time",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", _query(request))


class HealthApi(APIView):
    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(responses={200: dict, 503: dict}, summary="Health and buffer state")
    def get(self, request: Request) -> Response:
        outcome = actions.get_status(None, {})  # type: ignore[arg-type]  # public, reads no scoped data
        return Response(outcome.body, status=outcome.status)


class TokenizeApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "tokenize"}

    @extend_schema(request=TokenizeIn, responses={200: dict}, summary="Count tokens")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class TruncateApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "truncate"}

    @extend_schema(request=TruncateIn, responses={200: dict}, summary="Trim text to max_tokens")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class PricingApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_pricing", "post": "update_pricing"}

    @extend_schema(
        parameters=[
            OpenApiParameter("provider", str),
            OpenApiParameter("model", str, description="Substring."),
        ],
        responses={200: dict},
        summary="Price catalogue and overrides",
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", _query(request))

    @extend_schema(
        request=PriceOverrideIn, responses={201: dict, 200: dict}, summary="Set a price override"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class QuoteApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "quote_price"}

    @extend_schema(request=QuoteIn, responses={200: dict}, summary="Price one request")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class CompareApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "compare_prices"}

    @extend_schema(
        request=CompareIn, responses={200: dict}, summary="Compare models, cheapest first"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class SignalsApi(APIView):
    @extend_schema(request=dict, responses={200: dict}, summary="Run an action by name")
    def post(self, request: Request) -> Response:
        envelope = request.data
        if not isinstance(envelope, dict):
            raise ApiError(
                "Invalid signal.", fields={"body": ['Send {"type": ..., "data": {...}}.']}
            )
        unknown = sorted(set(envelope) - {"type", "data"})
        if unknown:
            raise ApiError("Invalid signal.", fields={k: ["Unknown field."] for k in unknown})
        kind = envelope.get("type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(
                "Invalid signal.",
                fields={
                    "type": [f"Required. Known actions: {', '.join(sorted(actions.REGISTRY))}."]
                },
            )
        outcome = actions.run(kind, principal_for(request), envelope.get("data", {}))
        return Response({"type": kind, "result": outcome.body}, status=outcome.status)
