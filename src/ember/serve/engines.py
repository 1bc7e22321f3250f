"""Which engine serves a model, by its store entry: how its runner starts and what it costs to load.

Every model is served through the manager's `Runner` protocol (serve/entries.py), whatever produces its
tokens. `ModelSource.engine` names the engine; each engine adds its branch here and nowhere else in serve/.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ember.errors import ModelLoadError
from ember.options import LoadOptions
from ember.serve.entries import Runner
from ember.serve.memory import ModelEstimate, estimate_model
from ember.store.gguf_file import read_gguf
from ember.store.model_directory import ModelDirectory, read_model_directory
from ember.store.resolve import LLAMA_CPP, TRANSFORMERS, ModelSource
from ember.store.upstream import UPSTREAM

# An upstream model holds nothing on this machine: no weights, no KV.
_NOTHING_LOCAL = ModelEstimate(weights=0, per_layer=(), non_repeating=0, kv_cache=0, kv_per_layer=0, compute=0)


def start_runner_for(source: ModelSource, options: LoadOptions) -> Runner:
    """The runner of `source`'s engine (not started yet)."""
    if source.engine == LLAMA_CPP:
        from ember.runner.client import RunnerProcess

        return RunnerProcess(source, options)
    if source.engine == TRANSFORMERS:
        from ember.engine_transformers.runner import TransformersRunner

        return TransformersRunner(source, options)
    if source.engine == UPSTREAM:
        from ember.upstream.runner import UpstreamRunner

        return UpstreamRunner(source, options)
    raise ModelLoadError(f"{source.name} needs the {source.engine!r} engine, which this ember does not have")


async def estimate_for(source: ModelSource, options: LoadOptions) -> ModelEstimate:
    """The memory a load of `source` takes on this machine (the manager makes room for it first)."""
    if source.engine == LLAMA_CPP:
        info = await asyncio.to_thread(read_gguf, source.path)  # parsing a large header must not stall streams
        return estimate_model(info, options)
    if source.engine == TRANSFORMERS:
        directory = await asyncio.to_thread(read_model_directory, source.path)
        return transformers_estimate(directory, options)
    if source.engine == UPSTREAM:
        return _NOTHING_LOCAL
    raise ModelLoadError(f"{source.name} needs the {source.engine!r} engine, which this ember does not have")


def expires(source: ModelSource) -> bool:
    """Whether keep_alive unloads the model when idle. An upstream model holds no memory here and is kept, with
    its connections and health checks, until `ember stop` (or keep_alive 0) unloads it."""
    return source.engine != UPSTREAM


def replica_health(runner: Runner) -> list[dict[str, Any]] | None:
    """An upstream model's replicas (URL, health, requests in flight, last error); None for a local model."""
    status = getattr(runner, "replica_status", None)
    return status() if callable(status) else None


def transformers_estimate(directory: ModelDirectory, options: LoadOptions) -> ModelEstimate:
    """A transformers model's memory: its weights in the loaded dtype, a KV cache of num_ctx x num_parallel
    tokens in that dtype, and the logits of one prefill (torch's activations are freed between layers)."""
    weights = directory.weights_bytes_as(options.dtype)
    element = 2 if options.dtype in ("float16", "bfloat16") else 4
    kv_cache = directory.kv_bytes_per_token(element) * options.num_ctx * options.num_parallel
    vocab = int(directory.config.get("vocab_size") or 0)
    compute = 4 * vocab * min(options.num_batch, options.num_ctx) * options.num_parallel
    return ModelEstimate(
        weights=weights, per_layer=(), non_repeating=weights, kv_cache=kv_cache, kv_per_layer=0, compute=compute
    )
