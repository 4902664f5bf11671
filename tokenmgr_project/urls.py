from functools import cache
from pathlib import Path
from typing import Any

from django.contrib import admin
from django.contrib.staticfiles import finders
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponsePermanentRedirect,
    JsonResponse,
)
from django.urls import Resolver404, include, path, re_path, resolve
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

# --- every /api/ error in the JSON error shape (README "Errors"); people get Django's pages -------


def _is_api(request: HttpRequest) -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def _api_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "fields": {}}}, status=status)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return _api_error(404, "not_found", "Not found.")
    return defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):  # e.g. a Host header outside ALLOWED_HOSTS
        return _api_error(400, "bad_request", "Bad request.")
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return _api_error(403, "permission_denied", "Permission denied.")
    return defaults.permission_denied(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return _api_error(500, "server_error", "Server error.")
    return defaults.server_error(request)


handler400, handler403, handler404, handler500 = (
    bad_request,
    permission_denied,
    not_found,
    server_error,
)


def _routes_elsewhere(path_: str) -> bool:
    try:
        return resolve(path_).func is not api_not_found
    except Resolver404:
        return False


@csrf_exempt  # it only answers 404: a session's POST to a wrong path gets that, not a CSRF page
def api_not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Every /api/ path that no route matches, trailing-slash variants included, and in DEBUG
    too (where Django would show its HTML page instead of calling handler404)."""
    slashed = request.path + "/"
    if request.method in ("GET", "HEAD") and _routes_elsewhere(slashed):
        # What APPEND_SLASH does (/api/docs → /api/docs/); this route hides the path from it.
        query = request.META.get("QUERY_STRING", "")
        return HttpResponsePermanentRedirect(slashed + (f"?{query}" if query else ""))
    bare = request.path.rstrip("/")
    if bare != request.path and _routes_elsewhere(bare):
        return _api_error(404, "not_found", f"Not found. API paths have no trailing slash: {bare}")
    return _api_error(404, "not_found", f"Not found: no API endpoint at {request.path}.")


class JsonErrors(APIView):
    """The schema and docs views answer their errors (405, a revoked key's 401) in the JSON
    error shape like the endpoints, not as YAML or HTML."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        if response.status_code >= 400:
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


class SchemaView(JsonErrors, SpectacularAPIView):
    pass


class DocsView(JsonErrors, SpectacularSwaggerView):
    pass


@cache
def _favicon() -> bytes:
    return Path(str(finders.find("tokenmgr/favicon.ico"))).read_bytes()


def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask every site for /favicon.ico; the admin's pages link the same file."""
    response = HttpResponse(_favicon(), content_type="image/x-icon")
    response["Cache-Control"] = "public, max-age=86400"
    return response


admin.site.site_header = admin.site.site_title = "tokenmgr"
admin.site.site_url = "/api/docs/"

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("favicon.ico", favicon, name="favicon"),
    path("admin/live/", include("reporting.pages")),  # before the admin's catch-all
    path("admin/provenance/", include("provenance.pages")),  # before the admin's catch-all
    path("admin/reports/", include("reporting.reports_pages")),  # before the admin's catch-all
    path("admin/", admin.site.urls),
    path("api/v1/", include("usage.urls")),
    path("api/v1/", include("reporting.urls")),
    path("api/v1/", include("budgets.urls")),
    path("api/v1/", include("provenance.urls")),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", DocsView.as_view(url_name="schema"), name="api-docs"),
    re_path(r"^api(?:/(?P<rest>.*))?$", api_not_found),  # last: what no route above matched
]
