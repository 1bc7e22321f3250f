"""SIGTERM while four streams run: each one finishes or ends with a clear error line, and the server exits 0."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from tests.server import serve_process

GRACE = 3  # seconds: the short answers finish within it, the long ones cannot
# A long run of numbers: the small model goes on counting rather than ending its answer early.
COUNTING = ", ".join(str(number) for number in range(1, 80)) + ","


def test_sigterm_during_four_streams_finishes_or_explains_each_and_exits_0() -> None:
    env = {"EMBER_NUM_PARALLEL": "4", "EMBER_SHUTDOWN_GRACE": str(GRACE)}
    with serve_process(env) as (server, base, _):
        budgets = [8, 12, 4000, 4000]  # two answers that end quickly, two far longer than the grace period
        streams: list[list[dict]] = [[] for _ in budgets]
        started = [threading.Event() for _ in budgets]
        failures: list[BaseException] = []

        def stream(index: int) -> None:
            body = {
                "model": "smollm2",
                "prompt": COUNTING,
                "raw": True,
                "options": {"num_predict": budgets[index], "temperature": 0, "num_ctx": 4096},
            }
            try:
                with httpx.stream("POST", base + "/api/generate", json=body, timeout=120) as response:
                    for line in response.iter_lines():
                        streams[index].append(json.loads(line))
                        started[index].set()
            except BaseException as error:  # a cut connection is what this test must not see
                failures.append(error)
                started[index].set()

        readers = [threading.Thread(target=stream, args=(index,)) for index in range(len(budgets))]
        for reader in readers:
            reader.start()
        assert all(event.wait(120) for event in started)
        server.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=60)
        assert not failures, failures
        for budget, lines in zip(budgets, streams, strict=True):
            last = lines[-1]
            if last.get("done"):
                assert last["eval_count"] == budget or last["done_reason"] == "stop", last
            else:
                assert "shutting down" in last["error"] and "EMBER_SHUTDOWN_GRACE" in last["error"], last
        # The long ones run past the grace period unless the model ends one early (an end of text: done, stop).
        assert any("error" in lines[-1] for lines in streams[2:]), [lines[-1] for lines in streams]
        assert server.wait(timeout=60) == 0
