"""Concurrent streams through ember's model manager (runner process and all) against a raw batched loop.

For 1, 4, 8 and 16 streams: each stream sends a fixed prompt and generates a fixed number of tokens (greedy).
ember's figures: aggregate tokens/s (all tokens over the wall time), median per-stream tokens/s, and time to
first token p50/p99. The raw loop decodes the same prompts with the same context settings in one llama_batch
per step, as little code as that takes, and generates as many tokens per sequence as ember did.
Then a latency check: the time to first token of a short request arriving while 7 streams decode, against one
decode step plus that request's own prefill when alone.

    .venv/bin/python bench/serving.py [--streams 1,4,8,16] [--tokens 64] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from typing import Any

import llama_cpp as lib

from ember.engine.llamacpp import extra_buffer_types_are_safe
from ember.serve.manager import ModelManager
from ember.store.resolve import resolve_model
from ember.types import GenerateRequest

TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "a desert", "a forest", "a train", "winter"]


def prompt_for(index: int, run: int = 0) -> str:
    """A fixed prompt per stream; the run number at its start keeps ember's prefix cache from helping."""
    return f"Run {run}. Write a long, detailed story about {TOPICS[index % len(TOPICS)]}. Story {index}:"


class RawBatchedLoop:
    """All sequences in one llama_batch per step, greedy, one sampler per sequence: nothing else."""

    def __init__(self, path: str, num_ctx: int, sequences: int, threads: int) -> None:
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffer_types_are_safe()  # as ember loads it
        self.model = lib.llama_model_load_from_file(path.encode(), params)
        self.vocab = lib.llama_model_get_vocab(self.model)
        params = lib.llama_context_default_params()
        params.n_ctx = num_ctx * sequences
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # as ember: one KV stream per sequence
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.batch = lib.llama_batch_init(512, 0, 1)
        self.sequences = sequences

    def tokenize(self, text: str) -> list[int]:
        buffer = (lib.llama_token * 512)()
        count = lib.llama_tokenize(self.vocab, text.encode(), len(text.encode()), buffer, 512, True, False)
        return list(buffer[:count])

    def run(self, prompts: list[list[int]], n_tokens: int | list[int]) -> float:
        """Seconds to prefill all prompts and generate n_tokens for each (or each its own count)."""
        limits = n_tokens if isinstance(n_tokens, list) else [n_tokens] * len(prompts)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        samplers = []
        for _ in prompts:
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            samplers.append(chain)
        started = time.perf_counter()
        positions = [0] * len(prompts)
        pending = [list(prompt) for prompt in prompts]
        produced = [0] * len(prompts)
        while any(count < limit for count, limit in zip(produced, limits, strict=True)):
            size, rows = 0, []
            for seq, tokens in enumerate(pending):
                if produced[seq] >= limits[seq]:
                    continue
                for offset, token in enumerate(tokens):
                    if size == 512:
                        break
                    self.batch.token[size] = token
                    self.batch.pos[size] = positions[seq] + offset
                    self.batch.n_seq_id[size] = 1
                    self.batch.seq_id[size][0] = seq
                    self.batch.logits[size] = offset == len(tokens) - 1
                    size += 1
                rows.append((seq, size - 1))
            self.batch.n_tokens = size
            lib.llama_decode(self.ctx, self.batch)
            for seq, row in rows:
                positions[seq] += len(pending[seq])
                token = lib.llama_sampler_sample(samplers[seq], self.ctx, row)
                pending[seq] = [token]
                produced[seq] += 1
        elapsed = time.perf_counter() - started
        for chain in samplers:
            lib.llama_sampler_free(chain)
        return elapsed


async def one_stream(manager: ModelManager, prompt: str, options: dict[str, Any]) -> dict[str, float]:
    request = GenerateRequest(model="smollm2", prompt=prompt, raw=True, options=options)
    sent = time.perf_counter()
    first = 0.0
    final = None
    async for chunk in manager.generate(request):
        if chunk.response and not first:
            first = time.perf_counter()
        if chunk.done:
            final = chunk
    assert final is not None
    return {
        "ttft": first - sent,
        "tokens": final.eval_count,
        "rate": final.eval_count / (final.eval_duration / 1e9),
        "done": time.perf_counter(),
    }


