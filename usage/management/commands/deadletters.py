"""manage.py deadletters list|replay|discard — the shell interface onto the flush's dead letters
(ledger lines the database refused, parked in Redis; also in /health and the admin)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokenmgr_project.core import redis as tm_redis
from tokenmgr_project.core.errors import ApiError
from usage import selectors, services


class Command(BaseCommand):
    help = "List, replay (insert again, if absent) or discard usage lines the flush parked."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="verb", required=True)
        listing = sub.add_parser("list", help="Parked lines, oldest first.")
        listing.add_argument("--limit", type=int, default=100)
        for verb, text in (
            ("replay", "Insert again; those the database now accepts leave the list."),
            ("discard", "Drop for good."),
        ):
            cmd = sub.add_parser(verb, help=text)
            cmd.add_argument("ids", nargs="*", help="Dead letter ids (see list).")
            if verb == "replay":
                cmd.add_argument("--all", action="store_true", help="Every parked line.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not tm_redis.configured():
            raise CommandError("No REDIS_URL: without the buffer there are no dead letters.")
        verb = options["verb"]
        try:
            if verb == "list":
                self._list(options["limit"])
            elif verb == "replay":
                self._replay(options["ids"], every=options["all"])
            else:
                if not options["ids"]:
                    raise CommandError("Name the dead letter ids to discard.")
                removed = services.usage_dead_letter_discard(ids=options["ids"])
                self.stdout.write(f"{removed} discarded")
        except ApiError as exc:
            raise CommandError(f"{exc.message} {exc.fields}") from None

    def _list(self, limit: int) -> None:
        letters = selectors.usage_dead_letters(limit=limit)
        for letter in letters:
            self.stdout.write(
                f"{letter.dead_id}\t{letter.parked_at}\t{letter.tenant}\t{letter.request_id}\t"
                f"{letter.error.splitlines()[0] if letter.error else ''}"
            )
        self.stdout.write(f"{len(letters)} dead letter(s)")

    def _replay(self, ids: list[str], *, every: bool) -> None:
        if not ids and not every:
            raise CommandError("Name the dead letter ids to replay, or pass --all.")
        result = services.usage_dead_letter_replay(ids=None if every else ids)
        for dead_id, error in result.failed.items():
            self.stderr.write(f"{dead_id}\tstill refused: {error.splitlines()[0]}")
        self.stdout.write(f"{len(result.replayed)} replayed, {len(result.failed)} still refused")
