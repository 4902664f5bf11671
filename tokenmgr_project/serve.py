"""One ASGI server process on a SO_REUSEPORT socket: `python -m tokenmgr_project.serve HOST PORT`.

`manage.py up` starts one of these per worker instead of `uvicorn --workers N`. uvicorn's workers
share one listening socket and whichever is awake accepts: under load one process took 31 of 32
keep-alive connections while the other idled, halving throughput and tripling p99. With a socket
per process and SO_REUSEPORT the kernel spreads new connections across the processes.
"""

from __future__ import annotations

import socket
import sys

import uvicorn


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
        access_log=False,
        log_level=log_level,
    )
    uvicorn.Server(config).run(sockets=[listening_socket(host, port)])


if __name__ == "__main__":
    main(sys.argv[1:])
