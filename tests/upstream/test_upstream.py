"""Upstream models end to end: a front `ember serve` whose model `big` is served by two other `ember serve`
processes (the replicas, each with an API key), through the Ollama and OpenAI clients, conversations and
batch jobs; one replica killed mid-run; the replicas' key nowhere in the front's store, logs or `ember show`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from ember.store.create import create
from ember.store.store import ModelStore
from tests.server import serve_process

KEY = "sk-upstream-7f3a9c1e5b2d4f60"  # the replicas' EMBER_API_KEYS; the front reads it from UP_KEY
OPTIONS = {"num_predict": 6, "temperature": 0}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """Two upstream servers, each with its own home (the bundled smollm2 is registered there on first use)."""
    env = {"EMBER_API_KEYS": KEY, "EMBER_NUM_PARALLEL": "2", "EMBER_KEEP_ALIVE": "-1"}
    with (
        serve_process({**env, "EMBER_HOME": str(tmp_path_factory.mktemp("replica-a"))}) as (first, first_url, _),
        serve_process({**env, "EMBER_HOME": str(tmp_path_factory.mktemp("replica-b"))}) as (second, second_url, _),
    ):
        yield [(first, first_url), (second, second_url)]


@pytest.fixture(scope="module")
def front_home(tmp_path_factory: pytest.TempPathFactory, replicas: list[tuple[Any, str]]) -> Path:
    home = tmp_path_factory.mktemp("front")
    lines = [f"FROM upstream+{url}/v1 smollm2" for _, url in replicas]
    modelfile = "\n".join([*lines, "PARAMETER upstream_key_env UP_KEY", "PARAMETER num_ctx 2048", ""])
    create("big", modelfile, store=ModelStore(home / "models"))
    wrong = f"FROM upstream+{replicas[0][1]}/v1 no-such-model\nPARAMETER upstream_key_env UP_KEY\n"
    create("wrong", wrong, store=ModelStore(home / "models"))
    return home


@pytest.fixture(scope="module")
def front(front_home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = {"EMBER_HOME": str(front_home), "UP_KEY": KEY, "EMBER_UPSTREAM_HEALTH_INTERVAL": "0.5"}
    with serve_process(env) as (_, base, environment):
        yield base, environment


def test_the_ollama_client_streams_an_answer_through_the_front(front: tuple[str, dict[str, str]]) -> None:
    client = ollama.Client(host=front[0])
    chunks = list(client.chat("big", messages=[{"role": "user", "content": "Say hi."}], stream=True, options=OPTIONS))
    assert len(chunks) >= 3 and chunks[-1].done and not any(chunk.done for chunk in chunks[:-1])
    assert "".join(chunk.message.content for chunk in chunks).strip()
    assert chunks[-1].eval_count == 6 and chunks[-1].prompt_eval_count > 5 and chunks[-1].done_reason == "length"
    generated = client.generate("big", prompt="Name a colour.", options=OPTIONS)
    assert generated.response.strip() and generated.eval_count == 6


def test_the_openai_client_streams_chat_and_completions(front: tuple[str, dict[str, str]]) -> None:
    client = openai.OpenAI(base_url=front[0] + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="big",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens == 6
    two = client.chat.completions.create(
        model="big", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, seed=1
    )
    assert [choice.index for choice in two.choices] == [0, 1]
    completion = client.completions.create(model="big", prompt="The sky is", max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 5


def test_an_upstream_4xx_comes_back_with_its_message_and_no_failover(front: tuple[str, dict[str, str]]) -> None:
    body = {"model": "wrong", "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(front[0] + "/api/chat", json=body, timeout=60)
    assert response.status_code == 404 and "no-such-model" in response.text
    ps = httpx.get(front[0] + "/api/ps").json()["models"]
    wrong = next(model for model in ps if model["name"] == "wrong:latest")
    assert all(replica["healthy"] for replica in wrong["ember"]["replicas"])  # a 4xx marks nothing down


def test_a_stored_conversation_runs_on_the_upstream_model(front: tuple[str, dict[str, str]]) -> None:
    with httpx.Client(base_url=front[0], timeout=120) as api:
        created = api.post("/api/conversations", json={"model": "big", "options": OPTIONS}).json()["conversation"]
        for question in ("Which city is the capital of France?", "And of Italy?"):
            with api.stream("POST", f"/api/conversations/{created['id']}/chat", json={"content": question}) as answer:
                assert answer.status_code == 200, answer.read()
                lines = [json.loads(line) for line in answer.iter_lines() if line.strip()]
            assert lines[-1]["done"] and "".join(line["message"]["content"] for line in lines).strip()
            context = lines[-1]["context"]
            assert context["limit"] == 2048 and 0 < context["used"] < 2048  # estimated: the tokenizer is upstream
        stored = api.get(f"/api/conversations/{created['id']}").json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]


def test_a_batch_job_runs_on_the_upstream_model(front: tuple[str, dict[str, str]]) -> None:
    client = openai.OpenAI(base_url=front[0] + "/v1", api_key="unused")
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "big", "max_tokens": 4, "messages": [{"role": "user", "content": f"Count to {i}."}]}}
        for i in range(3)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in outputs)


def test_ps_shows_the_replicas_and_their_health(front: tuple[str, dict[str, str]]) -> None:
    (big,) = [model for model in httpx.get(front[0] + "/api/ps").json()["models"] if model["name"] == "big:latest"]
    assert big["size"] == 0 and big["context_length"] == 2048 and big["expires_at"].startswith("0001")
    assert [replica["healthy"] for replica in big["ember"]["replicas"]] == [True, True]
    shown = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "ps"], env=front[1], capture_output=True, text=True, timeout=60
    )
    assert "upstream 2/2 up" in shown.stdout, shown.stdout + shown.stderr


def test_killing_a_replica_fails_over_with_no_client_error(
    front: tuple[str, dict[str, str]], replicas: list[tuple[subprocess.Popen[bytes], str]]
) -> None:
    client = openai.OpenAI(base_url=front[0] + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    in_flight = client.chat.completions.create(**ask)  # one answer under way on some replica when the kill comes
    next(iter(in_flight))
    killed, survivor = replicas[0][0], replicas[1][1]
    killed.kill()
    killed.wait(timeout=30)
    for _ in range(6):  # every new request is answered (on the survivor), whichever replica it was sent to
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask) if c.choices)
    for _ in range(3):
        ollama.Client(host=front[0]).chat("big", messages=[{"role": "user", "content": "Hi"}], options=OPTIONS)
    (big,) = [model for model in httpx.get(front[0] + "/api/ps").json()["models"] if model["name"] == "big:latest"]
    health = {replica["url"]: replica["healthy"] for replica in big["ember"]["replicas"]}
    assert health == {replicas[0][1] + "/v1": False, survivor + "/v1": True}
    with pytest.raises(openai.APIError):  # the answer under way when its replica died ends with an error ...
        list(in_flight)  # ... or had finished already; either way the front server carries on


def test_the_key_is_never_shown_logged_or_stored(front: tuple[str, dict[str, str]], front_home: Path) -> None:
    shown = httpx.post(front[0] + "/api/show", json={"model": "big"})
    assert shown.status_code == 200 and KEY not in shown.text and "UP_KEY" in shown.text
    assert shown.json()["model_info"]["upstream.model"] == "smollm2"
    env = {k: v for k, v in front[1].items() if k != "EMBER_HOST"}  # `ember show` without a server: the store
    for environment in (front[1], env):
        cli = subprocess.run(
            [sys.executable, "-m", "ember.cli.main", "show", "big"], env=environment, capture_output=True, text=True
        )
        assert cli.returncode == 0 and "upstream" in cli.stdout and KEY not in cli.stdout + cli.stderr, cli
    modelfile = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "show", "big", "--modelfile"], env=env, capture_output=True, text=True
    ).stdout
    assert "PARAMETER upstream_key_env UP_KEY" in modelfile and modelfile.count("FROM upstream+") == 2
    files = [path for path in front_home.rglob("*") if path.is_file()]
    assert any("logs" in path.parts for path in files) and len(files) > 5
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_modelfile_mistakes_are_clear_errors() -> None:
    from ember.store.modelfile import ModelfileError, parse_modelfile

    with pytest.raises(ModelfileError, match="NAME of an environment variable") as pasted:
        parse_modelfile(f"FROM upstream+http://gpu:8000/v1 m\nPARAMETER upstream_key_env {KEY}\n")
    assert KEY not in str(pasted.value)
    with pytest.raises(ModelfileError, match="different models"):
        parse_modelfile("FROM upstream+http://a:8000/v1 m\nFROM upstream+http://b:8000/v1 other\n")
    with pytest.raises(ModelfileError, match="credentials"):
        parse_modelfile("FROM upstream+http://user:pw@a:8000/v1 m\n")
    with pytest.raises(ModelfileError, match="upstream models"):
        parse_modelfile("FROM smollm2\nPARAMETER upstream_key_env X\n")
    with pytest.raises(ModelfileError, match="TEMPLATE"):
        parse_modelfile('FROM upstream+http://a:8000/v1 m\nTEMPLATE "{{ x }}"\n')
    spec = parse_modelfile("FROM upstream+http://a:8000/v1/ m\nFROM upstream+https://b/v1 m\n").upstream
    assert spec is not None and spec.replicas == ("http://a:8000/v1", "https://b/v1") and spec.key_env is None
    assert os.environ.get("UP_KEY") is None  # the test process never had the key either


def test_what_needs_a_local_tokenizer_is_a_clear_400(front: tuple[str, dict[str, str]]) -> None:
    tokenize = httpx.post(front[0] + "/api/tokenize", json={"model": "big", "content": "hello"})
    assert tokenize.status_code == 400 and "upstream model" in tokenize.text
    insert = httpx.post(front[0] + "/api/generate", json={"model": "big", "prompt": "def f(", "suffix": "return 1"})
    assert insert.status_code == 400 and "suffix" in insert.text
    mirostat = httpx.post(
        front[0] + "/api/chat",
        json={"model": "big", "messages": [{"role": "user", "content": "x"}], "options": {"mirostat": 2}},
        timeout=60,
    )
    assert mirostat.status_code == 400 and "mirostat" in mirostat.text
