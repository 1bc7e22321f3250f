"""What the manager keeps per loaded model, what it needs of a runner, and a row of `ember ps`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ember.options import LoadOptions
from ember.serve.memory import ModelEstimate
from ember.serve.queue import RequestQueue
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, GenerateRequest, GenerateResponse


class Runner(Protocol):
    """What the manager needs of a runner; RunnerProcess in production, fakes in unit tests."""

    facts: dict[str, Any]
    on_crash: Callable[[str], None] | None  # the manager's: told when the runner dies unasked

    @property
    def alive(self) -> bool: ...

    async def start(self) -> dict[str, Any]: ...

    # `n` completions of the request (1 for most), as (choice index, chunk) in the order they come.
    def generate_choices(self, request: GenerateRequest, n: int) -> AsyncIterator[tuple[int, GenerateResponse]]: ...

    def chat_choices(self, request: ChatRequest, n: int) -> AsyncIterator[tuple[int, ChatResponse]]: ...

    async def embed(self, request: EmbedRequest) -> EmbedResponse: ...

    async def stop(self, timeout: float = 5.0) -> None: ...


@dataclass
class LoadedModelEntry:
    name: str
    source: ModelSource
    requested: LoadOptions  # what requests asked for (num_gpu may be -1: automatic)
    options: LoadOptions  # what was loaded after the GPU plan and any fallback
    runner: Runner
    queue: RequestQueue
    estimate: ModelEstimate
    load_note: str
    keep_alive: float | None
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall clock, for `ps`
    active: int = 0  # requests holding or waiting for a slot
    timer: asyncio.TimerHandle | None = None
    draining: bool = False  # to be unloaded as soon as it is idle (replaced, or stopped)

    @property
    def idle(self) -> bool:
        return self.active == 0


@dataclass(frozen=True)
class RunningModel:
    """One row of `ember ps`."""

    name: str
    digest: str | None
    size: int
    size_vram: int
    gpu_layers: int
    num_ctx: int
    slots: int
    slots_in_use: int
    queued: int
    expires_at: float | None
    load_note: str
    replicas: list[dict[str, Any]] | None = None  # an upstream model's replicas and their health
