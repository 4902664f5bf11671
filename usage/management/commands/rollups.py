"""manage.py rollups rebuild|check — recompute the hourly rollups of a range from the ledger."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tokenmgr_project.core.errors import ApiError
from usage import rollups
from usage.selectors import parse_range


class Command(BaseCommand):
    help = (
        "Recompute the hourly rollups of [--since, --until) from the ledger and report every "
        "difference corrected. Default range: the last 7 days."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("verb", choices=("rebuild",))
        parser.add_argument("--since", help="ISO 8601 (default: 7 days before --until).")
        parser.add_argument("--until", help="ISO 8601 (default: now).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            since, until = parse_range({"since": options["since"], "until": options["until"]})
            until = until or timezone.now()
            since = since or until - timedelta(days=7)
            if since >= until:
                raise ApiError("Invalid time range.", fields={"since": ["Must be before until."]})
            results = rollups.rebuild(since=since, until=until)
        except ApiError as exc:
            detail = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.fields.items())
            raise CommandError(f"{exc.message} {detail}".strip()) from None
        self.stdout.write(f"Rebuilt {_hour(since)} to {_hour(until)} ({results[0].hours} hours).")
        for r in results:
            cost = rollups.units_to_money(r.cost_units_delta)
            self.stdout.write(
                f"{r.table}: {r.groups_changed} groups corrected, "
                f"requests {r.requests_delta:+d}, cost {cost:+f} USD"
            )


def _hour(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:00 UTC")
