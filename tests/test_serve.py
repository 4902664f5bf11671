"""The server process's HTTP protocol: a response's head goes out with its body, in one write."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from websockets.sync.client import connect

from tokenmgr_project.serve import HeadWithBody, HttpProtocol

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return "close" in self.events or "abort" in self.events

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")

    def write_eof(self) -> None:
        self.events.append("eof")

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _turn(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def test_a_head_and_its_body_are_one_write(loop: asyncio.AbstractEventLoop) -> None:
    raw = Recorder()
    transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    assert raw.writes == []
    transport.write(b"ok")
    assert raw.writes == [HEAD + b"ok"]
    _turn(loop)
    assert raw.writes == [HEAD + b"ok"]  # the scheduled flush finds nothing left


def test_a_head_with_nothing_after_it_goes_out_on_the_next_turn(
    loop: asyncio.AbstractEventLoop,
) -> None:
    raw = Recorder()
    transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
    transport.write(HEAD)  # a HEAD request's response: no body follows
    _turn(loop)
    assert raw.writes == [HEAD]


def test_interim_responses_and_other_writes_are_not_held(loop: asyncio.AbstractEventLoop) -> None:
    raw = Recorder()
    transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transport.write(b"5\r\nhello\r\n")
    assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"5\r\nhello\r\n"]


def test_close_and_eof_send_a_held_head_first_and_abort_drops_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    for action, events in (("close", ["close"]), ("write_eof", ["eof"])):
        raw = Recorder()
        transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
        transport.write(HEAD)
        getattr(transport, action)()
        assert (raw.writes, raw.events) == ([HEAD], events)
    raw = Recorder()
    transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    transport.abort()
    _turn(loop)
    assert (raw.writes, raw.events) == ([], ["abort"])


def test_after_a_websocket_upgrade_writes_pass_straight_through(
    loop: asyncio.AbstractEventLoop,
) -> None:
    raw = Recorder()
    transport = HeadWithBody(raw, loop)  # type: ignore[arg-type]
    transport.set_protocol("ws")  # type: ignore[arg-type]
    transport.write(HEAD)
    assert (raw.writes, raw.protocol) == ([HEAD], "ws")
    assert transport.get_extra_info("peername") == "info:peername"


# --- a real server with this protocol ------------------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"].upper()})
        await send({"type": "websocket.close"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    start = {"type": "http.response.start", "status": 200, "headers": []}
    if scope["path"] == "/stream":
        await send(start)
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    answer = b"echo:" + body
    start["headers"] = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
    await send(start)
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
def server() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=HttpProtocol, log_level="error")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        threading.Event().wait(0.05)
    yield port
    instance.should_exit = True
    thread.join(10)


def test_a_real_server_answers_keep_alive_head_streamed_and_websocket_requests(
    server: int,
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    for i in range(3):  # one keep-alive connection
        connection.request("POST", "/echo", body=f"n{i}".encode())
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, f"echo:n{i}".encode())
    connection.request("HEAD", "/echo")
    response = connection.getresponse()
    assert (response.status, response.getheader("content-length"), response.read()) == (
        200,
        "5",
        b"",
    )
    connection.request("GET", "/stream")
    response = connection.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    assert response.read() == b"one,two,three"
    connection.request(
        "POST", "/echo", body=b"later", headers={"Expect": "100-continue", "Content-Length": "5"}
    )
    assert connection.getresponse().read() == b"echo:later"
    connection.close()
    with connect(f"ws://127.0.0.1:{server}/ws", open_timeout=10) as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=10) == "HELLO"
