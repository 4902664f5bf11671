from __future__ import annotations

import socket
from pathlib import Path

import pytest
import tiktoken
from django.test import override_settings

from tests.conftest import Persona
from usage import tokenizer

pytestmark = pytest.mark.django_db


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_encodings_load_offline_from_the_wheel_with_tiktokens_hash_check(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer, "_encodings", {})
    with override_settings(TIKTOKEN_CACHE_DIR=tmp_path):
        encoding = tokenizer.get_encoding("o200k_base")
    assert encoding.encode("hello world") == [24912, 2375]
    assert len(list(tmp_path.iterdir())) == len(tokenizer.VOCABULARIES)


def test_a_tampered_vocabulary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "_wheel_vocabulary", lambda name: b"tampered")
    with pytest.raises(tokenizer.VocabularyError, match="SHA-256"):
        tokenizer.seed_cache(tmp_path)


@pytest.mark.parametrize(
    ("model", "encoding", "estimated"),
    [
        ("gpt-4o", "o200k_base", False),
        ("gpt-4.1-mini", "o200k_base", False),
        ("o3", "o200k_base", False),
        ("gpt-5", "o200k_base", False),
        ("gpt-4", "cl100k_base", False),
        ("gpt-3.5-turbo", "cl100k_base", False),
        ("claude-sonnet-4-5", "o200k_base", True),
        ("llama3", "o200k_base", True),
    ],
)
def test_models_map_to_their_encoding(model: str, encoding: str, estimated: bool) -> None:
    choice = tokenizer.encoding_for_model(model)
    assert (choice.name, choice.estimated) == (encoding, estimated)


def test_tokenize_counts_text_like_tiktoken(platform: Persona) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    body = platform.client.post(
        "/api/v1/tokenize", {"model": "gpt-4", "text": text}, format="json"
    ).json()
    assert body["tokens"] == len(tiktoken.get_encoding("cl100k_base").encode(text))
    assert (body["encoding"], body["estimated"]) == ("cl100k_base", False)


def test_tokenize_counts_chat_messages_with_framing(platform: Persona) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world"},
    ]
    body = platform.client.post(
        "/api/v1/tokenize", {"model": "gpt-4o", "messages": messages}, format="json"
    )
    enc = tiktoken.get_encoding("o200k_base")
    content = sum(len(enc.encode(v)) for m in messages for v in m.values())
    assert body.json()["tokens"] == content + 3 * len(messages) + 3


def test_tokenize_labels_other_providers_as_estimates(platform: Persona) -> None:
    body = platform.client.post(
        "/api/v1/tokenize", {"model": "claude-opus-4", "text": "hi"}, format="json"
    )
    assert body.json()["estimated"] is True


def test_truncate_cuts_on_a_token_boundary_without_splitting_characters(platform: Persona) -> None:
    text = "naïve café — 東京タワー 🗼 " * 30
    for max_tokens in (1, 5, 17, 40):
        body = platform.client.post(
            "/api/v1/truncate",
            {"model": "gpt-4o", "text": text, "max_tokens": max_tokens},
            format="json",
        ).json()
        assert body["truncated"] is True
        assert body["tokens"] <= max_tokens
        assert text.startswith(body["text"])
        enc = tiktoken.get_encoding("o200k_base")
        assert len(enc.encode(body["text"])) <= max_tokens


def test_truncate_leaves_short_text_alone(platform: Persona) -> None:
    body = platform.client.post(
        "/api/v1/truncate", {"model": "gpt-4o", "text": "short", "max_tokens": 100}, format="json"
    ).json()
    assert (body["text"], body["truncated"]) == ("short", False)


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/v1/tokenize", {"model": "gpt-4o"}, "text"),
        ("/api/v1/tokenize", {"text": 5}, "text"),
        ("/api/v1/truncate", {"text": "x", "max_tokens": -1}, "max_tokens"),
        ("/api/v1/truncate", {"text": "x"}, "max_tokens"),
    ],
)
def test_token_endpoints_reject_bad_input(
    platform: Persona, url: str, body: dict, field: str
) -> None:
    response = platform.client.post(url, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
