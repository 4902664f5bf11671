"""The README's first command, for real: server, worker and beat on this pass's database."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from websockets.sync.client import connect

from tests.conftest import child_database_url
from usage import services
from usage.models import TokenUsage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.django_db(transaction=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _call(
    url: str, body: dict[str, Any] | None = None, key: str = ""
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_up_starts_the_whole_system_and_usage_reaches_the_ledger(tmp_path: Path) -> None:
    services.manager_config_update(flush_interval=1.0)
    _key, raw = services.api_key_create(name="e2e", scope="global")
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": child_database_url(), "TOKENMGR_DATA_DIR": str(tmp_path)}
    env["REDIS_URL"] = settings.REDIS_URL
    up = subprocess.Popen(
        [sys.executable, "manage.py", "up", "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, health = _call(f"{base}/health")
                break
            except OSError:
                time.sleep(0.3)
        else:
            up.terminate()
            pytest.fail(
                "the server never answered /api/v1/health: " + up.communicate(timeout=30)[0][-3000:]
            )
        assert (status, health["status"]) == (200, "ok")
        body = {
            "request_id": "e2e-1",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 5,
        }
        assert _call(f"{base}/usage", body, raw)[0] == 201
        deadline = time.monotonic() + 30  # buffered mode: beat and the worker flush it
        while (
            not TokenUsage.objects.filter(request_id="e2e-1").exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.3)
        listed = _call(f"{base}/usage", key=raw)[1]["results"]
        assert [r["request_id"] for r in listed] == ["e2e-1"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/static/admin/css/base.css", timeout=10
        ) as css:
            assert css.status == 200
        with connect(
            f"ws://127.0.0.1:{port}/ws/status/e2e-conv/",
            additional_headers={"Authorization": f"Bearer {raw}"},
            origin=f"http://127.0.0.1:{port}",  # AllowedHostsOriginValidator wants an Origin
            open_timeout=10,
        ) as websocket:
            status_body = {"conversation_id": "e2e-conv", "category": "progress", "message": "hi"}
            assert _call(f"{base}/status", status_body, raw)[0] == 202
            batch = json.loads(websocket.recv(timeout=10))
        assert (batch["category"], batch["messages"][0]["message"]) == ("progress", "hi")
    finally:
        up.send_signal(signal.SIGTERM)
        output = up.communicate(timeout=40)[0]
    assert up.returncode == 0, output
    assert "Admin:" in output
