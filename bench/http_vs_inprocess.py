"""One client streaming over HTTP from `ember serve` against the same generation in-process (ember.Model).

Both sides generate the same greedy tokens from the same prompt; each is timed from the client's side, from
sending the request to the last token, and as decode tokens/s from the first token to the last. Runs
alternate between the sides, and the ratio is taken within each pair (the median of the per-pair ratios).

    .venv/bin/python bench/http_vs_inprocess.py [--tokens 128] [--runs 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

import ember

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed everything. Run {run}:"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def over_http(base: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "raw": True,
        "keep_alive": -1,
        "options": {"temperature": 0, "num_predict": tokens, "num_ctx": 1024},
    }
    sent = time.perf_counter()
    first = last = 0.0
    count = 0
    with httpx.stream("POST", base + "/api/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            chunk = json.loads(line)
            if chunk.get("response"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("done"):
                count = chunk["eval_count"]
    return last - sent, (count - 1) / (last - first), count


def in_process(model: ember.Model, prompt: str, tokens: int) -> tuple[float, float, int]:
    sent = time.perf_counter()
    first = last = 0.0
    count = 0
    for chunk in model.generate(prompt, raw=True, stream=True, temperature=0, num_predict=tokens):
        if chunk.response:
            last = time.perf_counter()
            first = first or last
        if chunk.done:
            count = chunk.eval_count
    return last - sent, (count - 1) / (last - first), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    port = free_port()
    environment = {**os.environ, "EMBER_HOST": f"127.0.0.1:{port}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "ember.cli.main", "serve"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        model = ember.Model("smollm2", num_ctx=1024)
        over_http(base, "Once upon a time", 32)
        in_process(model, "Once upon a time", 32)
        wall_ratios, decode_ratios, figures = [], [], {"http_decode": [], "inprocess_decode": []}
        for run in range(args.runs):
            prompt = PROMPT.format(run=run)  # a new prompt each run: no side gets a cached prefix
            sides = [
                ("http", lambda prompt=prompt: over_http(base, prompt, args.tokens)),
                ("inprocess", lambda prompt=prompt: in_process(model, prompt, args.tokens)),
            ]
            results = {}
            for name, run_side in sides if run % 2 == 0 else sides[::-1]:
                time.sleep(0.3)
                results[name] = run_side()
            assert results["http"][2] == results["inprocess"][2], "the two sides generated different lengths"
            wall_ratios.append(results["inprocess"][0] / results["http"][0])
            decode_ratios.append(results["http"][1] / results["inprocess"][1])
            figures["http_decode"].append(results["http"][1])
            figures["inprocess_decode"].append(results["inprocess"][1])
        report = {
            "tokens": args.tokens,
            "runs": args.runs,
            "http_decode_tok_s": round(statistics.median(figures["http_decode"]), 1),
            "inprocess_decode_tok_s": round(statistics.median(figures["inprocess_decode"]), 1),
            "decode_ratio": round(statistics.median(decode_ratios), 3),
            "wall_ratio": round(statistics.median(wall_ratios), 3),
        }
        model.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        print(json.dumps(report))
        return
    print(f"one stream, {args.tokens} tokens, median of {args.runs} paired runs")
    print(f"decode tok/s: over HTTP {report['http_decode_tok_s']}, in-process {report['inprocess_decode_tok_s']}")
    print(f"ratio HTTP / in-process: decode {report['decode_ratio']}, whole request {report['wall_ratio']}")


if __name__ == "__main__":
    main()
