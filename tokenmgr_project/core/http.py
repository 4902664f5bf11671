"""ASGI → WSGI for Django's HTTP side, with a single thread hop per request.

Why not Django's ASGI handler: it runs every sync request in a thread made for that request, so
persistent database connections are never reused (each request opened, and leaked, a PostgreSQL
session) and the thread churn cost most of the CPU. Our views are all sync (DRF). `WsgiBridge`
reads the body on the event loop, runs the WSGI call in a fixed pool of threads (each keeping
its database connection) and sends the response: whole, or for a streaming response
(StreamingHttpResponse: exports) chunk by chunk as the view yields them.
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from a2wsgi.wsgi import build_environ
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder

from tokenmgr_project.core.errors import body_too_large_error

Message = dict[str, Any]
Headers = list[tuple[bytes, bytes]]
# Chunks a streaming response may run ahead of a slow client before its thread waits.
STREAM_QUEUE_CHUNKS = 16
_END = object()
_ENCODER = DjangoJSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _headers(headers: list[tuple[str, str]]) -> Headers:
    return [(k.lower().encode("latin1"), v.encode("latin1")) for k, v in headers]


class WsgiBridge:
    def __init__(self, wsgi_app: Any, threads: int) -> None:
        self.wsgi_app = wsgi_app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")

    def _call(
        self, environ: dict[str, Any], stream: tuple[asyncio.AbstractEventLoop, Any] | None
    ) -> tuple[int, Headers, bytes | None]:
        """Run the WSGI app. A whole response: (status, headers, body). A streaming one is put
        on `stream`'s queue instead: (status, headers) first, then its chunks, then _END, all
        from this thread (a view's database cursor must stay on the thread that opened it)."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return lambda data: None

        result = self.wsgi_app(environ, start_response)
        try:
            if not getattr(result, "streaming", False) or stream is None:
                body = b"".join(result)
                return int(started[0].split(" ", 1)[0]), _headers(started[1]), body
            loop, queue = stream

            def put(item: Any) -> None:
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

            put((int(started[0].split(" ", 1)[0]), _headers(started[1])))
            try:
                for chunk in result:
                    if chunk:
                        put(chunk)
            finally:
                put(_END)
            return 0, [], None
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        request_body = await read_body(receive, send)
        if request_body is None:
            return
        environ: dict[str, Any] = dict(build_environ(scope, io.BytesIO(request_body)))  # type: ignore[arg-type]
        # Chunked uploads carry no Content-Length, and Django reads exactly that many bytes.
        environ["CONTENT_LENGTH"] = str(len(request_body))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_QUEUE_CHUNKS)
        call = loop.run_in_executor(self.executor, self._call, environ, (loop, queue))
        getter = asyncio.ensure_future(queue.get())
        done, _pending = await asyncio.wait({call, getter}, return_when=asyncio.FIRST_COMPLETED)
        if call in done and getter not in done:
            getter.cancel()
            status, headers, body = call.result()
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body or b""})
            return
        status, headers = getter.result()
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            while (chunk := await queue.get()) is not _END:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except BaseException:
            # The client went away: let the view's thread run to its end rather than wait
            # forever on a full queue.
            while await queue.get() is not _END:
                pass
            raise
        finally:
            await asyncio.shield(call)


async def read_body(receive: Any, send: Any) -> bytes | None:
    """The whole request body, or None: the client left, or the body passed
    DATA_UPLOAD_MAX_MEMORY_SIZE (answered 413 before buffering an unbounded upload)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            await _too_large(send)
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


async def _too_large(send: Any) -> None:
    error = body_too_large_error()
    body = _ENCODER.encode(error.body()).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
