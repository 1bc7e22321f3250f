"""The JSON logs: one line per request in logs/requests.jsonl (X-Request-Id accepted and echoed), server events
in logs/server.jsonl; prompts and answers only with EMBER_LOG_CONTENT=1."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.server import running_server

BODY = {"model": "smollm2", "prompt": "Say hi", "stream": False, "options": {"num_predict": 6, "temperature": 0}}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_request_is_one_json_line_with_its_id_and_numbers(tmp_path: Path) -> None:
    with running_server(home=tmp_path) as base:
        answer = httpx.post(base + "/api/generate", json=BODY, headers={"X-Request-Id": "job-7.step:1"}, timeout=120)
        assert answer.headers["x-request-id"] == "job-7.step:1"
        missing = httpx.post(base + "/api/generate", json={**BODY, "model": "no-such-model"}, timeout=30)
        assert missing.status_code == 404
        assert len(missing.headers["x-request-id"]) == 32  # none given: a fresh one
        odd = httpx.get(base + "/api/version", headers={"X-Request-Id": "two words\tand a tab"}, timeout=10)
        assert odd.headers["x-request-id"] != "two words\tand a tab"  # not written to the log as given
        httpx.get(base + "/health", timeout=10)
    requests = _lines(tmp_path / "logs" / "requests.jsonl")
    first = next(line for line in requests if line["id"] == "job-7.step:1")
    data = answer.json()
    assert first["route"] == "/api/generate" and first["method"] == "POST" and first["status"] == 200
    assert first["model"] == "smollm2" and first["served_by"] == "smollm2:latest"
    assert first["prompt_tokens"] == data["prompt_eval_count"] and first["eval_tokens"] == data["eval_count"]
    assert first["cached_tokens"] == data.get("prompt_cached_count", 0)
    assert 0 < first["ttft_ms"] <= first["duration_ms"]
    assert first["client"].startswith("127.0.0.1:") and first["time"].endswith("Z") and first["error"] is None
    assert "prompt" not in first and "answer" not in first  # content is off by default
    failed = next(line for line in requests if line["id"] == missing.headers["x-request-id"])
    assert failed["status"] == 404 and "no-such-model" in failed["error"] and failed["eval_tokens"] == 0
    assert not any(line["route"] == "/health" for line in requests)
    events = _lines(tmp_path / "logs" / "server.jsonl")
    load = next(event for event in events if event["event"] == "load")
    assert load["model"] == "smollm2:latest" and load["seconds"] > 0 and load["restart"] is False
    assert any(event["event"] == "unload" and event["model"] == "smollm2:latest" for event in events)  # at close


def test_content_is_logged_only_when_asked(tmp_path: Path) -> None:
    with running_server(home=tmp_path, log_content=True) as base:
        answer = httpx.post(base + "/api/generate", json=BODY, timeout=120).json()
    line = _lines(tmp_path / "logs" / "requests.jsonl")[-1]
    assert line["prompt"] == "Say hi" and line["answer"] == answer["response"]
