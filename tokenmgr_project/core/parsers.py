"""The one way request input is read: JSON bodies (`load_json`, called by the hot path and by
DRF's `JsonParser`, REST_FRAMEWORK's only parser, so both refuse the same bodies with the same
words). Query values are read by core.api.query_text.

Kept apart from core.api: DRF imports its parser classes while it defines APIView.
"""

from __future__ import annotations

import json
from typing import Any

from rest_framework import exceptions, parsers

# Deeper JSON is refused (400 parse_error). Python's parser and encoder recurse per level: a body
# near the interpreter's recursion limit would parse here, then fail wherever it is encoded or
# decoded again (validation, the Redis buffer, the worker's flush). Real events nest a few levels.
MAX_JSON_DEPTH = 64
_CONTAINERS = (dict, list)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _deeper_than(value: Any, limit: int) -> bool:
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in _CONTAINERS
        ]
        if not level:
            return False
    return True


def _brackets(raw: bytes | str) -> int:
    if isinstance(raw, bytes):
        return raw.count(b"{") + raw.count(b"[")
    return raw.count("{") + raw.count("[")


def load_json(raw: bytes | str) -> Any:
    """The parsed body, or ParseError: not JSON, NaN/Infinity, or nested over MAX_JSON_DEPTH."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        too_deep = True
    except ValueError as exc:  # the same words as DRF's JSONParser
        raise exceptions.ParseError(f"JSON parse error - {exc}") from None
    else:
        # The number of brackets bounds the depth and costs almost nothing: only bodies with
        # many of them (batches) are walked.
        too_deep = _brackets(raw) > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH)
    if too_deep:
        raise exceptions.ParseError(
            f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels."
        )
    return data


class JsonParser(parsers.JSONParser):
    """DRF's JSON parser, reading through `load_json`."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        # DRF's charset handling (a bad charset is a ParseError); the stubs lack the function.
        encoding: str = parsers.get_encoding(parser_context or {})  # type: ignore[attr-defined]
        raw: bytes = stream.read()
        if encoding.lower().replace("-", "").replace("_", "") == "utf8":
            return load_json(raw)  # json detects UTF-8 in bytes itself
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        return load_json(text)
