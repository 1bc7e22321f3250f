"""Next-turn TTFT of a long stored conversation after `ember serve` restarts: with the disk KV tier, without it,
and against a cold prefill of the same conversation.

Each run: a fresh EMBER_HOME; `ember serve` starts; a conversation is made whose first turn is a long user
message (about --tokens prompt tokens) answered with a few tokens; the server stops (SIGTERM, as a user or
systemd stops it) and starts again; the next turn's time to first token is measured, streamed, through
/api/conversations/{id}/chat. With EMBER_KV_CACHE_DISK the first turn's KV is restored from disk; without it,
the whole conversation is prefilled again. The model is loaded (a one-token request) before each timed turn,
so a TTFT is the prompt's alone. "Cold" is the first turn of the same conversation, on a server that
has never seen it. Medians over --runs; the ratios are what to read.

    .venv/bin/python bench/kv_restart.py [--tokens 2000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx

FACTS = [
    "The lighthouse keeper logged the weather every morning at six.",
    "A ferry crossed the bay twice a day, carrying mail and bread.",
    "The harbour froze in the winter of the great storm.",
    "Children learned to swim off the stone pier in summer.",
    "The old mill turned grain into flour for three villages.",
]


def long_message(tokens: int) -> str:
    """A user message of roughly `tokens` tokens of SmolLM2's tokenizer (about 12 tokens per fact)."""
    lines = [f"Note {i}: {FACTS[i % len(FACTS)]}" for i in range(tokens // 15)]
    return "Here are my notes about the island.\n" + "\n".join(lines) + "\nSummarize them in one sentence."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(home: str, disk_bytes: int) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "EMBER_HOME": home, "EMBER_HOST": f"127.0.0.1:{port}", "EMBER_KV_CACHE_DISK": str(disk_bytes)}
    process = subprocess.Popen([sys.executable, "-m", "ember.cli.main", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("ember serve did not start")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def turn(base: str, conversation: str, content: str) -> tuple[float, dict[str, Any]]:
    """Stream one turn; (seconds to the first answer text, the final line)."""
    started = time.perf_counter()
    first: float | None = None
    final: dict[str, Any] = {}
    body = {"content": content, "options": {"temperature": 0, "num_predict": 8}}
    with httpx.stream("POST", f"{base}/api/conversations/{conversation}/chat", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line:
                continue
            data = json.loads(line)
            if "error" in data:
                raise RuntimeError(data["error"])
            if first is None and (data.get("message") or {}).get("content"):
                first = time.perf_counter() - started
            if data.get("done"):
                final = data
    return (first if first is not None else time.perf_counter() - started), final


def load_model(base: str, options: dict[str, Any]) -> None:
    """Load the model with the conversation's options (a one-token answer), so TTFT is the prompt's alone."""
    body = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {**options, "num_predict": 1}}
    httpx.post(f"{base}/api/generate", json=body, timeout=600).raise_for_status()


def one_run(tokens: int, disk_bytes: int, options: dict[str, Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ember-kv-bench-") as home:
        with server(home, disk_bytes) as base:
            response = httpx.post(f"{base}/api/conversations", json={"options": options}, timeout=60)
            created = response.raise_for_status().json()["conversation"]
            load_model(base, options)
            cold, final = turn(base, created["id"], long_message(tokens))
        with server(home, disk_bytes) as base:
            load_model(base, options)
            warm, final = turn(base, created["id"], "And what froze?")
        cached = float(final.get("prompt_cached_count", 0) or 0)
        return {"cold_ttft": cold, "next_ttft": warm, "cached": cached, "prompt": float(final["prompt_eval_count"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = {"num_ctx": max(4096, 2 * args.tokens)}
    results: dict[str, list[dict[str, float]]] = {"disk": [], "no disk": []}
    for _ in range(args.runs):  # alternating, so both see the same machine
        results["disk"].append(one_run(args.tokens, 1 << 30, options))
        results["no disk"].append(one_run(args.tokens, 0, options))
    summary: dict[str, dict[str, float]] = {}
    for mode, runs in results.items():
        summary[mode] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    cold = statistics.median(run["cold_ttft"] for runs in results.values() for run in runs)
    if args.json:
        print(json.dumps({"summary": summary, "cold_ttft": cold}, indent=2))
        return
    print(f"cold prefill of the conversation (first turn): TTFT {cold * 1000:.0f} ms")
    for mode, figures in summary.items():
        print(
            f"next turn after a restart, {mode:7}: TTFT {figures['next_ttft'] * 1000:.0f} ms "
            f"({figures['next_ttft'] / cold:.2f}x cold), {figures['cached']:.0f} prompt tokens from cache, "
            f"{figures['prompt']:.0f} prefilled"
        )


if __name__ == "__main__":
    main()
