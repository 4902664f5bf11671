from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from usage.models import ApiKey

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TOKENMGR_BUFFER_SIZE", "lots", "TOKENMGR_BUFFER_SIZE='lots' is not an integer"),
        ("TOKENMGR_FLUSH_INTERVAL", "0", "TOKENMGR_FLUSH_INTERVAL=0.0 is outside"),
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("DATABASE_URL", "mysql://x/y", "is not sqlite or postgres"),
        ("REDIS_URL", "http://x", "is not a redis:// URL"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    env = {**os.environ, name: value, "SECRET_KEY": "x"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_a_real_database_needs_a_secret_key() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG")}
    env["DATABASE_URL"] = "postgres://postgres@127.0.0.1:5432/nowhere"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SECRET_KEY must be set when DATABASE_URL points at PostgreSQL" in result.stderr


@pytest.mark.django_db
def test_the_apikey_command_prints_a_key_once_and_can_revoke_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    call_command(
        "apikey", "create", "--name", "cli", "--scope", "team", "--team", "search", "--quiet"
    )
    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get(name="cli")
    assert key.key_hash == ApiKey.hash_key(raw)
    call_command("apikey", "revoke", str(key.pk))
    key.refresh_from_db()
    assert key.revoked_at is not None


@pytest.mark.django_db
def test_the_apikey_command_refuses_a_team_key_without_a_team() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="team_id"):
        call_command("apikey", "create", "--name", "bad", "--scope", "team")
    assert not ApiKey.objects.exists()
