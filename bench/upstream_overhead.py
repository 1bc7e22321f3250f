"""The front server's overhead on an upstream model: a streamed chat through ember to an upstream server,
against the same request sent to the upstream directly, alternating, in the same run.

The upstream is a second `ember serve` (smollm2 on this machine's CPU; point --upstream at a vLLM or
trtllm-serve base URL, with --model, to measure against one of those). Each request asks for --tokens tokens
at temperature 0 of a prompt of its own (so neither path gets the other's cached prompt); the order within
each pair alternates. Reported: medians of the time to first token and of the decode rate (tokens after the
first over the time after the first), and front/direct ratios.

    .venv/bin/python bench/upstream_overhead.py [--pairs 12] [--tokens 48] [--upstream URL --model NAME] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ember.store.create import create
from ember.store.store import ModelStore


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _serve(env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ember.cli.main", "serve"],
        env={**os.environ, **env, "EMBER_HOST": f"127.0.0.1:{port}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ember serve did not start")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def one_stream(client: httpx.Client, url: str, model: str, prompt: str, tokens: int) -> dict[str, float]:
    """TTFT (s) and the decode rate (tokens/s after the first) of one streamed chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    count = 0
    with client.stream("POST", url + "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                first = first or time.perf_counter()
    ended = time.perf_counter()
    first = first or ended
    return {"ttft": first - started, "rate": (count - 1) / (ended - first) if ended > first and count > 1 else 0.0}


def measure(front: str, upstream: str, model: str, pairs: int, tokens: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"front": [], "direct": []}
    with httpx.Client(timeout=600) as client:
        one_stream(client, front + "/v1", "big", "Warm up.", 4)  # loads the model on both servers
        one_stream(client, upstream, model, "Warm up again.", 4)
        for pair in range(pairs):
            order = [("front", front + "/v1", "big"), ("direct", upstream, model)]
            for label, url, name in order if pair % 2 == 0 else order[::-1]:
                prompt = f"Request {pair}-{label}: write a short story about a lighthouse keeper."
                runs[label].append(one_stream(client, url, name, prompt, tokens))
    result: dict[str, Any] = {"pairs": pairs, "tokens": tokens}
    for label, rows in runs.items():
        result[label] = {
            "ttft_ms": round(1000 * statistics.median(r["ttft"] for r in rows), 1),
            "tokens_per_s": round(statistics.median(r["rate"] for r in rows), 1),
        }
    result["ttft_ratio"] = round(result["front"]["ttft_ms"] / result["direct"]["ttft_ms"], 3)
    result["rate_ratio"] = round(result["front"]["tokens_per_s"] / result["direct"]["tokens_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--upstream", help="an OpenAI base URL (…/v1) to measure against; default: a local ember")
    parser.add_argument("--model", default="smollm2", help="the model's name on the upstream")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        upstream = args.upstream
        if upstream is None:
            upstream_env = {"EMBER_HOME": str(folder / "upstream"), "EMBER_KEEP_ALIVE": "-1"}
            upstream = stack.enter_context(_serve(upstream_env)) + "/v1"
        modelfile = f"FROM upstream+{upstream} {args.model}\nPARAMETER num_parallel 4\n"
        create("big", modelfile, store=ModelStore(folder / "front" / "models"))
        front = stack.enter_context(_serve({"EMBER_HOME": str(folder / "front")}))
        result = measure(front, upstream.rstrip("/"), args.model, args.pairs, args.tokens)
    if args.json:
        print(json.dumps(result))
        return
    for label in ("direct", "front"):
        row = result[label]
        print(f"{label:<7} TTFT {row['ttft_ms']:>7.1f} ms   decode {row['tokens_per_s']:>6.1f} tokens/s")
    print(f"front/direct: TTFT x{result['ttft_ratio']}, decode x{result['rate_ratio']} ({args.pairs} pairs)")


if __name__ == "__main__":
    main()
