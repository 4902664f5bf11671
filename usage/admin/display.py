"""How the admin shows things, in every app's admin: amounts as the API writes them
(usage.pricing.money: "0.027", "500"), moments narrow and sortable, long ids clipped so lists
fit a 1366 px screen; and forms that check through the services."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db import models, transaction
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from tokenmgr_project.core.errors import ApiError, FieldErrors
from usage import pricing

EMPTY = "-"  # the admin's own empty_value_display

# conversation id → the URL of its live feed; set by the app that serves the feeds (reporting
# registers it in ready()), so the usage admin links to it without importing it.
_conversation_url: Callable[[str], str] | None = None


def register_conversation_url(url_for: Callable[[str], str]) -> None:
    global _conversation_url
    _conversation_url = url_for


def conversation_link(conversation_id: str) -> SafeString | str:
    """A conversation id with a link to its live feed (when some app serves feeds)."""
    if not conversation_id:
        return EMPTY
    if _conversation_url is None:
        return conversation_id
    return format_html(
        '{} <a href="{}">live feed</a>', conversation_id, _conversation_url(conversation_id)
    )


# usage row pk → the URL of its lineage page, and workflow id → its workflow page; set by the app
# that draws them (provenance registers both in ready()), for the same reason.
_lineage_url: Callable[[int], str] | None = None
_workflow_url: Callable[[str], str] | None = None


def register_lineage_url(url_for: Callable[[int], str]) -> None:
    global _lineage_url
    _lineage_url = url_for


def register_workflow_url(url_for: Callable[[str], str]) -> None:
    global _workflow_url
    _workflow_url = url_for


def lineage_link(pk: int) -> SafeString | str:
    """A "Lineage" link to the drawing of a usage row's tree (when some app draws them)."""
    if _lineage_url is None:
        return EMPTY
    return format_html('<a href="{}">Lineage</a>', _lineage_url(pk))


def workflow_link(workflow_id: str) -> SafeString | str:
    """A workflow id with a link to its workflow page (when some app serves them)."""
    if not workflow_id:
        return EMPTY
    if _workflow_url is None:
        return workflow_id
    return format_html('{} <a href="{}">workflow</a>', workflow_id, _workflow_url(workflow_id))


def usd(value: Decimal | None) -> str:
    """An amount as the API writes it, with its currency: "0.027 USD", "500 USD"."""
    return EMPTY if value is None else f"{pricing.money(value)} {pricing.CURRENCY}"


def amount(value: Decimal | None) -> str:
    """An amount as the API writes it, for a column whose header names the unit."""
    return EMPTY if value is None else pricing.money(value)


def when(value: datetime | None, *, seconds: bool = False) -> str:
    """A moment in local time, sortable and narrow: "2026-12-01 11:56"."""
    if value is None:
        return EMPTY
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def clipped(text: str, length: int) -> SafeString:
    """Text cut to `length` characters for a list column, the whole of it in the tooltip. It may
    wrap anywhere (class tm-clip, admin.css): ids have no spaces to wrap at."""
    if len(text) <= length:
        return format_html('<span class="tm-clip">{}</span>', text)
    return format_html(
        '<span class="tm-clip" title="{}">{}</span>', text, Truncator(text).chars(length)
    )


class MoneyInput(forms.NumberInput):
    """A decimal input that shows its value as the API writes it ("500", not "500.000000")."""

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, Decimal):
            return pricing.money(value)
        return super().format_value(value)


MONEY_WIDGETS: dict[type[models.Field[Any, Any]], dict[str, Any]] = {
    models.DecimalField: {"widget": MoneyInput}
}


class _DryRun(Exception):
    """Raised to roll back a service call made only to learn its validation errors."""


def service_errors(call: Any) -> FieldErrors:
    """Run a service in a savepoint that is always rolled back and return its field errors, so a
    form shows the service's own rules in its words."""
    try:
        with transaction.atomic():
            call()
            raise _DryRun
    except _DryRun:
        return {}
    except ApiError as exc:
        return exc.fields or {"__all__": [exc.message]}


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the services only (the ledger, alerts, edges): shown, never edited."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
