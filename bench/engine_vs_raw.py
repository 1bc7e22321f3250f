"""ember's engine against a minimal raw llama-cpp-python loop, on the same model, threads and prompt.

Both sides load the same GGUF with the same context size and threads, prefill the same prompt tokens in one
batch, then decode greedily one token per step. Timed from outside in the same way for both:
prefill = until the first token is sampled; decode = from the first to the last token.
Runs come in pairs (raw and ember, alternating which goes first); a ratio is taken within each pair and the
median of the ratios is reported, with the median rates of each side.

    .venv/bin/python bench/engine_vs_raw.py [--model smollm2] [--tokens 128] [--prompt-tokens 256] [--runs 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import llama_cpp as lib

from ember.engine.llamacpp import extra_buffer_types_are_safe
from ember.loaded_model import LoadedModel
from ember.options import load_options, sampling_options
from ember.store.resolve import resolve_model

STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories to the "
    "children every evening. His stories were about storms, distant islands, and the creatures of the deep. "
)


class RawLoop:
    """The least code that decodes with llama.cpp: one batch, one greedy sampler, nothing else."""

    def __init__(self, path: str, num_ctx: int, threads: int, batch: int) -> None:
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffer_types_are_safe()  # as ember loads it
        self.model = lib.llama_model_load_from_file(path.encode(), params)
        self.vocab = lib.llama_model_get_vocab(self.model)
        params = lib.llama_context_default_params()
        params.n_ctx = num_ctx
        params.n_batch = batch
        params.n_ubatch = min(batch, 512)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.batch = lib.llama_batch_init(batch, 0, 1)
        self.sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self.sampler, lib.llama_sampler_init_greedy())
        self.piece = ctypes.create_string_buffer(64)

    def _fill(self, tokens: list[int], start: int) -> None:
        for i, token in enumerate(tokens):
            self.batch.token[i] = token
            self.batch.pos[i] = start + i
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
            self.batch.logits[i] = i == len(tokens) - 1
        self.batch.n_tokens = len(tokens)

    def run(self, prompt: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        started = time.perf_counter()
        self._fill(prompt, 0)
        lib.llama_decode(self.ctx, self.batch)
        out = [lib.llama_sampler_sample(self.sampler, self.ctx, -1)]
        first = time.perf_counter()
        position = len(prompt)
        while len(out) < n_tokens:
            self._fill([out[-1]], position)
            position += 1
            lib.llama_decode(self.ctx, self.batch)
            token = lib.llama_sampler_sample(self.sampler, self.ctx, -1)
            lib.llama_token_to_piece(self.vocab, token, self.piece, 64, 0, False)  # as any real loop must
            out.append(token)
        last = time.perf_counter()
        return first - started, last - first, out


def run_ember(model: LoadedModel, prompt: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    sampling = sampling_options({"temperature": 0, "repeat_penalty": 1.0, "num_predict": n_tokens})
    model.engine.forget_cache()  # the same prompt every run: measure a real prefill, not a cache hit
    started = time.perf_counter()
    first = last = 0.0
    tokens: list[int] = []
    for update in model.complete_tokens(prompt, sampling):
        now = time.perf_counter()
        if update.token is not None:
            tokens.append(update.token)
            if len(tokens) == 1:
                first = now
            last = now
    return first - started, last - first, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0 = ember's default (physical cores)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    source = resolve_model(args.model)
    options = load_options({"num_ctx": 2048, "num_batch": 512, "num_thread": args.threads})
    ember_model = LoadedModel(source, options)
    threads = ember_model.engine.context.threads
    raw = RawLoop(str(source.path), 2048, threads, 512)

    text_tokens = ember_model.model.tokenize(STORY * 20, add_special=False, parse_special=False)
    prompt = text_tokens[: args.prompt_tokens]
    # ember stops at an end-of-generation token; the raw loop generates exactly as many tokens as ember did.
    _, _, reference = run_ember(ember_model, prompt, args.tokens)
    n_tokens = len(reference)

    figures: dict[str, list[float]] = {"raw_prefill": [], "raw_decode": [], "ember_prefill": [], "ember_decode": []}
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for run in range(args.runs):
        # Alternate which side goes first, and compare each pair of neighbouring runs: on a shared machine the
        # speed drifts over seconds, and a ratio of two runs made a moment apart cancels most of that drift.
        sides = [
            ("raw", lambda: raw.run(prompt, n_tokens)),
            ("ember", lambda: run_ember(ember_model, prompt, n_tokens)),
        ]
        pair = {}
        for name, runner in sides if run % 2 == 0 else sides[::-1]:
            prefill, decode, tokens = runner()
            if tokens != reference[:n_tokens]:
                raise SystemExit(f"{name} produced different tokens; the comparison is void")
            pair[name] = (len(prompt) / prefill, (n_tokens - 1) / decode)
        for name, (prefill_rate, decode_rate) in pair.items():
            figures[f"{name}_prefill"].append(prefill_rate)
            figures[f"{name}_decode"].append(decode_rate)
        ratios["prefill"].append(pair["ember"][0] / pair["raw"][0])
        ratios["decode"].append(pair["ember"][1] / pair["raw"][1])

    medians = {name: statistics.median(values) for name, values in figures.items()}
    result = {
        "model": source.name,
        "threads": threads,
        "prompt_tokens": len(prompt),
        "generated_tokens": n_tokens,
        "runs": args.runs,
        **{f"{name}_tok_s": round(value, 1) for name, value in medians.items()},
        "prefill_ratio": round(statistics.median(ratios["prefill"]), 3),
        "decode_ratio": round(statistics.median(ratios["decode"]), 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"model {result['model']}, {threads} threads, prompt {len(prompt)} tokens, {n_tokens} generated, "
        f"median of {args.runs} paired runs"
    )
    print(f"{'':8}{'prefill tok/s':>16}{'decode tok/s':>16}")
    print(f"{'raw':8}{medians['raw_prefill']:16.1f}{medians['raw_decode']:16.1f}")
    print(f"{'ember':8}{medians['ember_prefill']:16.1f}{medians['ember_decode']:16.1f}")
    print(f"{'ratio':8}{result['prefill_ratio']:16.3f}{result['decode_ratio']:16.3f}   (median of per-pair ratios)")


if __name__ == "__main__":
    main()
