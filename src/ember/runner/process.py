"""The runner process: one loaded model, its engine loop, and the pipe to the server.

A runner crash (a segfault in llama.cpp, an out-of-memory kill) takes down only this process: the server sees
the pipe close, fails the requests that were in flight here, and starts a fresh runner for the next request.

The loop reads every waiting message, makes one engine step, and sends what the step produced in one message,
so the cost of the pipe is paid once per step, not once per token per request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from ember.embeddings import EmbedJob
from ember.engine.sequence import Phase, Sequence
from ember.loaded_model import Job, LoadedModel
from ember.logprobs import logprob_entries
from ember.options import LoadOptions
from ember.runner.protocol import error_to_tuple
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, EmbedRequest, GenerateRequest

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 0.025  # seconds plain text may wait to travel with later text (see _Runner.flush)


class _Runner:
    def __init__(self, connection: Connection, model: LoadedModel) -> None:
        self.connection = connection
        self.model = model
        self.jobs: dict[int, tuple[str, Job]] = {}  # sequence id -> (request id, job)
        self.by_request: dict[str, Sequence] = {}
        self.events: list[tuple[Any, ...]] = []
        self.urgent = False  # an event the server should see now: a first token, an end, an error
        self.last_flush = 0.0
        self.started: set[str] = set()  # requests whose first text was sent
        self.running = True
        self.embeds: deque[tuple[str, EmbedJob]] = deque()  # embedding requests, one input per loop turn
        self.prefill_watch: dict[str, int] = {}  # request id -> prompt tokens last reported (report_prefill)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("generate", "chat"):
            self.start(kind, message[1], message[2])
        elif kind == "embed":
            self.start_embed(message[1], message[2])
        elif kind == "cancel":
            sequence = self.by_request.get(message[1])
            if sequence is not None:
                self.model.engine.cancel(sequence)
            elif any(request_id == message[1] for request_id, _ in self.embeds):
                self.embeds = deque(entry for entry in self.embeds if entry[0] != message[1])
        elif kind == "shutdown":
            self.running = False

    def start(self, kind: str, request_id: str, payload: dict[str, Any]) -> None:
        try:
            if kind == "generate":
                job = self.model.start_generate(GenerateRequest.model_validate(payload))
            else:
                job = self.model.start_chat(ChatRequest.model_validate(payload))
        except Exception as error:  # a bad request fails alone; the runner goes on
            self.events.append(("error", request_id, error_to_tuple(error)))
            self.urgent = True
            return
        if not isinstance(job, Job):  # answered at once (a load-only request)
            self.events.append(("done", request_id, job.model_dump()))
            self.urgent = True
            return
        self.jobs[job.sequence.id] = (request_id, job)
        self.by_request[request_id] = job.sequence
        if payload.get("report_prefill"):
            self.prefill_watch[request_id] = -1

    def start_embed(self, request_id: str, payload: dict[str, Any]) -> None:
        try:
            self.embeds.append((request_id, self.model.start_embed(EmbedRequest.model_validate(payload))))
        except Exception as error:
            self.events.append(("error", request_id, error_to_tuple(error)))
            self.urgent = True

    def embed_step(self) -> None:
        """Embed one input of the oldest embedding request (generation steps go on between inputs)."""
        request_id, job = self.embeds[0]
        try:
            job.step()
            if not job.done:
                return
            self.events.append(("embedded", request_id, job.result().model_dump()))
        except Exception as error:
            self.events.append(("error", request_id, error_to_tuple(error)))
        self.embeds.popleft()
        self.urgent = True

    def step(self) -> None:
        for update in self.model.engine.step():
            entry = self.jobs.get(update.sequence.id)
            if entry is None:
                continue
            request_id, job = entry
            if not update.done:
                text = update.text
                if job.parses_text:  # the job holds back what may be a tool call or a tag, and parses it
                    text, chunk = job.stream_parts(update)
                    if chunk is not None:
                        self.events.append(("chunk", request_id, chunk))
                        self.urgent = True
                if update.logprob is not None:  # asked for: the token's logprob entry travels with its text
                    entries = [entry.model_dump() for entry in logprob_entries(self.model.model, update) or ()]
                    self.events.append(("text", request_id, text, entries))
                if text:  # the common case, per token: no response object is built here
                    if update.logprob is None:
                        self.events.append(("text", request_id, text))
                    if request_id not in self.started:
                        self.started.add(request_id)
                        self.urgent = True
                continue
            self.urgent = True
            self.started.discard(request_id)
            try:
                chunk = job.chunk(update)
            except Exception as error:
                chunk = None
                self.events.append(("error", request_id, error_to_tuple(error)))
            if update.done:
                del self.jobs[update.sequence.id]
                self.by_request.pop(request_id, None)
                if chunk is not None:
                    self.events.append(("done", request_id, chunk.model_dump()))

    def report_prefill(self) -> None:
        """For requests that asked: how much of the prompt is in, after each step that read a part of it."""
        for request_id, reported in list(self.prefill_watch.items()):
            sequence = self.by_request.get(request_id)
            if sequence is None or sequence.phase not in (Phase.WAITING, Phase.PREFILL):
                del self.prefill_watch[request_id]  # its first token (or its end) says the rest
            elif sequence.n_past != reported:
                self.prefill_watch[request_id] = sequence.n_past
                self.events.append(("prefill", request_id, sequence.n_past, len(sequence.prompt_tokens)))

    def flush(self, *, force: bool = False) -> None:
        """Send what the steps produced. Plain text waits up to FLUSH_INTERVAL to travel with the next steps'
        text: each message wakes the server (and its client), and on a small machine every wake-up can delay
        llama.cpp's worker threads. A first token, an end or an error goes at once."""
        if not self.events:
            return
        now = time.monotonic()
        if not force and not self.urgent and now - self.last_flush < FLUSH_INTERVAL:
            return
        events, self.events = self.events, []
        self.urgent = False
        self.last_flush = now
        self.connection.send(("steps", events))

    def loop(self) -> None:
        engine = self.model.engine
        while self.running:
            # Block while idle; while there is work, only take what has already arrived.
            wait: float | None = 0 if engine.has_work() or self.events or self.embeds else None
            while self.connection.poll(wait):
                self.handle(self.connection.recv())
                wait = 0
                if not self.running:
                    break
            if engine.has_work():
                self.step()
                if self.prefill_watch:
                    self.report_prefill()
            if self.embeds:
                self.embed_step()
            self.flush(force=not engine.has_work())


