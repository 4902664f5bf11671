"""Websocket routes."""

from django.urls import URLPattern, re_path

from reporting.consumers import DashboardConsumer, StatusConsumer

websocket_urlpatterns: list[URLPattern] = [
    re_path(r"^ws/status/(?P<conversation_id>.{1,128})/$", StatusConsumer.as_asgi()),
    re_path(r"^ws/dashboard/$", DashboardConsumer.as_asgi()),
]
