"""ember's own routes: health and readiness, tokenizing, the WebSocket stream, priorities over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

import ember
from ember.api.app import create_app
from ember.config import Settings


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings()), base_url="http://127.0.0.1:11434") as test_client:
        yield test_client


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["default_model"] == "smollm2"
    assert client.get("/").text.startswith("ember is running")


def test_tokenize_and_detokenize_match_the_model(client: TestClient, model: ember.Model) -> None:
    text = "Hello, world! Ünïcödé"
    tokens = client.post("/api/tokenize", json={"model": "smollm2", "content": text}).json()["tokens"]
    assert tokens == model.tokenize(text, add_special=False)
    back = client.post("/api/detokenize", json={"model": "smollm2", "tokens": tokens}).json()
    assert back["content"] == text
    bad = client.post("/api/detokenize", json={"model": "smollm2", "tokens": [10**9]})
    assert bad.status_code == 400


def test_websocket_streams_an_answer_and_can_be_cancelled(client: TestClient) -> None:
    with client.websocket_connect("/api/ws", headers={"Host": "127.0.0.1:11434"}) as socket:
        socket.send_json(
            {
                "type": "generate",
                "model": "smollm2",
                "prompt": "1, 2, 3,",
                "raw": True,
                "options": {"temperature": 0, "num_predict": 8},
            }
        )
        chunks = []
        while True:
            chunk = socket.receive_json()
            chunks.append(chunk)
            if chunk["done"]:
                break
        assert chunks[-1]["eval_count"] == 8 and "".join(c.get("response", "") for c in chunks).strip()

        socket.send_json(
            {
                "type": "chat",
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Hi"}],
                "options": {"num_predict": 4},
            }
        )
        while not (chunk := socket.receive_json())["done"]:
            assert chunk["message"]["role"] == "assistant"

        socket.send_json(
            {"type": "generate", "model": "smollm2", "prompt": "Tell a long story.", "options": {"num_predict": 2000}}
        )
        socket.receive_json()
        socket.send_json({"type": "cancel"})
        socket.send_json({"type": "generate", "model": "nosuchmodel", "prompt": "x"})
        for _ in range(3000):
            message = socket.receive_json()
            if "error" in message:
                break
        assert "not found" in message["error"]


def test_priority_header_and_field_are_accepted_and_checked(client: TestClient) -> None:
    body = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    assert client.post("/api/generate", json=body, headers={"X-Ember-Priority": "high"}).status_code == 200
    assert client.post("/api/generate", json={**body, "priority": "low"}).status_code == 200
    refused = client.post("/api/generate", json={**body, "priority": "urgent"})
    assert refused.status_code == 400 and "priority" in refused.json()["error"]


def test_a_full_queue_answers_503_with_retry_after() -> None:
    from tests.server import running_server

    with running_server(num_parallel=1, max_queue=0) as base:
        body = {
            "model": "smollm2",
            "prompt": "1, 2, 3,",
            "raw": True,
            "options": {"num_predict": 300, "temperature": 0, "repeat_penalty": 1.0},
        }
        with httpx.stream("POST", base + "/api/generate", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: dropping the iterator closes the stream (and frees the slot)
            next(lines)
            refused = httpx.post(base + "/api/generate", json={**body, "stream": False}, timeout=60)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["error"]
