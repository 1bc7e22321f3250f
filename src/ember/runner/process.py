"""The runner process: one loaded model, its engine loop, and the pipe to the server.

A runner crash (a segfault in llama.cpp, an out-of-memory kill) takes down only this process: the server sees
the pipe close, fails the requests that were in flight here, and starts a fresh runner for the next request.

The loop reads every waiting message, makes one engine step, and sends what the step produced in one message,
so the cost of the pipe is paid once per step, not once per token per request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from ember.embeddings import EmbedJob
from ember.engine.sequence import Phase, Sequence, SequenceUpdate
from ember.loaded_model import Job, LoadedModel
from ember.logprobs import logprob_entries
from ember.runner.host import RunnerLoop, flush_interval, host_runner, resident_bytes
from ember.runner.protocol import (
    Cancel,
    Done,
    Embedded,
    Failed,
    Prefill,
    RunnerStats,
    Shutdown,
    Start,
    Text,
    ToolCalls,
    error_to_tuple,
)
from ember.types import ChatRequest, EmbedRequest, GenerateRequest

log = logging.getLogger(__name__)

GATHER_GAP = 0.004  # seconds an idle model waits after a request for the next one of a burst (gather_arrivals)
GATHER_LIMIT = 0.025  # seconds it gathers a burst at most


class _Runner(RunnerLoop):
    def __init__(self, connection: Connection, model: LoadedModel) -> None:
        super().__init__(connection)
        self.model = model
        self.jobs: dict[int, tuple[str, int, Job]] = {}  # sequence id -> (request id, choice index, job)
        self.by_request: dict[str, list[Sequence]] = {}
        self.started: set[int] = set()  # sequences whose first text was sent
        self.embeds: deque[tuple[str, EmbedJob]] = deque()  # embedding requests, one input per loop turn
        self.prefill_watch: dict[str, int] = {}  # request id -> prompt tokens last reported (report_prefill)
        self.unsent_tokens: dict[int, int] = {}  # sequence id -> tokens generated since its last Text
        self.on_cpu = model.model.gpu_layers == 0

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
            self.unsent_tokens.pop(update.sequence.id, None)
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
        sequence_id = update.sequence.id
        tokens = self.unsent_tokens.pop(sequence_id, 0) + (update.token is not None)
        if text or thinking or logprobs:  # the common case, per token: plain text, no response object built here
            self.events.append(Text(request_id, text, index, logprobs, thinking, tokens))
        elif tokens:
            self.unsent_tokens[sequence_id] = tokens
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

    def current_stats(self) -> RunnerStats:
        engine = self.model.engine
        slots = engine.scheduler.slots
        return RunnerStats(
            kv_cells_used=sum(len(slot.content()) for slot in slots),
            kv_cells_total=engine.num_ctx * len(slots),
            rss_bytes=resident_bytes(),
        )

    def gather_arrivals(self) -> None:
        """Work has come to an idle model: take the requests that arrive right behind it before the first step.

        Requests sent together (several users at once, a client's concurrent calls) reach the runner a few
        milliseconds apart. Prefilled in the same first step they all start at once; one that comes a step late
        finds streams generating, and its prompt gets the small per-step budget that keeps their latency
        (scheduler.py), so the burst would finish in a staggered, half-empty tail. A lone request waits
        GATHER_GAP for company."""
        deadline = time.monotonic() + GATHER_LIMIT
        while self.running and time.monotonic() < deadline and self.connection.poll(GATHER_GAP):
            self.handle(self.connection.recv())

    def loop(self) -> None:
        engine = self.model.engine
        self.report_stats(force=True)
        while self.running:
            # Block while idle; while there is work, only take what has already arrived.
            idle = not engine.has_work()
            wait: float | None = None if idle and not self.events and not self.embeds else 0
            while self.connection.poll(wait):
                self.handle(self.connection.recv())
                wait = 0
                if not self.running:
                    break
            if idle and engine.has_work():
                self.gather_arrivals()
            if engine.has_work():
                self.step()
                if self.prefill_watch:
                    self.report_prefill()
            if self.embeds:
                self.embed_step()
            busy = engine.has_work()
            self.flush_interval = flush_interval(len(self.jobs), on_cpu=self.on_cpu)
            self.flush(force=not busy)
            self.report_stats(force=not busy)


def main() -> None:
    """`python -m ember.runner.process FD` (runner/host.py)."""
    host_runner(
        LoadedModel,
        lambda model: {"load_duration": model.load_duration_ns, "gpu_layers": model.model.gpu_layers},
        lambda connection, model: _Runner(connection, model).loop(),
        LoadedModel.close,
    )


if __name__ == "__main__":
    main()
