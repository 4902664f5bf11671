"""The site's icon: /favicon.ico answers (browsers ask for it on every page, the API docs too)
and every admin page links it, so no page logs `Not Found: /favicon.ico`."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import Persona

pytestmark = pytest.mark.django_db

ICO_HEADER = b"\x00\x00\x01\x00"  # reserved 0, type 1 (icon)


def test_it_answers_favicon_ico_with_an_icon(client: Client) -> None:
    response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/x-icon"
    assert response.content.startswith(ICO_HEADER)
    assert "max-age" in response["Cache-Control"]


@pytest.mark.parametrize("path", ["/admin/login/", "/admin/", "/admin/usage/tokenusage/"])
def test_it_links_the_icon_from_admin_pages(client: Client, admin: Persona, path: str) -> None:
    visitor = admin.client if path != "/admin/login/" else client
    page = visitor.get(path).content.decode()
    assert '<link rel="icon" href="/favicon.ico"' in page
