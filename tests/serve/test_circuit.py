"""Failure handling with the real model and real runner processes: a runner killed three times opens the model's
circuit (a fast 503 with Retry-After), alerts reach a local webhook server and a local SMTP server (aiosmtpd),
the circuit closes after its cool-down; a broken model's fallback answers for it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.gguf_files import write_tiny_gguf
from tests.server import free_port, running_server

COOLDOWN = 4


def _runner_pids() -> list[int]:
    """This process's runner children (the server runs in a thread here)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
        if ppid == str(os.getpid()) and "ember.runner.process" in command and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def webhook() -> Iterator[list[dict]]:
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.received = received  # type: ignore[attr-defined]
    try:
        yield server  # type: ignore[misc]
    finally:
        server.shutdown()


class _Mailbox:
    def __init__(self) -> None:
        self.mails: list[tuple[str, str]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.mails.append((str(envelope.rcpt_tos), envelope.content.decode()))  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[tuple[_Mailbox, int]]:
    box = _Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def _wait(condition: object, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _stream_and_kill(base: str) -> list[dict]:
    """A long answer whose runner is killed once it streams; its lines."""
    body = {"model": "smollm2", "prompt": "Count:", "raw": True, "options": {"num_predict": 2000}}
    lines: list[dict] = []
    with httpx.stream("POST", base + "/api/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 1:
                runners = _runner_pids()
                assert len(runners) == 1, runners
                os.kill(runners[0], signal.SIGKILL)
    return lines


def test_three_kills_open_the_circuit_alert_and_a_probe_closes_it(
    tmp_path: Path, webhook: ThreadingHTTPServer, mailbox: tuple[_Mailbox, int]
) -> None:
    box, smtp_port = mailbox
    settings = {
        "home": tmp_path,
        "num_parallel": 1,
        "circuit_failures": 3,
        "circuit_cooldown": COOLDOWN,
        "alert_webhook": f"http://127.0.0.1:{webhook.server_address[1]}/hook",
        "alert_smtp": f"smtp://127.0.0.1:{smtp_port}",
        "alert_mail_to": "ops@example.test",
    }
    with running_server(**settings) as base:
        for _ in range(3):
            lines = _stream_and_kill(base)
            assert "stopped unexpectedly (killed by SIGKILL)" in lines[-1]["error"], lines[-1]
        started = time.monotonic()
        refused = httpx.post(base + "/api/generate", json={"model": "smollm2", "prompt": "Hi"}, timeout=30)
        assert time.monotonic() - started < 2  # refused at once: no runner started
        assert refused.status_code == 503
        assert "circuit is open" in refused.json()["error"] and "3 failures" in refused.json()["error"]
        assert 1 <= int(refused.headers["retry-after"]) <= COOLDOWN
        assert _runner_pids() == []

        received = webhook.received  # type: ignore[attr-defined]
        assert _wait(lambda: {"runner_crash", "circuit_open"} <= {alert["rule"] for alert in received}), received
        assert sum(alert["rule"] == "runner_crash" for alert in received) == 1  # rate-limited: one per model
        opened = next(alert for alert in received if alert["rule"] == "circuit_open")
        assert opened["subject"] == "smollm2:latest" and "3 failures" in opened["message"]
        assert _wait(lambda: any("[ember] circuit_open: smollm2:latest" in mail for _, mail in box.mails)), box.mails
        assert all("ops@example.test" in to for to, _ in box.mails)

        time.sleep(int(refused.headers["retry-after"]) + 0.5)
        body = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 3}}
        probe = httpx.post(base + "/api/generate", json=body, timeout=120)
        assert probe.status_code == 200, probe.text  # the probe after the cool-down is served ...
        again = httpx.post(base + "/api/generate", json=body, timeout=120)
        assert again.status_code == 200  # ... and closed the circuit
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert 'ember_circuit_open{model="smollm2:latest"} 0.0' in metrics
        assert 'ember_runner_crashes_total{model="smollm2:latest"} 3.0' in metrics
        # Started again after each crash: for the second and third answers, and for the probe.
        assert 'ember_runner_restarts_total{model="smollm2:latest"} 3.0' in metrics
    events = [json.loads(line) for line in (tmp_path / "logs" / "server.jsonl").read_text().splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds.count("runner_crash") == 3
    assert kinds.index("circuit_open") < kinds.index("circuit_probe") < kinds.index("circuit_closed")


def test_a_fallback_answers_when_the_primary_is_broken(tmp_path: Path) -> None:
    broken = write_tiny_gguf(tmp_path / "broken.gguf")  # a valid header, but no model llama.cpp can load
    with running_server(home=tmp_path / "home") as base:
        created = httpx.post(
            base + "/api/create",
            json={"model": "fragile", "modelfile": f"FROM {broken}\nPARAMETER fallback smollm2\n", "stream": False},
            timeout=60,
        )
        assert created.status_code == 200, created.text
        body = {"model": "fragile", "prompt": "Hi", "stream": False, "options": {"num_predict": 3}}
        answer = httpx.post(base + "/api/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "smollm2:latest" == answer.headers["x-ember-model"]  # who answered
        assert answer.json()["eval_count"] > 0
        chat = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "fragile", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            timeout=120,
        )
        assert chat.status_code == 200 and chat.json()["model"] == "smollm2:latest"
        alone = httpx.post(base + "/api/generate", json={**body, "model": str(broken)}, timeout=60)
        assert alone.status_code >= 400 and alone.json()["error"]  # with no fallback: a clear error
    events = [json.loads(line) for line in (tmp_path / "home" / "logs" / "server.jsonl").read_text().splitlines()]
    assert any(event["event"] == "fallback" and event["fallback"] == "smollm2:latest" for event in events)
