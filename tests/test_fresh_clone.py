"""What a newcomer runs first, before `bin/up` ever made anything: management commands, and the
settings `up` saves for the commands of other terminals (`<data dir>/effective.env`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tokenmgr_project.core.envfile import envfile_write

ROOT = Path(__file__).resolve().parents[1]
WHICH_DATABASE = [
    "shell",
    "--no-imports",
    "-c",
    "from django.conf import settings; print(settings.DATABASES['default']['NAME'])",
]


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """manage.py in the checkout, with no tokenmgr variable but those in `env`."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "TOKENMGR_DATA_DIR"}
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_it_migrates_into_a_data_directory_that_does_not_exist_yet(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet"
    done = _manage("migrate", TOKENMGR_DATA_DIR=str(data_dir))
    assert done.returncode == 0, done.stderr
    assert "Applying usage.0001_initial... OK" in done.stdout
    assert (data_dir / "tokenmgr.sqlite3").stat().st_size > 0


def test_it_takes_the_saved_settings_only_for_variables_not_set(tmp_path: Path) -> None:
    saved = f"sqlite:///{tmp_path / 'saved.sqlite3'}"
    envfile_write(tmp_path / "effective.env", {"DATABASE_URL": saved, "LOG_LEVEL": "WARNING"})
    from_file = _manage(*WHICH_DATABASE, TOKENMGR_DATA_DIR=str(tmp_path))
    assert from_file.stdout.strip() == str(tmp_path / "saved.sqlite3")
    assert f"manage.py: DATABASE_URL, LOG_LEVEL from {tmp_path}/effective.env" in from_file.stderr
    explicit = _manage(*WHICH_DATABASE, TOKENMGR_DATA_DIR=str(tmp_path), DATABASE_URL="")
    assert explicit.stdout.strip() == str(tmp_path / "tokenmgr.sqlite3")  # the default's
    assert "manage.py: LOG_LEVEL from" in explicit.stderr


def test_it_starts_up_on_its_own_environment_never_on_a_file_a_run_left(tmp_path: Path) -> None:
    envfile_write(tmp_path / "effective.env", {"REDIS_URL": "redis://127.0.0.1:1/0"})
    with socket.socket() as taken:  # an occupied port: up stops right after its checks
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = _manage("up", "--port", port, TOKENMGR_DATA_DIR=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == f"127.0.0.1:{port} is already in use."  # not Redis's absence
