"""Which engine serves a model, by its store entry: how its runner starts and what it costs to load.

Every model is served through the manager's `Runner` protocol (serve/entries.py), whatever produces its
tokens. `ModelSource.engine` names the engine; each engine adds its branch here and nowhere else in serve/.
"""

from __future__ import annotations

import asyncio

from ember.errors import ModelLoadError
from ember.options import LoadOptions
from ember.serve.entries import Runner
from ember.serve.memory import ModelEstimate, estimate_model
from ember.store.gguf_file import read_gguf
from ember.store.resolve import LLAMA_CPP, ModelSource


def start_runner_for(source: ModelSource, options: LoadOptions) -> Runner:
    """The runner of `source`'s engine (not started yet)."""
    if source.engine == LLAMA_CPP:
        from ember.runner.client import RunnerProcess

        return RunnerProcess(source, options)
    raise ModelLoadError(f"{source.name} needs the {source.engine!r} engine, which this ember does not have")


async def estimate_for(source: ModelSource, options: LoadOptions) -> ModelEstimate:
    """The memory a load of `source` takes on this machine (the manager makes room for it first)."""
    if source.engine == LLAMA_CPP:
        info = await asyncio.to_thread(read_gguf, source.path)  # parsing a large header must not stall streams
        return estimate_model(info, options)
    raise ModelLoadError(f"{source.name} needs the {source.engine!r} engine, which this ember does not have")
