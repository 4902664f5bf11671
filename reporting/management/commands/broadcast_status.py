"""manage.py broadcast_status — the live-status broadcaster process (used with Redis)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand

from reporting.broadcaster import StatusBroadcaster


class Command(BaseCommand):
    help = "Push queued status messages to websocket clients in batches until stopped."

    def handle(self, *args: Any, **options: Any) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await StatusBroadcaster().run(stop)

        asyncio.run(main())
