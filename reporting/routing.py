"""Websocket routes. The live-status consumers (SPEC §8) are added here by that capability."""

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
