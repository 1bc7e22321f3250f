"""llama-bench's tests, run through ember's own engine in this process.

For each (threads, n_batch) pair the model is loaded once (a LoadedModel with those load options), then:

- `pp N` (prompt processing): a prompt of exactly N tokens is prefilled; the rate is N over the engine's prompt
  eval duration (admission to the first logits).
- `tg N` (text generation): from a short prompt, N tokens are decoded one per step, greedily, with every
  end-of-generation token banned so that exactly N come out; the rate is N over the time from the first logits
  to the last token.

Each test runs once as a warm-up (not counted), then `repetitions` times; the engine's prefix cache is cleared
before every run, so each one prefills for real. Rates are reported as mean ± sample standard deviation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ember.benchmark.stats import mean_sd
from ember.loaded_model import LoadedModel
from ember.options import load_options, sampling_options
from ember.store.resolve import resolve_model

TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories to the "
    "children every evening. His stories were about storms, distant islands, and the creatures of the deep. "
)
SHORT_PROMPT = "Once upon a time"


@dataclass
class TestResult:
    """One row of the table: a test at one (threads, n_batch) setting, with the rate of every repetition."""

    threads: int
    n_batch: int
    test: str  # "pp512", "tg128"
    n_prompt: int
    n_gen: int
    samples_ts: list[float] = field(default_factory=list)

    @property
    def avg_ts(self) -> float:
        return mean_sd(self.samples_ts)[0]

    @property
    def stddev_ts(self) -> float:
        return mean_sd(self.samples_ts)[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "n_batch": self.n_batch,
            "test": self.test,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            "samples_ts": self.samples_ts,
        }


@dataclass
class LocalReport:
    model: str  # the name it was asked for
    description: str  # llama.cpp's, e.g. "llama ?B Q4_1"
    size_bytes: int
    n_params: int
    repetitions: int
    whole_batches: bool
    results: list[TestResult]

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": "local",
            "model": self.model,
            "model_type": self.description,
            "model_size": self.size_bytes,
            "model_n_params": self.n_params,
            "repetitions": self.repetitions,
            "whole_batches": self.whole_batches,
            "results": [result.as_dict() for result in self.results],
        }


class _Bench:
    """The tests on one loaded model."""

    def __init__(self, model: LoadedModel, whole_batches: bool) -> None:
        self.model = model
        if whole_batches:  # llama-bench's way, ember's default too; even when EMBER_DETERMINISTIC asks for exact chunks
            model.engine.scheduler.deterministic = False
        llama = model.model
        self.bos = [llama.bos_token] if llama.add_bos and llama.bos_token >= 0 else []
        self.text_tokens = llama.tokenize(TEXT, add_special=False, parse_special=False)
        self.short = self.bos + llama.tokenize(SHORT_PROMPT, add_special=False, parse_special=False)
        # Banned so that generation never stops early: tg N must decode exactly N tokens.
        self.no_end = {token: -100.0 for token in range(llama.n_vocab) if llama.is_end_of_generation(token)}

    def prompt(self, n_tokens: int) -> list[int]:
        tokens = list(self.bos)
        while len(tokens) < n_tokens:
            tokens.extend(self.text_tokens)
        return tokens[:n_tokens]

    def _run(self, tokens: list[int], num_predict: int) -> tuple[int, int]:
        """Prompt eval and eval durations (ns) of one fresh run."""
        sampling = sampling_options(
            {"temperature": 0, "repeat_penalty": 1.0, "num_predict": num_predict, "logit_bias": self.no_end or None}
        )
        self.model.engine.forget_cache()
        sequence = None
        for update in self.model.complete_tokens(tokens, sampling):
            sequence = update.sequence
        assert sequence is not None
        return sequence.prompt_eval_duration_ns, sequence.eval_duration_ns

    def pp(self, n_tokens: int) -> float:
        prompt_ns, _ = self._run(self.prompt(n_tokens), 1)
        return n_tokens / max(prompt_ns, 1) * 1e9

    def tg(self, n_tokens: int) -> float:
        # num_predict N + 1: the first token comes from the prompt's logits, the other N from N decode steps.
        _, eval_ns = self._run(self.short, n_tokens + 1)
        return n_tokens / max(eval_ns, 1) * 1e9


def run_local(
    model_name: str,
    *,
    n_prompt: list[int],
    n_gen: list[int],
    repetitions: int,
    threads: list[int],
    batch_sizes: list[int],
    whole_batches: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LocalReport:
    """Every test at every (threads, n_batch) pair; each pair loads the model once."""
    source = resolve_model(model_name)
    short_room = 16 + max(n_gen, default=0) + 2
    num_ctx = max(max(n_prompt, default=0) + 2, short_room, 64)
    num_ctx = -(-num_ctx // 256) * 256
    tests = [("pp", n) for n in n_prompt] + [("tg", n) for n in n_gen]
    results: list[TestResult] = []
    description, size_bytes, n_params = "", 0, 0
    for thread_count in threads:
        for n_batch in batch_sizes:
            options = load_options({"num_ctx": num_ctx, "num_batch": n_batch, "num_thread": thread_count})
            model = LoadedModel(source, options)
            try:
                bench = _Bench(model, whole_batches)
                llama = model.model
                description, size_bytes, n_params = llama.description(), llama.size_bytes, llama.n_params
                for kind, n_tokens in tests:
                    run = bench.pp if kind == "pp" else bench.tg
                    result = TestResult(
                        threads=thread_count,
                        n_batch=n_batch,
                        test=f"{kind}{n_tokens}",
                        n_prompt=n_tokens if kind == "pp" else 0,
                        n_gen=n_tokens if kind == "tg" else 0,
                    )
                    if progress is not None:
                        progress(f"{result.test}, {thread_count} threads, n_batch {n_batch}")
                    run(n_tokens)  # warm-up, not counted
                    for _ in range(repetitions):
                        time.sleep(0.05)  # llama.cpp's worker threads spin a moment after a graph; let them rest
                        result.samples_ts.append(run(n_tokens))
                    results.append(result)
            finally:
                model.close()
    return LocalReport(
        model=source.name,
        description=description,
        size_bytes=size_bytes,
        n_params=n_params,
        repetitions=repetitions,
        whole_batches=whole_batches,
        results=results,
    )
