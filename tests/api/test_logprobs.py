"""Logprobs and logit_bias end to end through a real server, with the real `openai` and `ollama` clients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.server import running_server

MESSAGES = [{"role": "user", "content": "Which city is the capital of France?"}]
PROMPT = "The capital of France is"
# Greedy and no repetition penalty (Ollama's default is 1.1): the sampled token is then the raw top-1.
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=2) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)


def _token_id(base: str, text: str) -> int:
    tokens = httpx.post(base + "/api/tokenize", json={"model": "smollm2", "content": text}, timeout=60).json()["tokens"]
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]


def test_chat_logprobs_with_top_alternatives(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY
    )
    choice = answer.choices[0]
    entries = choice.logprobs.content
    end_token = 1 if choice.finish_reason == "stop" else 0  # counted in usage, but not part of the answer
    assert entries and len(entries) == answer.usage.completion_tokens - end_token
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(value <= 0 for value in values)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)

    plain = oai.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8, **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content  # asking for logprobs changes nothing


def test_streamed_chat_logprobs_match_the_whole_answer(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY
    )
    stream = oai.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, stream=True, **GREEDY
    )
    text, entries = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                entries.extend(chunk.choices[0].logprobs.content or ())
    assert text == whole.choices[0].message.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def test_completion_logprobs(oai: openai.OpenAI) -> None:
    answer = oai.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, logprobs=2, **GREEDY)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == choice.text
    offsets = [sum(len(token) for token in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value <= 0 and token in top and top[token] == pytest.approx(value)
        assert len(top) == 2 and max(top.values()) == pytest.approx(value)

    echoed = oai.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, logprobs=0, echo=True, **GREEDY)
    assert echoed.choices[0].logprobs.text_offset[0] == len(PROMPT)

    streamed = oai.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, logprobs=2, stream=True, **GREEDY)
    tokens, offsets_seen = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets_seen += chunk.choices[0].logprobs.text_offset
    assert tokens == logprobs.tokens and offsets_seen == logprobs.text_offset


def test_ollama_generate_logprobs(base: str) -> None:
    client = ollama.Client(host=base, timeout=120)
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 4}
    whole = client.generate(model="smollm2", prompt=PROMPT, raw=True, options=options, logprobs=True, top_logprobs=1)
    assert whole.logprobs and "".join(entry.token for entry in whole.logprobs) == whole.response
    assert all(entry.top_logprobs[0].token == entry.token for entry in whole.logprobs)
    chunks = list(
        client.generate(
            model="smollm2", prompt=PROMPT, raw=True, options=options, logprobs=True, top_logprobs=1, stream=True
        )
    )
    assert [e.token for chunk in chunks for e in chunk.logprobs or ()] == [e.token for e in whole.logprobs]


def test_logit_bias_bans_and_forces_tokens(base: str, oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=6, logprobs=True, **GREEDY)
    greedy_first = first.choices[0].logprobs.content[0].token
    banned = _token_id(base, greedy_first)
    other = oai.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=6, logprobs=True, logit_bias={str(banned): -100}, **GREEDY
    )
    assert other.choices[0].logprobs.content[0].token != greedy_first
    assert other.choices[0].message.content != first.choices[0].message.content

    forced = _token_id(base, " banana")
    answer = oai.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=3, logit_bias={str(forced): 100}, **GREEDY
    )
    assert "banana" in answer.choices[0].text
    sampled = oai.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=3, temperature=1.0, seed=7, logit_bias={str(forced): 100}
    )
    assert sampled.choices[0].text == " banana" * 3  # +100 wins even when sampling


@pytest.mark.parametrize(
    ("bias", "words"),
    [({"49152": 1}, "outside the vocabulary"), ({"5": 101}, "from -100 to 100"), ({"x": 1}, "logit_bias"), ([1], "")],
)
def test_logit_bias_is_validated(base: str, bias: Any, words: str) -> None:
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 2, "logit_bias": bias}
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


def test_top_logprobs_is_validated(base: str) -> None:
    for extra in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}, {"logprobs": "yes"}):
        body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 2, **extra}
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 400, extra