async def measure(streams: list[int], tokens: int, num_ctx: int, runs: int) -> dict[str, Any]:
    """Each stream count: ember and the raw loop alternately, `runs` times; ratios are taken within each pair
    (the machine's speed drifts over seconds; a ratio of two runs made a moment apart cancels most of that)."""
    from ember.engine.llamacpp import physical_cores

    path = str(resolve_model("smollm2").path)
    results: dict[str, Any] = {}
    for count in streams:
        options = {
            "temperature": 0,
            "num_predict": tokens,
            "num_ctx": num_ctx,
            "num_parallel": count,
            "repeat_penalty": 1.0,
        }
        manager = ModelManager(keep_alive=-1)
        raw = RawBatchedLoop(path, num_ctx, count, physical_cores())
        raw.run([raw.tokenize(prompt_for(i)) for i in range(count)], 2)
        samples: list[dict[str, float]] = []
        try:
            await one_stream(manager, "warm up", {**options, "num_predict": 2})
            for run in range(1, runs + 1):
                prompts = [raw.tokenize(prompt_for(i, run)) for i in range(count)]
                # A pause before each side: llama.cpp's worker threads keep polling for a moment after a graph,
                # and the other side must not start while they do.
                await asyncio.sleep(0.3)
                started = time.perf_counter()
                streams_run = await asyncio.gather(
                    *(one_stream(manager, prompt_for(i, run), options) for i in range(count))
                )
                wall = max(run["done"] for run in streams_run) - started
                # The raw loop generates exactly as many tokens for each sequence as ember did for it.
                counts = [int(run["tokens"]) for run in streams_run]
                await asyncio.sleep(0.3)
                raw_rate = sum(counts) / raw.run(prompts, counts)
                ember_rate = sum(run["tokens"] for run in streams_run) / wall
                ttfts = sorted(run["ttft"] for run in streams_run)
                samples.append(
                    {
                        "aggregate_tok_s": ember_rate,
                        "raw_aggregate_tok_s": raw_rate,
                        "ratio_to_raw": ember_rate / raw_rate,
                        "per_stream_tok_s": statistics.median(run["rate"] for run in streams_run),
                        "ttft_p50_s": statistics.median(ttfts),
                        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
                    }
                )
            results[str(count)] = {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}
            if count == 8:
                results["latency"] = await late_arrival(manager, options)
        finally:
            await manager.close()
    return results


async def late_arrival(manager: ModelManager, options: dict[str, Any]) -> dict[str, float]:
    """TTFT of a short request that arrives while 7 streams decode, against a decode step plus its own prefill."""
    short = {**options, "num_predict": 4}
    alone = statistics.median([(await one_stream(manager, "Hello there, how", short))["ttft"] for _ in range(3)])
    busy_ttfts, step_gaps = [], []
    for _ in range(3):
        arrivals: list[float] = []

        async def background(index: int, arrivals: list[float] = arrivals) -> None:
            request = GenerateRequest(
                model="smollm2", prompt=prompt_for(index), raw=True, options={**options, "num_predict": 200}
            )
            async for chunk in manager.generate(request):
                if index == 0 and chunk.response:
                    arrivals.append(time.perf_counter())

        tasks = [asyncio.create_task(background(i)) for i in range(7)]
        while len(arrivals) < 10:
            await asyncio.sleep(0.005)
        busy_ttfts.append((await one_stream(manager, "Hello there, how", short))["ttft"])
        step_gaps.append(statistics.median(b - a for a, b in itertools.pairwise(arrivals)))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    budget = statistics.median(step_gaps) + alone
    ttft = statistics.median(busy_ttfts)
    return {
        "ttft_busy_p50_s": ttft,
        "decode_step_s": statistics.median(step_gaps),
        "ttft_alone_s": alone,
        "ratio_to_step_plus_prefill": ttft / budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--num-ctx", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="paired runs per stream count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    streams = [int(part) for part in args.streams.split(",")]

    from ember.engine.llamacpp import check_backend

    check_backend()  # routes llama.cpp's log lines to logging, so the raw loop prints nothing either
    results = asyncio.run(measure(streams, args.tokens, args.num_ctx, args.runs))
    if "1" in results:
        for count in streams:
            results[str(count)]["vs_single_stream"] = (
                results[str(count)]["aggregate_tok_s"] / results["1"]["aggregate_tok_s"]
            )
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"{'streams':>8}{'agg tok/s':>11}{'raw tok/s':>11}{'ratio':>7}{'vs 1':>7}{'stream tok/s':>14}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}"
    )
    for count in streams:
        entry = results[str(count)]
        print(
            f"{count:>8}{entry['aggregate_tok_s']:>11.1f}{entry['raw_aggregate_tok_s']:>11.1f}"
            f"{entry['ratio_to_raw']:>7.2f}{entry.get('vs_single_stream', 0):>7.2f}{entry['per_stream_tok_s']:>14.1f}"
            f"{entry['ttft_p50_s']:>10.3f}{entry['ttft_p99_s']:>10.3f}"
        )
    if "latency" in results:
        latency = results["latency"]
        print(
            f"short request while 7 streams decode: TTFT {latency['ttft_busy_p50_s']:.3f}s; one decode step "
            f"{latency['decode_step_s']:.3f}s + its prefill alone {latency['ttft_alone_s']:.3f}s; "
            f"ratio {latency['ratio_to_step_plus_prefill']:.2f}"
        )


if __name__ == "__main__":
    main()
