"""Batch jobs: `ember batch` throughput against 8 concurrent streams, and interactive TTFT while a batch runs.

1. Throughput: N short prompts (256 by default) through `ember batch`'s in-process executor with 8 slots
   (journal, threads and all), against bench/serving.py's 8-stream aggregate through the model manager, both
   greedy with the same number of tokens per answer, run alternately `--runs` times; the ratio is taken within
   each pair (the machine's speed drifts). Target: >= 0.9.
2. Latency: the time to first token of a short interactive chat on a model with 4 slots while batch lines keep
   its batch slots busy (EMBER_BATCH_SLOTS default: 3 of 4), against the same request on the idle model.
   Target: <= 2x.

    .venv/bin/python bench/batch.py [--prompts 256] [--tokens 32] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ember.api.openai_calls import native_call
from ember.config import Settings
from ember.jobs.batch_input import PromptDefaults, read_inputs
from ember.jobs.batch_journal import Journal
from ember.jobs.batch_lines import run_on_manager
from ember.jobs.batch_run import ManagerExecutor, run_lines
from ember.serve.manager import ModelManager
from ember.types import ChatRequest
from serving import one_stream, prompt_for  # bench/serving.py: Python puts this script's folder on the path

NUM_CTX = 512


def batch_lines(count: int, tokens: int, run: int, folder: Path) -> list[Any]:
    path = folder / f"prompts-{run}.txt"
    path.write_text("".join(f"Run {run}. In one sentence, describe {prompt_for(i)}\n" for i in range(count)))
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": tokens}
    return read_inputs([str(path)], PromptDefaults(model="smollm2", options=options), per_line=True)


def batch_rate(executor: ManagerExecutor, lines: list[Any], folder: Path, run: int) -> float:
    """Generated tokens per second of one `ember batch` run (model already loaded), journal included."""
    journal = Journal(folder / f"run-{run}.journal", lines)

    def on_result(result: Any) -> None:
        journal.record(result)

    started = time.perf_counter()
    run_lines(lines, executor, concurrency=8, on_result=on_result)
    wall = time.perf_counter() - started
    return sum(result.tokens for result in journal.results.values()) / wall


async def streams_rate(manager: ModelManager, tokens: int, run: int) -> float:
    options = {"temperature": 0, "num_predict": tokens, "num_ctx": NUM_CTX, "num_parallel": 8, "repeat_penalty": 1.0}
    started = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(manager, prompt_for(i, run), options) for i in range(8)))
    return sum(stream["tokens"] for stream in streams) / (max(stream["done"] for stream in streams) - started)


def throughput(prompts: int, tokens: int, runs: int) -> dict[str, Any]:
    settings = Settings()
    samples = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        executor = ManagerExecutor(native_call, settings, {"num_ctx": NUM_CTX, "num_parallel": 8}, 8)
        loop = asyncio.new_event_loop()
        manager = ModelManager(keep_alive=-1)
        try:
            batch_rate(executor, batch_lines(8, 2, 0, folder), folder, 0)  # load and warm up both sides
            loop.run_until_complete(streams_rate(manager, 2, 0))
            for run in range(1, runs + 1):
                time.sleep(0.3)
                batch = batch_rate(executor, batch_lines(prompts, tokens, run, folder), folder, run)
                time.sleep(0.3)
                streams = loop.run_until_complete(streams_rate(manager, tokens, run))
                samples.append({"batch_tok_s": batch, "streams8_tok_s": streams, "ratio": batch / streams})
        finally:
            loop.run_until_complete(manager.close())
            loop.close()
            executor.close()
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


async def interactive_ttft(tokens: int) -> dict[str, float]:
    """TTFT of a short chat on an idle 4-slot model, then while batch lines hold its batch slots."""
    settings = Settings(num_parallel=4)
    manager = ModelManager(keep_alive=-1, default_options={"num_parallel": 4, "num_ctx": NUM_CTX})
    asked = iter(range(1_000_000))

    async def ttft() -> float:
        # Each question differs, so no answer reuses an earlier one's KV (the prefix cache would flatter it).
        question = f"Question {next(asked)}: hello there, how are you today?"
        chat = ChatRequest(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            options={"temperature": 0, "num_predict": 4},
        )
        sent = time.perf_counter()
        async for chunk in manager.chat(chat):
            if chunk.message.content:
                return time.perf_counter() - sent
        return time.perf_counter() - sent

    try:
        await ttft()  # load
        idle = statistics.median([await ttft() for _ in range(5)])
        lines = batch_lines(10_000, tokens * 4, 99, Path(tempfile.mkdtemp()))
        stop = asyncio.Event()

        async def feeder(offset: int) -> None:
            for line in lines[offset::4]:
                if stop.is_set():
                    return
                await run_on_manager(manager, line, native_call, settings, timeout=None)

        feeders = [asyncio.create_task(feeder(i)) for i in range(4)]
        await asyncio.sleep(2.0)  # the batch lines have their slots and decode
        busy = statistics.median([await ttft() for _ in range(5)])
        stop.set()
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
    finally:
        await manager.close()
    return {"ttft_idle_s": idle, "ttft_during_batch_s": busy, "ratio": busy / idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from ember.engine.llamacpp import check_backend

    check_backend()
    results = {
        "throughput": throughput(args.prompts, args.tokens, args.runs),
        "latency": asyncio.run(interactive_ttft(args.tokens)),
        "conditions": {"prompts": args.prompts, "tokens": args.tokens, "runs": args.runs, "num_ctx": NUM_CTX},
    }
    if args.json:
        print(json.dumps(results))
        return
    t, lat = results["throughput"], results["latency"]
    print(f"ember batch, {args.prompts} prompts, 8 slots: {t['batch_tok_s']:.1f} tok/s")
    print(f"8 streams through the manager:          {t['streams8_tok_s']:.1f} tok/s")
    print(f"ratio (target >= 0.9):                  {t['ratio']:.2f}")
    print(f"interactive TTFT idle:                  {lat['ttft_idle_s'] * 1000:.0f} ms")
    print(f"interactive TTFT while a batch runs:    {lat['ttft_during_batch_s'] * 1000:.0f} ms")
    print(f"ratio (target <= 2):                    {lat['ratio']:.2f}")


if __name__ == "__main__":
    main()
