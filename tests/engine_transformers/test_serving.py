"""The transformers engine behind a real `ember serve`: SmolLM2 as a model directory (converted from the
bundled GGUF), pulled into the server's store, answering the real ollama and openai clients and `ember run`,
compared with the llama.cpp engine on the same weights, batching concurrent requests, refusing what it lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ember.store.pull import pull
from ember.store.store import ModelStore
from tests.server import serve_subprocess

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
NAME = "smollm2-tf"
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "List three colors.")


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """One `ember serve` for the module, its store holding the directory (and, as a fresh home, smollm2)."""
    home = tmp_path_factory.mktemp("tf-server-home")
    pull(str(smollm2_dir), name=NAME, store=ModelStore(home / "models"))
    with serve_subprocess(env={"EMBER_HOME": str(home), "EMBER_NUM_PARALLEL": "4"}) as served:
        yield served


@pytest.fixture(scope="module")
def base(server: tuple[str, dict[str, str]]) -> str:
    return server[0]


def test_show_and_tags_tell_the_engine(base: str) -> None:
    shown = httpx.post(f"{base}/api/show", json={"model": NAME}, timeout=60).json()
    assert shown["ember"]["engine"] == "transformers" and shown["details"]["format"] == "safetensors"
    assert shown["details"]["family"] == "llama" and "im_start" in shown["template"]
    assert "model.safetensors" in shown["ember"]["files"] and shown["capabilities"] == ["completion"]
    tags = {model["name"]: model for model in httpx.get(f"{base}/api/tags", timeout=60).json()["models"]}
    assert tags[f"{NAME}:latest"]["details"]["format"] == "safetensors"
    assert tags["smollm2:latest"]["details"]["format"] == "gguf"


def test_ollama_chat_streamed_and_generate(base: str) -> None:
    client = ollama.Client(host=base, timeout=300)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    parts = list(client.chat(model=NAME, messages=messages, options={**GREEDY, "num_predict": 12}, stream=True))
    assert len(parts) > 2 and parts[-1].done and parts[-1].eval_count > 0 and parts[-1].prompt_eval_count > 10
    text = "".join(part.message.content for part in parts)
    assert "Paris" in text
    whole = client.generate(model=NAME, prompt=PROMPTS[0], options={**GREEDY, "num_predict": 12})
    assert whole.response == text and whole.done_reason in ("stop", "length")


def test_openai_chat_completions_streamed(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300)
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def test_stop_strings_seed_and_json_schema(base: str) -> None:
    client = ollama.Client(host=base, timeout=300)
    counted = client.generate(
        model=NAME, prompt="1, 2, 3, 4,", raw=True, options={**GREEDY, "num_predict": 20, "stop": ["7"]}
    )
    assert counted.done_reason == "stop" and "7" not in counted.response and "6" in counted.response
    sampled = [
        client.generate(
            model=NAME, prompt=PROMPTS[1], options={"temperature": 1.0, "seed": 7, "num_predict": 8}
        ).response
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    answer = client.generate(
        model=NAME, prompt="Give me a person as JSON.", format=schema, options={**GREEDY, "num_predict": 60}
    )
    person = json.loads(answer.response)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_unsupported_options_are_400s_naming_them(base: str) -> None:
    client = ollama.Client(host=base, timeout=300)
    for option in ({"mirostat": 2}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model=NAME, prompt="Hi", options=option)
        assert refused.value.status_code == 400 and next(iter(option)) in str(refused.value)
    with pytest.raises(ollama.ResponseError) as tools:
        client.chat(model=NAME, messages=[{"role": "user", "content": "Hi"}], tools=[_TOOL])
    assert tools.value.status_code == 400 and "tools" in str(tools.value)
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], presence_penalty=1.0)
    with pytest.raises(ollama.ResponseError) as embed:
        client.embed(model=NAME, input="Hi")
    assert embed.value.status_code == 400


_TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}


def _tokens(base: str, model: str, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, greedy answer tokens) from the final chunk's context."""
    final = httpx.post(
        f"{base}/api/generate",
        json={"model": model, "prompt": prompt, "stream": False, "options": {**GREEDY, "num_predict": n}},
        timeout=300,
    ).json()
    context = final["context"]
    return context[: len(context) - final["eval_count"]], context[len(context) - final["eval_count"] :]


def test_greedy_tokens_against_the_llama_cpp_engine(base: str, smollm2_dir: Path) -> None:
    """Same prompt tokens; the greedy answers agree up to the first place where transformers' two best tokens
    are nearly tied (Q4_1 weights with 8-bit activations in llama.cpp against the same weights dequantized to
    float32), and there llama.cpp's choice is one of transformers' best three, within half a logit of its best."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    for prompt in PROMPTS:
        ours, theirs = _tokens(base, NAME, prompt, 8), _tokens(base, "smollm2", prompt, 8)
        assert ours[0] == theirs[0], "both engines tokenize the templated prompt alike"
        same = next((i for i, (a, b) in enumerate(zip(ours[1], theirs[1], strict=False)) if a != b), None)
        if same is None:
            assert ours[1][:8] == theirs[1][:8]
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ours[0] + ours[1][:same]])).logits[0, -1]
        top = torch.topk(logits, 3)
        assert theirs[1][same] in top.indices.tolist()
        assert float(top.values[0] - logits[theirs[1][same]]) < 0.5


def test_concurrent_requests_are_batched_and_all_complete(base: str) -> None:
    def run(results: list[dict], index: int) -> None:
        results[index] = httpx.post(
            f"{base}/api/generate",
            json={
                "model": NAME,
                "prompt": PROMPTS[index % 3],
                "stream": False,
                "options": {**GREEDY, "num_predict": 16},
            },
            timeout=300,
        ).json()

    alone: list[dict] = [{}]
    run(alone, 0)  # loads the model when no test before did
    started = time.perf_counter()
    run(alone, 0)
    alone_rate = alone[0]["eval_count"] / (time.perf_counter() - started)
    started = time.perf_counter()
    results: list[dict] = [{} for _ in range(4)]
    threads = [threading.Thread(target=run, args=(results, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert all(result.get("done") for result in results), results
    assert results[0]["response"] == alone[0]["response"]  # a row's text does not depend on its neighbours
    tokens = sum(result["eval_count"] for result in results)
    print(f"\n4 concurrent: {tokens / elapsed:.1f} tokens/s aggregate; alone: {alone_rate:.1f} tokens/s")


def test_ember_run_through_the_server_and_alone(server: tuple[str, dict[str, str]], smollm2_dir: Path) -> None:
    _, env = server
    args = [sys.executable, "-m", "ember.cli.main", "run"]
    through = subprocess.run(
        [*args, NAME, PROMPTS[0], "--temp", "0", "-n", "12"], env=env, capture_output=True, text=True, timeout=300
    )
    assert through.returncode == 0 and "Paris" in through.stdout, through.stderr
    alone_env = {key: value for key, value in env.items() if key != "EMBER_HOST"}
    alone_env["EMBER_HOST"] = "127.0.0.1:9"  # nothing listens there: `ember run` loads the model itself
    alone = subprocess.run(
        [*args, str(smollm2_dir), PROMPTS[0], "--temp", "0", "-n", "12"],
        env=alone_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0 and alone.stdout == through.stdout, alone.stderr
