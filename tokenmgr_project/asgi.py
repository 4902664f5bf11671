"""The composition root's ASGI application (SPEC §3): one server for both protocols.

HTTP: the hot path (core.hotpath: Bearer JSON POSTs to the views marked fast) in front of
Django's WSGI handler on a fixed thread pool (core.http.WsgiBridge). Websockets: Channels
consumers. Lifespan: the status broadcaster in the embedded default (no Redis).
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")
get_asgi_application()  # sets up Django (and every app's ready()) before the routes import

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

from reporting.broadcaster import StatusBroadcaster  # noqa: E402
from reporting.publisher import publisher  # noqa: E402
from reporting.routing import websocket_urlpatterns  # noqa: E402
from tokenmgr_project.core import warmup  # noqa: E402
from tokenmgr_project.core.hotpath import HotPath  # noqa: E402
from tokenmgr_project.core.http import WsgiBridge  # noqa: E402

Message = dict[str, Any]


class Lifespan:
    """Embedded default (no Redis): the status broadcaster runs in this server process, the
    only place the in-process channel layer reaches. With Redis it is its own process."""

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        stop = asyncio.Event()
        task: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not settings.REDIS_URL:
                    # This process's publisher hands its events to the broadcaster directly.
                    publisher.taken_locally = True
                    task = asyncio.create_task(StatusBroadcaster().run(stop))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                stop.set()
                if task is not None:
                    await task
                await send({"type": "lifespan.shutdown.complete"})
                return


def _warm_up_and_freeze() -> None:
    """Run the apps' warm-up steps (the usage app loads the price catalogue), then take
    everything loaded so far out of the garbage collector's sight: a full collection over
    Django, DRF and the catalogue took ~65 ms, a stall for whichever request triggered it.
    Young-generation collections are made rarer: a batch of 1,000 events allocates ~50,000
    objects, which triggered ~70 of them per batch (about 6 % of a server's CPU under batch
    ingestion, bench/ingest_batch.py --provenance); older generations are still collected."""
    warmup.run()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


bridge = WsgiBridge(get_wsgi_application(), threads=settings.TOKENMGR_HTTP_THREADS)
http = HotPath(bridge, bridge.executor)
application = ProtocolTypeRouter(
    {
        "http": http,
        "lifespan": Lifespan(),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
_warm_up_and_freeze()
