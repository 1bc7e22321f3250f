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
from ember.engine.sequence import Phase, Sequence, SequenceUpdate
from ember.loaded_model import Job, LoadedModel
from ember.logprobs import logprob_entries
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
    error_to_tuple,
)
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, EmbedRequest, GenerateRequest

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 0.025  # seconds plain text may wait to travel with later text (see _Runner.flush)
STATS_INTERVAL = 1.0  # seconds between the runner's reports of its KV cells and memory (for /metrics)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc; elsewhere the peak, which is what the OS tells)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _Runner:
    def __init__(self, connection: Connection, model: LoadedModel) -> None:
        self.connection = connection
        self.model = model
        self.jobs: dict[int, tuple[str, int, Job]] = {}  # sequence id -> (request id, choice index, job)
        self.by_request: dict[str, list[Sequence]] = {}
        self.events: list[Event] = []
        self.urgent = False  # an event the server should see now: a first token, an end, an error
        self.last_flush = 0.0
        self.started: set[int] = set()  # sequences whose first text was sent
        self.running = True
        self.embeds: deque[tuple[str, EmbedJob]] = deque()  # embedding requests, one input per loop turn
        self.prefill_watch: dict[str, int] = {}  # request id -> prompt tokens last reported (report_prefill)
        self.last_stats = 0.0
        self.stats_sent: RunnerStats | None = None

    def handle(self, message: Start | Cancel | Shutdown) -> None:
        if isinstance(message, Start):
            if message.kind == "embed":
                self.start_embed(message.request_id, message.payload)
            else:
                self.start(message)
        elif isinstance(message, Cancel):
            for sequence in self.by_request.get(message.request_id, ()):
                self.model.engine.cancel(sequence)
            self.embeds = deque(entry for entry in self.embeds if entry[0] != message.request_id)
        elif isinstance(message, Shutdown):
            self.running = False

    def _fail(self, request_id: str, error: BaseException) -> None:
        self.events.append(Failed(request_id, error_to_tuple(error)))
        self.urgent = True

    def start(self, message: Start) -> None:
        try:
            if message.kind == "generate":
                jobs = self.model.start_generate(GenerateRequest.model_validate(message.payload), message.choices)
            else:
                jobs = self.model.start_chat(ChatRequest.model_validate(message.payload), message.choices)
        except Exception as error:  # a bad request fails alone; the runner goes on
            self._fail(message.request_id, error)
            return
        if not isinstance(jobs, list):  # answered at once (a load-only request)
            self.events.append(Done(message.request_id, jobs))
            self.urgent = True
            return
        for index, job in enumerate(jobs):
            self.jobs[job.sequence.id] = (message.request_id, index, job)
        self.by_request[message.request_id] = [job.sequence for job in jobs]
        if message.payload.get("report_prefill"):
            self.prefill_watch[message.request_id] = -1

    def start_embed(self, request_id: str, payload: dict[str, Any]) -> None:
        try:
            self.embeds.append((request_id, self.model.start_embed(EmbedRequest.model_validate(payload))))
        except Exception as error:
            self._fail(request_id, error)

    def embed_step(self) -> None:
        """Embed one input of the oldest embedding request (generation steps go on between inputs)."""
        request_id, job = self.embeds[0]
        try:
            job.step()
            if not job.done:
                return
            self.events.append(Embedded(request_id, job.result()))
        except Exception as error:
            self.events.append(Failed(request_id, error_to_tuple(error)))
        self.embeds.popleft()
        self.urgent = True

    def step(self) -> None:
        for update in self.model.engine.step():
            entry = self.jobs.get(update.sequence.id)
            if entry is None:
                continue
            request_id, index, job = entry
            if not update.done:
                self._stream(request_id, index, job, update)
                continue
            self.urgent = True
            self.started.discard(update.sequence.id)
            del self.jobs[update.sequence.id]
            if not any(request == request_id for request, _, _ in self.jobs.values()):
                self.by_request.pop(request_id, None)
            try:
                final = job.chunk(update)
            except Exception as error:
                self._fail(request_id, error)
                continue
            if final is not None:
                self.events.append(Done(request_id, final, index))

    def _stream(self, request_id: str, index: int, job: Job, update: SequenceUpdate) -> None:
        # The job's parsers (thinking, tool calls) hold back what may be a tag or a call, and split the rest.
        thinking, text, calls = job.parts(update)
        logprobs = tuple(logprob_entries(self.model.model, update) or ())
        if text or thinking or logprobs:  # the common case, per token: plain text, no response object built here
            self.events.append(Text(request_id, text, index, logprobs, thinking))
        if calls:  # whole calls, after the text before them
            self.events.append(ToolCalls(request_id, tuple(calls), index))
            self.urgent = True
        if (text or thinking) and update.sequence.id not in self.started:
            self.started.add(update.sequence.id)
            self.urgent = True

    def report_prefill(self) -> None:
        """For requests that asked: how much of the prompt is in, after each step that read a part of it."""
        for request_id, reported in list(self.prefill_watch.items()):
            sequences = self.by_request.get(request_id)
            sequence = sequences[0] if sequences else None  # the first choice prefills the prompt for all
            if sequence is None or sequence.phase not in (Phase.WAITING, Phase.PREFILL):
                del self.prefill_watch[request_id]  # its first token (or its end) says the rest
            elif sequence.n_past != reported:
                self.prefill_watch[request_id] = sequence.n_past
                self.events.append(Prefill(request_id, sequence.n_past, len(sequence.prompt_tokens)))

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
        self.connection.send(Steps(events))

    def report_stats(self, *, force: bool = False) -> None:
        """Send the numbers /metrics shows, at most once per STATS_INTERVAL (and once more on going idle)."""
        now = time.monotonic()
        if not force and now - self.last_stats < STATS_INTERVAL:
            return
        self.last_stats = now
        engine = self.model.engine
        slots = engine.scheduler.slots
        stats = RunnerStats(
            kv_cells_used=sum(len(slot.content()) for slot in slots),
            kv_cells_total=engine.num_ctx * len(slots),
            rss_bytes=resident_bytes(),
        )
        if stats != self.stats_sent:
            self.stats_sent = stats
            self.connection.send(stats)

    def loop(self) -> None:
        engine = self.model.engine
        self.report_stats(force=True)
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
            busy = engine.has_work()
            self.flush(force=not busy)
            self.report_stats(force=not busy)


def runner_main(connection: Connection, source: ModelSource, options: LoadOptions, log_level: int) -> None:
    """Load the model and serve requests from the pipe until shut down or the server goes away."""
    logging.basicConfig(level=log_level, format=f"ember runner {os.getpid()}: %(levelname)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it shuts runners down
    try:
        model = LoadedModel(source, options)
    except BaseException as error:
        connection.send(LoadFailed(error_to_tuple(error)))
        connection.close()
        return
    facts = {
        "pid": os.getpid(),
        "load_duration": model.load_duration_ns,
        "gpu_layers": model.model.gpu_layers,
        "num_parallel": options.num_parallel,
    }
    connection.send(Ready(facts))
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
