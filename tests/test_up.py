"""The README's first command, for real: server, worker and beat on this pass's database."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from websockets.sync.client import connect

from tests.conftest import child_database_url
from tests.processes import ROOT, RedisServer, Up
from usage import services
from usage.models import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {"DATABASE_URL": child_database_url(), "TOKENMGR_DATA_DIR": str(tmp_path)}
    env["REDIS_URL"] = settings.REDIS_URL
    return env


def test_up_starts_the_whole_system_and_usage_reaches_the_ledger(tmp_path: Path) -> None:
    services.manager_config_update(flush_interval=1.0)
    _key, raw = services.api_key_create(name="e2e", scope="global")
    up = Up(_env(tmp_path), "--workers", "1")
    try:
        up.wait_healthy()
        body = {
            "request_id": "e2e-1",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 5,
        }
        assert up.api("usage", body, raw)[0] == 201
        deadline = time.monotonic() + 30  # buffered mode: beat and the worker flush it
        while (
            not TokenUsage.objects.filter(request_id="e2e-1").exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.3)
        listed = up.api("usage", key=raw)[1]["results"]
        assert [r["request_id"] for r in listed] == ["e2e-1"]
        with urllib.request.urlopen(f"{up.base}/static/admin/css/base.css", timeout=10) as css:
            assert css.status == 200
        with connect(
            f"ws://127.0.0.1:{up.port}/ws/status/e2e-conv/",
            additional_headers={"Authorization": f"Bearer {raw}"},
            origin=up.base,  # AllowedHostsOriginValidator wants an Origin
            open_timeout=10,
        ) as websocket:
            status_body = {"conversation_id": "e2e-conv", "category": "progress", "message": "hi"}
            assert up.api("status", status_body, raw)[0] == 202
            batch = json.loads(websocket.recv(timeout=10))
        assert (batch["category"], batch["messages"][0]["message"]) == ("progress", "hi")
    finally:
        code = up.stop()
    assert code == 0, up.output()
    assert "Admin:" in up.output()
    assert "No hostname was supplied" not in up.output()  # kombu, on a broker URL without one


def test_it_prints_commands_that_act_on_the_running_system_from_another_terminal(
    tmp_path: Path,
) -> None:
    up = Up({**_env(tmp_path), "SECRET_KEY": "only-up-was-given-this"}, "--workers", "1")
    try:
        up.wait_healthy()
        banner = up.output()
        command = re.search(r"  API key:  (.+ apikey create --name me)   \(", banner)
        assert command, banner
        assert f"  Login:    {command[1].split(' apikey ')[0]} createsuperuser" in banner
        # A second terminal knows none of the variables up was started with.
        second = {
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "TOKENMGR_DATA_DIR"}
        }
        done = subprocess.run(
            f"{command[1]} --quiet",
            shell=True,
            cwd=ROOT,
            env=second,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        body = {"request_id": "second-terminal", "model": "gpt-4o", "input_tokens": 1}
        assert up.api("usage", body, done.stdout.strip())[0] == 201
    finally:
        code = up.stop()
    assert code == 0, up.output()
    said = re.search(r"takes (.*?) from", " ".join(banner.split()))
    assert said, banner
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY"):
        assert name in said[1].split(", ")
        assert name in done.stderr  # manage.py says where it took them from
    assert (tmp_path / "effective.env").stat().st_mode & 0o777 == 0o600  # it holds the secret


def test_it_restarts_a_crashed_child_and_stops_only_when_asked(tmp_path: Path) -> None:
    up = Up(_env(tmp_path), "--workers", "1")
    try:
        up.wait_healthy()
        crashed = {
            name: up.child(word) for name, word in [("beat", " beat "), ("server-1", "serve")]
        }
        for pid in crashed.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(re.findall(r"up: restarted ", up.output())) < 2:
            time.sleep(0.2)
        output = up.output()
        for name in crashed:
            assert re.search(
                rf"up: {name} exited with code -9 after .*; restarting it in 1 s", output
            )
            assert f"up: restarted {name} " in output, output[-3000:]
        assert up.process.poll() is None  # a crash never stops the whole system
        up.wait_healthy(30)  # the server is back on the same port
        again = up.child(" beat ")
        assert again != crashed["beat"]
        os.kill(again, signal.SIGKILL)  # crashing again soon: the backoff doubles
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "restarting it in 2 s" not in up.output():
            time.sleep(0.2)
        assert re.search(
            r"up: beat exited with code -9 after .*; restarting it in 2 s", up.output()
        )
    finally:
        code = up.stop()
    assert code == 0, up.output()
    assert "stopping everything" in up.output()


@pytest.mark.services
@pytest.mark.parametrize(
    ("appendonly", "volatile_ok", "says"),
    [
        (True, "false", "Redis persistence: appendonly yes, appendfsync everysec"),
        (
            False,
            "false",
            "WARNING: Redis does not persist (appendonly no, appendfsync everysec): "
            "usage is NOT buffered",
        ),
        (
            False,
            "true",
            "WARNING: Redis does not persist (appendonly no, appendfsync everysec) and "
            "TOKENMGR_BUFFER_VOLATILE_OK=true accepts the risk",
        ),
    ],
    ids=["aof-on", "volatile", "volatile-accepted"],
)
def test_it_says_at_start_up_whether_the_buffer_survives_a_redis_crash(
    tmp_path: Path, appendonly: bool, volatile_ok: str, says: str
) -> None:
    server = RedisServer(tmp_path, appendonly=appendonly)
    server.start()
    with socket.socket() as taken:  # an occupied port: up stops right after its checks
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **_env(tmp_path),
            "REDIS_URL": server.url(),
            "TOKENMGR_BUFFER_VOLATILE_OK": volatile_ok,
        }
        try:
            done = subprocess.run(
                [sys.executable, "manage.py", "up", "--port", str(taken.getsockname()[1])],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            server.stop()
    assert done.returncode == 1
    assert says in done.stderr, done.stderr
