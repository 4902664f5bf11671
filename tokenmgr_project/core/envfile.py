"""`<data dir>/effective.env`: the settings `manage.py up` started the system with.

`up` writes every tokenmgr variable that was set in its environment; `manage.py` (any other
command) reads the file before Django loads its settings and takes from it each variable that is
not set in its own environment. So `manage.py apikey create` in a second terminal writes to the
database the server reads, and a variable set explicitly (even to the empty string) still wins.

Shell syntax (`NAME='value'`), so `set -a; . var/effective.env` also works. Mode 0600: it may hold
SECRET_KEY and the database password, like the environment it was copied from.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from pathlib import Path

FILENAME = "effective.env"
# The same default as settings.DATA_DIR (the checkout's var/).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "var"


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    scheme, sep, userinfo = head.partition("://")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{tail}"


def envfile_path(environ: Mapping[str, str]) -> Path:
    """Where the file is for a process with this environment: in its data directory."""
    return Path(environ.get("TOKENMGR_DATA_DIR") or DEFAULT_DATA_DIR) / FILENAME


def envfile_write(path: Path, values: Mapping[str, str]) -> None:
    """Replace the file at once (readers never see half of it), readable by its owner only."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"# Written by `manage.py up` at {stamp}: the variables it was started with.",
        "# manage.py reads each one that is not set in its own environment (an explicit one wins).",
        *(f"{name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(lines) + "\n")
    partial.replace(path)


def envfile_read(path: Path) -> dict[str, str]:
    """The file's variables; none when there is no file. OSError when it cannot be read."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    values = {}
    for line in text.splitlines():
        name, equals, quoted = line.partition("=")
        if line.startswith("#") or not equals:
            continue
        words = shlex.split(quoted)
        values[name.strip()] = words[0] if words else ""
    return values


def envfile_apply(environ: MutableMapping[str, str]) -> list[str]:
    """Set in `environ` each of the file's variables it lacks; returns their names."""
    applied = []
    for name, value in envfile_read(envfile_path(environ)).items():
        if name not in environ:
            environ[name] = value
            applied.append(name)
    return applied
