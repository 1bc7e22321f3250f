"""SIGTERM: the server stops accepting, lets the streams in flight finish, and leaves no runner behind."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx

from tests.server import serve_process


def _runner_pids(parent: int) -> list[int]:
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
        if ppid == str(parent) and "ember.runner.process" in command:
            pids.append(int(entry.name))
    return pids


def test_sigterm_lets_a_stream_finish_and_stops_the_runners() -> None:
    # A long grace period: this test is about a stream that finishes (on a busy machine 60 tokens can take
    # longer than the default 10 s; what happens past the grace period is tests/reliability/test_sigterm.py's).
    with serve_process({"EMBER_SHUTDOWN_GRACE": "120"}) as (server, base, _):
        body = {
            "model": "smollm2",
            "prompt": "1, 2, 3, 4,",
            "raw": True,
            "options": {"num_predict": 60, "temperature": 0, "repeat_penalty": 1.0},
        }
        lines: list[dict] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", base + "/api/generate", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(json.loads(line))
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        runners = _runner_pids(server.pid)
        assert len(runners) == 1
        server.send_signal(signal.SIGTERM)
        reader.join(timeout=150)
        assert lines[-1].get("done") is True, lines[-1]
        assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 60  # it finished, not cut
        assert server.wait(timeout=30) == 0  # a graceful stop is a success (uvicorn alone would exit -15)
        for pid in runners:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        try:
            httpx.get(base + "/health", timeout=1)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.HTTPError:
            pass
