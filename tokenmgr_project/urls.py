from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.defaults import page_not_found
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """An API client gets the JSON error shape for a URL that matches no route (an id that is
    not a number, say); people get the usual page."""
    if request.path.startswith("/api/"):
        body = {"error": {"code": "not_found", "message": "Not found.", "fields": {}}}
        return JsonResponse(body, status=404)
    return page_not_found(request, exception)


handler404 = not_found

admin.site.site_header = admin.site.site_title = "tokenmgr"
admin.site.site_url = "/api/docs/"

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/v1/", include("usage.urls")),
    path("api/v1/", include("reporting.urls")),
    path("api/v1/", include("budgets.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]