def runner_main(connection: Connection, source: ModelSource, options: LoadOptions, log_level: int) -> None:
    """Load the model and serve requests from the pipe until shut down or the server goes away."""
    logging.basicConfig(level=log_level, format=f"ember runner {os.getpid()}: %(levelname)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it shuts runners down
    try:
        model = LoadedModel(source, options)
    except BaseException as error:
        connection.send(("load_failed", error_to_tuple(error)))
        connection.close()
        return
    facts = {
        "pid": os.getpid(),
        "load_duration": model.load_duration_ns,
        "gpu_layers": model.model.gpu_layers,
        "num_parallel": options.num_parallel,
    }
    connection.send(("ready", facts))
    runner = _Runner(connection, model)
    try:
        runner.loop()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        model.close()
        connection.close()


def main() -> None:
    """`python -m ember.runner.process FD`: the server passes one end of a socket pair as FD.

    A fresh interpreter (not multiprocessing's spawn) so that nothing of the server's own main module is
    imported again here: a user's script that starts a server needs no `if __name__ == "__main__"` guard.
    """
    connection = Connection(int(sys.argv[1]))
    try:
        _, source, options, log_level = connection.recv()
    except (EOFError, OSError):
        return
    runner_main(connection, source, options, log_level)


if __name__ == "__main__":
    main()
