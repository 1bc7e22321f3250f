"""The real `ollama` and `openai` clients and LangChain against a real ember server, unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.server import running_server

QUESTION = "Which city is the capital of France? Answer in one word."
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=4) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused")


def test_ollama_generate_and_chat_streamed_and_not(base: str) -> None:
    client = ollama.Client(host=base)
    whole = client.generate(model="smollm2", prompt=QUESTION, options={**GREEDY, "num_predict": 16})
    assert "Paris" in whole.response and whole.done and whole.eval_count > 0 and whole.prompt_eval_duration > 0
    streamed = list(
        client.generate(model="smollm2", prompt=QUESTION, options={**GREEDY, "num_predict": 16}, stream=True)
    )
    assert "".join(part.response for part in streamed) == whole.response and streamed[-1].done

    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat(model="smollm2", messages=messages, options={**GREEDY, "num_predict": 16})
    assert chat.message.role == "assistant" and "Paris" in chat.message.content
    parts = list(client.chat(model="smollm2", messages=messages, options={**GREEDY, "num_predict": 16}, stream=True))
    assert "".join(part.message.content for part in parts) == chat.message.content
    assert parts[-1].done_reason in ("stop", "length") and parts[-1].eval_count == chat.eval_count


def test_ollama_format_json_and_errors(base: str) -> None:
    client = ollama.Client(host=base)
    answer = client.generate(
        model="smollm2",
        prompt="Describe a cat as JSON with keys name and age.",
        format="json",
        options={**GREEDY, "num_predict": 200},
    )
    json.loads(answer.response)
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="no-such-model", prompt="x")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(model="smollm2", prompt="x", options={"top_p": 7})
    assert bad.value.status_code == 400 and "top_p" in str(bad.value)


def test_ollama_list_show_ps(base: str) -> None:
    client = ollama.Client(host=base)
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1}, keep_alive=-1)
    running = client.ps()
    assert [model.name for model in running.models] == ["smollm2:latest"]
    assert running.models[0].details.family == "llama"
    shown = client.show("smollm2")
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert "<|im_start|>" in shown.template
    assert isinstance(client.list().models, list)


def test_openai_chat_streamed_and_not_with_usage(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    assert text.strip() and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10
    chunks = list(
        oai.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_completions_stop_and_seed(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[", 8"])
    assert done.choices[0].text.startswith(" 5, 6, 7") and ", 8" not in done.choices[0].text
    assert done.choices[0].finish_reason == "stop"
    streamed = list(
        oai.completions.create(
            model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[", 8"], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    def sample(seed: int) -> str:
        result = oai.completions.create(
            model="smollm2", prompt="Once upon a time", max_tokens=20, temperature=1.0, seed=seed
        )
        return result.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_openai_n_two_and_json_schema(oai: openai.OpenAI) -> None:
    two = oai.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=3,
    )
    assert [choice.index for choice in two.choices] == [0, 1]
    assert all(choice.message.content for choice in two.choices)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    person = oai.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(person.choices[0].message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_openai_models_and_errors(oai: openai.OpenAI, fresh_home: Path) -> None:
    ids = [model.id for model in oai.models.list().data]
    assert ids == ["smollm2:latest"]  # a fresh home lists the default model
    assert oai.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smollm2", messages=[])


def test_langchain_chat_models_invoke_and_stream(base: str) -> None:
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    for chat in (
        ChatOllama(model="smollm2", base_url=base, temperature=0, num_predict=16),
        ChatOpenAI(model="smollm2", base_url=base + "/v1", api_key="unused", temperature=0, max_tokens=16),
    ):
        answer = chat.invoke(QUESTION)
        assert answer.content.strip()
        pieces = [chunk.content for chunk in chat.stream(QUESTION)]
        assert len(pieces) > 2 and "".join(pieces) == answer.content


def test_a_client_that_goes_away_frees_its_slot(base: str) -> None:
    body = {"model": "smollm2", "prompt": "Tell me a very long story.", "options": {"num_predict": 2000}}
    with httpx.stream("POST", base + "/api/generate", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            assert json.loads(next(lines))["done"] is False
        assert _slots_in_use(base) == 1
    deadline = time.monotonic() + 1.0  # a few engine steps of about 10 ms, plus the HTTP round trips
    while _slots_in_use(base) != 0:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)


def _slots_in_use(base: str) -> int:
    models = httpx.get(base + "/api/ps").json()["models"]
    return sum(model["ember"]["slots_in_use"] for model in models)
