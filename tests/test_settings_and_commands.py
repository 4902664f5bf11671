from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from usage.models import ApiKey

ROOT = Path(__file__).resolve().parents[1]
UNSET = "<unset>"  # as a value in _run(): the variable is removed


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`command` run in the checkout, in this environment changed by `env`."""
    environ = {**os.environ, **env}
    return subprocess.run(
        command,
        check=False,
        cwd=ROOT,
        env={k: v for k, v in environ.items() if v != UNSET},
        capture_output=True,
        text=True,
        timeout=60,
    )


MANAGE = [sys.executable, "manage.py", "check"]
# Every process that loads the settings: a management command, `up`, the server, Celery.
PROCESSES = {
    "manage.py": MANAGE,
    "up": [sys.executable, "manage.py", "up", "--port", "1"],
    "server": [sys.executable, "-m", "tokenmgr_project.serve", "127.0.0.1", "0"],
    "worker": [str(Path(sys.executable).parent / "celery"), "-A", "tokenmgr_project", "worker"],
}


def _says_only(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exited non-zero with exactly one line on stderr, which carries `message`."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"tokenmgr: configuration error: {message} (see .env.example)"
    ]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TOKENMGR_BUFFER_SIZE", "lots", "TOKENMGR_BUFFER_SIZE='lots' is not an integer"),
        ("TOKENMGR_FLUSH_INTERVAL", "abc", "TOKENMGR_FLUSH_INTERVAL='abc' is not a number"),
        ("TOKENMGR_FLUSH_INTERVAL", "0", "TOKENMGR_FLUSH_INTERVAL=0.0 is outside 0.5..3600"),
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean (use true/false)"),
        (
            "DATABASE_URL",
            "mysql://u:pw@x/y",
            "DATABASE_URL='mysql://u:***@x/y' is not a sqlite://, postgres://, postgresql://, "
            "pgsql:// URL",
        ),
        (
            "DATABASE_URL",
            "postgres://u:pw@db:five/x",
            "DATABASE_URL='postgres://u:***@db:five/x' is not a valid URL (Port could not be "
            "cast to integer value as 'five')",
        ),
        (
            "DATABASE_URL",
            "postgres://u@[::1/x",
            "DATABASE_URL='postgres://u@[::1/x' is not a valid URL (Invalid IPv6 URL)",
        ),
        ("REDIS_URL", "http://x", "REDIS_URL='http://x' is not a redis://, rediss://, unix:// URL"),
        (
            "REDIS_URL",
            "redis://:pw@x/zero",
            "REDIS_URL='redis://:***@x/zero': the database 'zero' is not a number",
        ),
        ("LOG_LEVEL", "loud", "LOG_LEVEL='loud' is not DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        (
            "TOKENMGR_BUFFER_VOLATILE_OK",
            "yes",
            "TOKENMGR_BUFFER_VOLATILE_OK='yes' must be true or false (true accepts losing "
            "acknowledged usage if a Redis without persistence crashes)",
        ),
    ],
)
def test_it_stops_on_a_bad_setting_with_one_line_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    _says_only(_run(MANAGE, SECRET_KEY="x", **{name: value}), message)


@pytest.mark.parametrize("process", PROCESSES)
def test_it_stops_every_process_on_a_bad_setting_with_one_line(process: str) -> None:
    result = _run(PROCESSES[process], TOKENMGR_FLUSH_INTERVAL="abc")
    _says_only(result, "TOKENMGR_FLUSH_INTERVAL='abc' is not a number")


def test_it_stops_a_real_database_without_a_secret_key_with_one_line() -> None:
    result = _run(
        MANAGE,
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/nowhere",
        SECRET_KEY=UNSET,
        DEBUG=UNSET,
    )
    _says_only(result, "SECRET_KEY must be set when DATABASE_URL points at PostgreSQL")


def test_it_stops_on_a_data_directory_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = _run(MANAGE, TOKENMGR_DATA_DIR=str(tmp_path / "file" / "var"))
    _says_only(
        result, f"TOKENMGR_DATA_DIR='{tmp_path}/file/var' cannot be created (Not a directory)"
    )


def test_it_names_a_bad_port_for_up() -> None:
    result = _run([sys.executable, "manage.py", "up"], TOKENMGR_PORT="eighty")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        == "CommandError: TOKENMGR_PORT='eighty' is not a port number (1..65535)"
    )


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
    with pytest.raises(CommandError, match="team_id"):
        call_command("apikey", "create", "--name", "bad", "--scope", "team")
    assert not ApiKey.objects.exists()
