"""The reference the single-request benchmarks are judged against: a bare uvicorn JSON endpoint
(no Django, no database, no Redis) on the same machine, in the same run.

It reads the whole body, parses it as JSON and answers what tokenmgr answers, canned and the
same size: `POST /api/v1/usage` -> 201 with a usage result, `POST /api/v1/budgets/check` -> 200
with an allowed check over four budgets and a reservation id (the shape bench/budget_check.lua
accepts). So the distance between this and tokenmgr is what tokenmgr itself costs, and machine
drift between days cancels out.

    python bench/_bare_app.py HOST PORT      # one process on an SO_REUSEPORT socket, as serve.py
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import uvicorn

_BUDGET = (
    '{"id":%d,"name":"b%d","scope":"team","scope_id":"search","enforcement":"hard",'
    '"cost_limit":"1000000","cost_remaining":"999999.99","cost_percent_after":0.0,'
    '"token_limit":null,"period_start":"2026-12-01T00:00:00+00:00",'
    '"period_end":"2027-01-01T00:00:00+00:00"}'
)
_CHECK = (
    '{"allowed":true,"blocking_budget":null,"warnings":[],"estimated_cost":"0.0003",'
    '"estimated_tokens":1200,"reservation_id":"rsv_0123456789abcdefghijkl","budgets":['
    + ",".join(_BUDGET % (i, i) for i in range(1, 5))
    + "]}"
).encode()
_HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    try:
        data = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        data = {}
    if scope["method"] != "POST":
        status, body = 200, b'{"status":"ok"}'  # the harness's readiness probe
    elif scope["path"].endswith("/budgets/check"):
        status, body = 200, _CHECK
    else:
        rid = data.get("request_id", "") if isinstance(data, dict) else ""
        status = 201
        body = json.dumps(
            {"request_id": rid, "duplicate": False, "cost": "0.000027", "currency": "USD"},
            separators=(",", ":"),
        ).encode()
    headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> None:
    host, port = argv[0], int(argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    config = uvicorn.Config(
        app, interface="asgi3", http="httptools", loop="uvloop", access_log=False,
        log_level="warning", lifespan="off",
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
