"""manage.py apikey create|list|revoke — the shell interface onto the API key services."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokenmgr_project.core.errors import ApiError
from usage import services
from usage.models import ApiKey


class Command(BaseCommand):
    help = "Create, list or revoke API keys. A new key is printed once and never stored."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="verb", required=True)
        create = sub.add_parser("create", help="Create a key and print it once.")
        create.add_argument("--name", required=True)
        create.add_argument("--scope", choices=ApiKey.Scope.values, default=ApiKey.Scope.GLOBAL)
        create.add_argument("--team", default="")
        create.add_argument("--project", default="")
        create.add_argument("--quiet", action="store_true", help="Print only the key.")
        sub.add_parser("list", help="List keys (prefixes only).")
        revoke = sub.add_parser("revoke", help="Revoke a key by id or prefix.")
        revoke.add_argument("key")

    def handle(self, *args: Any, **options: Any) -> None:
        verb = options["verb"]
        if verb == "create":
            try:
                key, raw = services.api_key_create(
                    name=options["name"],
                    scope=options["scope"],
                    team_id=options["team"],
                    project_id=options["project"],
                )
            except ApiError as exc:
                raise CommandError(f"{exc.message} {exc.fields}") from None
            if options["quiet"]:
                self.stdout.write(raw)
            else:
                self.stdout.write(
                    f"Created key #{key.pk} {key.name} ({key.scope_label}). "
                    "Copy it now; it is not shown again:"
                )
                self.stdout.write(raw)
        elif verb == "list":
            for key in ApiKey.objects.order_by("pk"):
                state = "active" if key.is_active else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
                self.stdout.write(
                    f"#{key.pk}\t{key.prefix}…\t{key.scope_label}\t{key.name}\t{state}"
                )
        else:
            ref = options["key"]
            found = (
                ApiKey.objects.filter(pk=int(ref))
                if ref.isdigit()
                else ApiKey.objects.filter(prefix__startswith=ref)
            )
            if found.count() != 1:
                raise CommandError(f"No single key matches {ref!r}.")
            services.api_key_revoke(key=found.get())
            self.stdout.write(f"Revoked {ref}.")
