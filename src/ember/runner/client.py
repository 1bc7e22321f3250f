"""The server's side of a runner process: start it, stream requests through it, notice when it dies.

The event loop watches the pipe (`add_reader`) and hands each event to its request's asyncio queue, which
that request's stream reads. When the pipe closes without a shutdown, every request still in flight
gets a RunnerCrashedError naming the exit status, and the runner is marked dead so the manager starts another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ember.errors import EmberError, EngineError, ModelLoadError
from ember.options import LoadOptions
from ember.runner.protocol import (
    Cancel,
    Done,
    Embedded,
    Event,
    Failed,
    LoadFailed,
    Prefill,
    Ready,
    RunnerStats,
    Shutdown,
    Start,
    Steps,
    Text,
    ToolCalls,
    error_from_tuple,
)
from ember.store.resolve import ModelSource
from ember.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    Message,
    PrefillProgress,
)

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class RunnerCrashedError(EngineError):
    """The runner process died while requests were in flight (killed, out of memory, a crash in llama.cpp)."""

    http_status = 500


class _Crashed(NamedTuple):
    """Put in every open stream when the runner's pipe closes unexpectedly."""

    status: str


class RunnerProcess:
    """One model loaded in its own process. Use from one event loop."""

    module = "ember.runner.process"  # the process's main module: each engine's runner speaks runner/protocol.py

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        self.source = source
        self.options = options
        self.facts: dict[str, Any] = {}
        self._connection: Any = None
        self._process: Any = None
        self._streams: dict[str, asyncio.Queue[Event | _Crashed]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._dead = False
        self._stopping = False
        self.on_crash: Callable[[str], None] | None = None  # told the exit status when the process dies unasked
        self.stats: RunnerStats | None = None  # the runner's last report of its KV cells and memory

    @property
    def alive(self) -> bool:
        return not self._dead and self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> dict[str, Any]:
        """Start the process and wait until the model is loaded; raises the runner's load error."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        parent_socket, child_socket = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, str(child_socket.fileno())],
            pass_fds=[child_socket.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child_socket.close()
        self._connection = Connection(parent_socket.detach())
        self._send(("start", self.source, self.options, logging.getLogger("ember").getEffectiveLevel()))  # the load
        # The event loop itself watches the pipe: no reader thread, so one wake-up per engine step, which
        # matters on a small machine where every extra runnable thread can stall llama.cpp's worker threads.
        self._loop.add_reader(self._connection.fileno(), self._readable)
        self.facts = await self._ready
        return self.facts

    def _readable(self) -> None:
        try:
            while self._connection.poll():
                self._dispatch(self._connection.recv())
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(self._connection.fileno())
            self._closed()

    def _dispatch(self, message: Steps | Ready | LoadFailed | RunnerStats) -> None:
        if isinstance(message, RunnerStats):
            self.stats = message
        elif isinstance(message, Steps):
            for event in message.events:
                queue = self._streams.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)
        elif isinstance(message, Ready) and self._ready is not None and not self._ready.done():
            self._ready.set_result(message.facts)
        elif isinstance(message, LoadFailed) and self._ready is not None and not self._ready.done():
            self._ready.set_exception(error_from_tuple(message.error))

    def _closed(self) -> None:
        self._dead = True
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        status = self._describe_exit()
        if self._ready is not None and not self._ready.done():
            failure = ModelLoadError(f"the runner for {self.source.name} exited while loading ({status})")
            failure.transient = True  # killed or crashed, not refused by llama.cpp: worth another try
            self._ready.set_exception(failure)
        if self._stopping or not self.facts:  # stopped on purpose, or ended with its load (a load error, not a crash)
            return
        log.error("runner for %s stopped unexpectedly (%s)", self.source.name, status)
        for queue in self._streams.values():
            queue.put_nowait(_Crashed(status))
        if self.on_crash is not None:
            self.on_crash(status)

    def _describe_exit(self) -> str:
        code = self._process.returncode if self._process is not None else None
        if code is None:
            return "exit status unknown"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    async def generate_choices(self, request: GenerateRequest, n: int) -> AsyncIterator[tuple[int, GenerateResponse]]:
        """`n` completions of one prompt (prefilled once), as (choice index, chunk) in the order they come."""
        async for index, event in self._stream("generate", request.model_dump(mode="json"), n):
            if isinstance(event, Text):  # built without validation: this runs for every token
                yield (
                    index,
                    GenerateResponse.model_construct(
                        model=request.model,
                        response=event.text,
                        thinking=event.thinking or None,
                        logprobs=list(event.logprobs) if event.logprobs else None,
                        tokens=event.tokens,
                    ),
                )
            elif isinstance(event, Done) and isinstance(event.final, GenerateResponse):
                yield index, event.final

    async def chat_choices(self, request: ChatRequest, n: int) -> AsyncIterator[tuple[int, ChatResponse]]:
        async for index, event in self._stream("chat", request.model_dump(mode="json"), n):
            if isinstance(event, Text):
                message = Message.model_construct(role="assistant", content=event.text, thinking=event.thinking or None)
                logprobs = list(event.logprobs) if event.logprobs else None
                yield (
                    index,
                    ChatResponse.model_construct(
                        model=request.model, message=message, logprobs=logprobs, tokens=event.tokens
                    ),
                )
            elif isinstance(event, ToolCalls):
                message = Message.model_construct(role="assistant", content="", tool_calls=list(event.calls))
                yield index, ChatResponse.model_construct(model=request.model, message=message)
            elif isinstance(event, Prefill):
                message = Message.model_construct(role="assistant", content="")
                progress = PrefillProgress(done=event.done, total=event.total)
                yield index, ChatResponse.model_construct(model=request.model, message=message, prefill=progress)
            elif isinstance(event, Done) and isinstance(event.final, ChatResponse):
                yield index, event.final

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """The request's vectors as the model pooled them (not normalized)."""
        async for _, event in self._stream("embed", request.model_dump(mode="json"), 1):
            if isinstance(event, Embedded):
                return event.response
        raise RunnerCrashedError(f"the runner for {self.source.name} ended an embed request without vectors")

    async def _stream(self, kind: str, payload: dict[str, Any], choices: int) -> AsyncIterator[tuple[int, Event]]:
        """The events of one request, until each of its `choices` is done (or it fails)."""
        if not self.alive:
            raise RunnerCrashedError(f"the runner for {self.source.name} is not running; send the request again")
        request_id = f"r{next(_ids)}"
        queue: asyncio.Queue[Event | _Crashed] = asyncio.Queue()
        self._streams[request_id] = queue
        remaining = choices
        try:
            self._send(Start(kind, request_id, payload, choices))
            while remaining:
                event = await queue.get()
                if isinstance(event, Failed):
                    raise error_from_tuple(event.error)
                if isinstance(event, _Crashed):
                    raise RunnerCrashedError(
                        f"the runner for {self.source.name} stopped unexpectedly ({event.status}) during this "
                        "request; the next request starts a fresh one"
                    )
                if isinstance(event, Embedded) or (isinstance(event, Done) and event.final.done_reason == "load"):
                    remaining = 0
                elif isinstance(event, Done):
                    remaining -= 1
                index = event.index if isinstance(event, Text | ToolCalls | Done) else 0
                yield index, event
        finally:
            self._streams.pop(request_id, None)
            if remaining and self.alive:  # the caller went away, or a choice failed: free the others' slots
                with contextlib.suppress(OSError, EmberError):
                    self._send(Cancel(request_id))

    def _send(self, message: Start | Cancel | Shutdown | tuple[Any, ...]) -> None:
        try:
            self._connection.send(message)
        except (OSError, ValueError) as error:
            raise RunnerCrashedError(f"cannot reach the runner for {self.source.name}: {error}") from None

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit (in-flight requests are cancelled), and make sure it does."""
        self._stopping = True
        if self._process is None:
            return
        if self.alive:
            with contextlib.suppress(OSError, EmberError):
                self._send(Shutdown())
        try:
            await asyncio.to_thread(self._process.wait, timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait, timeout)
        for request_id, queue in self._streams.items():
            queue.put_nowait(Failed(request_id, ("EngineError", "the model was unloaded during this request", 503)))
        with contextlib.suppress(OSError, ValueError):
            if self._loop is not None:
                self._loop.remove_reader(self._connection.fileno())
            self._connection.close()
