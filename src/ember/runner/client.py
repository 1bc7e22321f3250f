"""The server's side of a runner process: start it, stream requests through it, notice when it dies.

A thread reads the pipe (a blocking `recv`) and hands each message to the event loop; each request has an
asyncio queue its stream reads from. When the pipe closes without a shutdown, every request still in flight
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
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from ember.errors import EmberError, EngineError, ModelLoadError
from ember.options import LoadOptions
from ember.runner.protocol import error_from_tuple
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
    TokenLogprob,
)

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class RunnerCrashedError(EngineError):
    """The runner process died while requests were in flight (killed, out of memory, a crash in llama.cpp)."""

    http_status = 500


class RunnerProcess:
    """One model loaded in its own process. Use from one event loop."""

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        self.source = source
        self.options = options
        self.facts: dict[str, Any] = {}
        self._connection: Any = None
        self._process: Any = None
        self._streams: dict[str, asyncio.Queue[tuple[Any, ...]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._dead = False
        self._stopping = False

    @property
    def alive(self) -> bool:
        return not self._dead and self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def start(self) -> dict[str, Any]:
        """Start the process and wait until the model is loaded; raises the runner's load error."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        parent_socket, child_socket = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "ember.runner.process", str(child_socket.fileno())],
            pass_fds=[child_socket.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child_socket.close()
        self._connection = Connection(parent_socket.detach())
        self._send(("start", self.source, self.options, logging.getLogger("ember").getEffectiveLevel()))
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

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "steps":
            for event in message[1]:
                queue = self._streams.get(event[1])
                if queue is not None:
                    queue.put_nowait(event)
        elif kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(message[1])
        elif kind == "load_failed" and self._ready is not None and not self._ready.done():
            self._ready.set_exception(error_from_tuple(message[1]))

    def _closed(self) -> None:
        self._dead = True
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        status = self._describe_exit()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                ModelLoadError(f"the runner for {self.source.name} exited while loading ({status})")
            )
        if self._stopping:
            return
        log.error("runner for %s stopped unexpectedly (%s)", self.source.name, status)
        for request_id, queue in self._streams.items():
            queue.put_nowait(("crashed", request_id, status))

    def _describe_exit(self) -> str:
        code = self._process.returncode if self._process is not None else None
        if code is None:
            return "exit status unknown"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateResponse]:
        async for kind, payload in self._stream("generate", request.model_dump(mode="json")):
            if kind == "text":  # built without validation: this runs for every token
                yield GenerateResponse.model_construct(model=request.model, response=payload)
            elif kind == "logprobs":  # text (possibly "") and the logprob entry of its token
                logprobs = [TokenLogprob.model_validate(entry) for entry in payload[1]]
                yield GenerateResponse.model_construct(model=request.model, response=payload[0], logprobs=logprobs)
            else:
                yield GenerateResponse.model_validate(payload)

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatResponse]:
        async for kind, payload in self._stream("chat", request.model_dump(mode="json")):
            if kind == "text":
                message = Message.model_construct(role="assistant", content=payload)
                yield ChatResponse.model_construct(model=request.model, message=message)
            elif kind == "logprobs":
                message = Message.model_construct(role="assistant", content=payload[0])
                logprobs = [TokenLogprob.model_validate(entry) for entry in payload[1]]
                yield ChatResponse.model_construct(model=request.model, message=message, logprobs=logprobs)
            elif kind == "prefill":
                message = Message.model_construct(role="assistant", content="")
                progress = PrefillProgress(done=payload[0], total=payload[1])
                yield ChatResponse.model_construct(model=request.model, message=message, prefill=progress)
            else:
                yield ChatResponse.model_validate(payload)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """The request's vectors as the model pooled them (not normalized)."""
        result: Any = None
        async for _, payload in self._stream("embed", request.model_dump(mode="json")):
            result = payload
        return EmbedResponse.model_validate(result)

    async def _stream(self, kind: str, payload: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        if not self.alive:
            raise RunnerCrashedError(f"the runner for {self.source.name} is not running; send the request again")
        request_id = f"r{next(_ids)}"
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            self._send((kind, request_id, payload))
            while True:
                event = await queue.get()
                if event[0] == "text":
                    yield ("text", event[2]) if len(event) == 3 else ("logprobs", event[2:])
                elif event[0] == "chunk":  # a chat chunk with tool calls
                    yield "chunk", event[2]
                elif event[0] == "prefill":  # prompt tokens read, of all (report_prefill)
                    yield "prefill", event[2:]
                elif event[0] in ("done", "embedded"):
                    finished = True
                    yield "done", event[2]
                    return
                elif event[0] == "error":
                    finished = True
                    raise error_from_tuple(event[2])
                else:  # crashed
                    finished = True
                    raise RunnerCrashedError(
                        f"the runner for {self.source.name} stopped unexpectedly ({event[2]}) during this request; "
                        "the next request starts a fresh one"
                    )
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.alive:  # the caller went away: free the slot in the engine
                with contextlib.suppress(OSError, EmberError):
                    self._send(("cancel", request_id))

    def _send(self, message: tuple[Any, ...]) -> None:
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
                self._send(("shutdown",))
        try:
            await asyncio.to_thread(self._process.wait, timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait, timeout)
        for request_id, queue in self._streams.items():
            queue.put_nowait(("error", request_id, ("EngineError", "the model was unloaded during this request", 503)))
        with contextlib.suppress(OSError, ValueError):
            if self._loop is not None:
                self._loop.remove_reader(self._connection.fileno())
            self._connection.close()
