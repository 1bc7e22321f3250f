"""Embeddings end to end: Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings, real clients."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterator

import httpx
import numpy as np
import ollama
import openai
import pytest

from tests.server import running_server

TEXTS = ["The cat sat on the mat.", "Quarterly revenue rose by four percent.", "The cat sat on the mat."]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> ollama.Client:
    return ollama.Client(host=base, timeout=120)


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_embed_normalized_deterministic_and_distinct(client: ollama.Client) -> None:
    first = client.embed(model="smollm2", input=TEXTS)
    assert len(first.embeddings) == 3
    assert len({len(vector) for vector in first.embeddings}) == 1 and len(first.embeddings[0]) > 100
    for vector in first.embeddings:
        assert _norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert first.embeddings[0] == first.embeddings[2]  # a text and itself in one batch
    assert first.embeddings[0] != first.embeddings[1]
    assert first.prompt_eval_count > 0 and first.total_duration > 0
    again = client.embed(model="smollm2", input=TEXTS[0])
    assert again.embeddings == [first.embeddings[0]]  # the same text, another call, alone


def test_legacy_embeddings_are_not_normalized(client: ollama.Client) -> None:
    legacy = client.embeddings(model="smollm2", prompt=TEXTS[0]).embedding
    normalized = client.embed(model="smollm2", input=TEXTS[0]).embeddings[0]
    norm = _norm(legacy)
    assert norm != pytest.approx(1.0, abs=1e-3)
    assert [value / norm for value in legacy] == pytest.approx(normalized, abs=1e-6)
    assert client.embeddings(model="smollm2", prompt="").embedding == []  # only loads the model


def test_embed_truncates_or_refuses_an_over_long_input(base: str) -> None:
    long_text = "word " * 300
    body = {"model": "smollm2", "input": long_text, "options": {"num_ctx": 128}}
    refused = httpx.post(base + "/api/embed", json={**body, "truncate": False}, timeout=120)
    assert refused.status_code == 400
    message = refused.json()["error"]
    length = re.search(r"is (\d+) tokens", message)
    assert length and int(length.group(1)) > 128 and "num_ctx) is 128 tokens" in message and "truncate" in message
    cut = httpx.post(base + "/api/embed", json=body, timeout=120)
    assert cut.status_code == 200, cut.text
    assert cut.json()["prompt_eval_count"] == 128 and len(cut.json()["embeddings"]) == 1


def test_openai_embeddings_float_and_base64(oai: openai.OpenAI, client: ollama.Client) -> None:
    floats = oai.embeddings.create(model="smollm2", input=TEXTS[:2], encoding_format="float")
    assert floats.object == "list" and [item.index for item in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    vectors = [item.embedding for item in floats.data]
    assert vectors[0] == client.embed(model="smollm2", input=TEXTS[0]).embeddings[0]

    # Asked for explicitly, base64 comes back as the raw string: little-endian float32.
    encoded = oai.embeddings.create(model="smollm2", input=TEXTS[:2], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4").tolist() for item in encoded.data]
    assert decoded == vectors
    # The client's default: it asks for base64 itself and decodes it.
    assert oai.embeddings.create(model="smollm2", input=TEXTS[0]).data[0].embedding == vectors[0]


def test_openai_embeddings_refuse_empty_input(base: str) -> None:
    for value in ("", [""], [], [[]], [[1, 2], []]):  # token ids are taken: see test_compat.py
        response = httpx.post(base + "/v1/embeddings", json={"model": "smollm2", "input": value}, timeout=60)
        assert response.status_code == 400, value
        assert response.json()["error"]["type"] == "invalid_request_error"
    bad_format = httpx.post(
        base + "/v1/embeddings", json={"model": "smollm2", "input": "x", "encoding_format": "int8"}, timeout=60
    )
    assert bad_format.status_code == 400 and "encoding_format" in bad_format.json()["error"]["message"]
