"""One ASGI server process on a SO_REUSEPORT socket: `python -m tokenmgr_project.serve HOST PORT`.

`manage.py up` starts one of these per worker instead of `uvicorn --workers N`. uvicorn's workers
share one listening socket and whichever is awake accepts: under load one process took 31 of 32
keep-alive connections while the other idled, halving throughput and tripling p99. With a socket
per process and SO_REUSEPORT the kernel spreads new connections across the processes.

Each connection's transport also sends a response's head and body in one write (see
`HeadWithBody`).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadWithBody:
    """A connection's transport that sends an HTTP response's head together with what follows.

    uvicorn writes the head when the app sends `http.response.start` and the body at
    `http.response.body`: two send() calls, two TCP segments and two wake-ups of the client per
    response (~8% of a budget check's server CPU). Here a final head (not a 1xx) waits for the
    next write, which normally comes at once, in the same step of the same task; if none does,
    it goes out on the event loop's next turn. Close and write_eof send it first. Once uvicorn
    hands the connection to a websocket protocol (set_protocol), writes pass straight through.
    """

    __slots__ = ("_direct", "_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head = b""
        self._direct = False

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        elif (
            not self._direct
            and data.startswith(b"HTTP/1.1 ")
            and not data.startswith(b"HTTP/1.1 1")
            and data.endswith(b"\r\n\r\n")
        ):
            self._head = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            if not self._transport.is_closing():
                self._transport.write(head)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._transport.writelines(lines)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = b""
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._direct = True
        self._transport.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `HeadWithBody` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> None:
    host, port = argv[0], int(argv[1])
    log_level = argv[2] if len(argv) > 2 else "info"
    config = uvicorn.Config(
        "tokenmgr_project.asgi:application",
        host=host,
        port=port,
        interface="asgi3",
        http=HttpProtocol,
        access_log=False,
        log_level=log_level,
    )
    uvicorn.Server(config).run(sockets=[listening_socket(host, port)])


if __name__ == "__main__":
    main(sys.argv[1:])
