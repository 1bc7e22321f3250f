"""Per-request timeouts with the real model: a 504 (or a stream's error line), the slot freed, the caps."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server import running_server

# A long answer: the small model is fast, so num_predict is large and the context wide enough to hold it.
LONG = {"temperature": 0, "num_predict": 4000, "num_ctx": 4096}
# Streams get 3 s, so that even on a busy machine the first chunk comes before the limit and the error comes
# as the stream's last line (with 1 s the first chunk can be late, and the answer is then a plain 504).
STREAM_LIMIT = 3
# A raw prompt the model goes on counting from for thousands of tokens ("Count:" alone ends in about 200, which
# a fast machine writes within STREAM_LIMIT).
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=1, max_timeout=30) as url:  # one slot: a slot not freed would block
        warm = {
            "model": "smollm2",
            "prompt": "Count:",
            "raw": True,
            "stream": False,
            "options": {**LONG, "num_predict": 2},
        }
        httpx.post(url + "/api/generate", json=warm, timeout=120)
        yield url


def _slots_in_use(base: str) -> int:
    models = httpx.get(base + "/api/ps", timeout=10).json()["models"]
    return sum(model["ember"]["slots_in_use"] for model in models)


def test_a_total_timeout_gives_504_and_frees_the_slot(base: str) -> None:
    started = time.monotonic()
    body = {
        "model": "smollm2",
        "prompt": COUNTING,
        "raw": True,
        "stream": False,
        "options": LONG,
        "timeout": 1,
    }
    response = httpx.post(base + "/api/generate", json=body, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert "total timeout of 1 s" in response.json()["error"]
    assert elapsed < 10  # cut near 1 s, not after 4000 tokens
    assert _slots_in_use(base) == 0
    # The one slot serves the next request at once (it would wait forever for a slot never given back).
    quick = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 4, "num_ctx": 4096}}
    assert httpx.post(base + "/api/generate", json=quick, timeout=30).json()["done"] is True


def test_a_stream_past_its_timeout_ends_with_an_error_line(base: str) -> None:
    body = {"model": "smollm2", "prompt": COUNTING, "raw": True, "options": LONG}
    lines = []
    headers = {"X-Ember-Timeout": str(STREAM_LIMIT), "X-Request-Id": "trace-42"}
    with httpx.stream("POST", base + "/api/generate", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "trace-42"
        assert response.headers["x-ember-model"] == "smollm2:latest"
        lines = [json.loads(line) for line in response.iter_lines()]
    assert len(lines) > 1 and "response" in lines[0]  # it streamed before the limit
    assert f"total timeout of {STREAM_LIMIT} s" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)
    assert _slots_in_use(base) == 0


def test_an_openai_stream_gets_an_error_event(base: str) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "stream": True,
        "max_tokens": 4000,
        "temperature": 0,
        "logit_bias": {"0": -100, "2": -100},  # no <|endoftext|> or <|im_end|>: the answer outlasts the limit
        "timeout": STREAM_LIMIT,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    payloads = [json.loads(event) for event in events if event != "[DONE]"]
    errors = [payload["error"] for payload in payloads if "error" in payload]
    assert errors, payloads[-3:]
    assert "timeout" in errors[-1]["message"]


def test_timeouts_outside_the_caps_are_refused(base: str) -> None:
    body = {"model": "smollm2", "prompt": "Hi", "stream": False, "timeout": 3600}
    response = httpx.post(base + "/api/generate", json=body, timeout=30)
    assert response.status_code == 400
    assert "at most 30 s (EMBER_MAX_TIMEOUT)" in response.json()["error"]
    response = httpx.post(base + "/api/generate", json={**body, "timeout": "soon"}, timeout=30)
    assert response.status_code == 400 and "number of seconds" in response.json()["error"]
    response = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"X-Ember-Timeout": "-1"},
        timeout=30,
    )
    assert response.status_code == 400 and "X-Ember-Timeout" in response.json()["error"]["message"]


def test_the_websocket_honours_a_message_timeout(base: str) -> None:
    from websockets.sync.client import connect

    with connect(base.replace("http", "ws") + "/api/ws") as socket:
        socket.send(
            json.dumps(
                {
                    "type": "generate",
                    "model": "smollm2",
                    "prompt": COUNTING,
                    "raw": True,
                    "options": LONG,
                    "timeout": STREAM_LIMIT,
                }
            )
        )
        while True:
            message = json.loads(socket.recv(timeout=30))
            if "error" in message or message.get("done"):
                break
    assert f"total timeout of {STREAM_LIMIT} s" in message["error"]
    assert _slots_in_use(base) == 0
