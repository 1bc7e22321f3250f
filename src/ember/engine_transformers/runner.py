"""The transformers engine's runner process: `python -m ember.engine_transformers.runner FD`.

The same protocol as the llama.cpp runner (runner/protocol.py: Start, Cancel, Shutdown in; Ready or
LoadFailed, then Steps of Text/Done/Failed events and RunnerStats out), so the server's side is the same
RunnerProcess, started with this module. A crash in torch takes down only this process.

`Answering` is also what `ember run` uses in its own process for a transformers model when no server runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from ember.engine_transformers.generator import Batcher, GenJob, HFModel, Update
from ember.engine_transformers.support import check_request
from ember.errors import InvalidRequestError
from ember.options import LOAD_OPTION_NAMES, LoadOptions, sampling_options
from ember.runner.client import RunnerProcess
from ember.runner.host import RunnerLoop, host_runner, resident_bytes
from ember.runner.protocol import (
    Cancel,
    Done,
    Failed,
    RunnerStats,
    Shutdown,
    Start,
    Text,
    error_to_tuple,
)
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse, Message, to_messages

log = logging.getLogger(__name__)
BATCH_GATHER_S = 0.02  # how long a new batch waits for more requests (its first token comes that much later)


class TransformersRunner(RunnerProcess):
    """The server's side of a transformers runner: RunnerProcess with this engine's process."""

    module = "ember.engine_transformers.runner"


class Answering:
    """Native requests turned into batch jobs, and the jobs' updates into response chunks."""

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        self.hf = HFModel(source, options)
        self.batcher = Batcher(self.hf, options.num_parallel)
        self.kinds: dict[str, tuple[str, Any, int]] = {}  # request id -> (kind, request, started ns)
        self._defaults = {k: v for k, v in source.parameters.items() if k not in LOAD_OPTION_NAMES and k != "fallback"}
        self._unreported_load_ns = self.hf.load_duration_ns

    @property
    def name(self) -> str:
        return self.hf.source.name

    def start(self, kind: str, request_id: str, request: GenerateRequest | ChatRequest, choices: int) -> bool:
        """Queue a request's jobs; False when it has nothing to generate (a load-only request)."""
        started = time.perf_counter_ns()
        own = {k: v for k, v in (request.options or {}).items() if k not in LOAD_OPTION_NAMES}
        sampling = sampling_options(self._defaults, own)
        check_request(request, sampling)
        if isinstance(request, GenerateRequest):
            if not request.prompt and not request.context:
                return False
            if request.raw:
                tokens = self.hf.tokenize(request.prompt, specials=True) if request.prompt else []
            else:
                text = self.hf.render(
                    self._conversation([Message(role="user", content=request.prompt)], request.system)
                )
                tokens = self.hf.tokenize(text, specials=False)
            tokens = list(request.context or []) + tokens
        else:
            messages = to_messages(request.messages)
            if not messages:
                return False
            text = self.hf.render(self._conversation(messages, None), request.template)
            tokens = self.hf.tokenize(text, specials=False)
        if not tokens:
            raise InvalidRequestError("the prompt is empty")
        tokens = self.hf.fit(tokens, truncate=request.truncate is not False)
        room = self.hf.options.num_ctx - len(tokens)
        jobs = []
        for index in range(choices):  # all made before any is queued: a bad schema fails the request alone
            each = sampling if sampling.seed < 0 else sampling.model_copy(update={"seed": sampling.seed + index})
            constraint = self.hf.json_formats.constraint(request.format)
            jobs.append(GenJob(request_id, index, tokens, each, each.max_new_tokens(room), constraint))
        self.kinds[request_id] = (kind, request, started)
        for job in jobs:
            self.batcher.submit(job)
        return True

    def _conversation(self, messages: list[Message], system: str | None) -> list[dict[str, Any]]:
        source = self.hf.source
        conversation = [dict(message) for message in source.messages]
        system = system if system is not None else source.system
        if system is not None and not any(message.role == "system" for message in messages):
            conversation.insert(0, {"role": "system", "content": system})
        return conversation + [message.template_view() for message in messages]

    def loaded(self, request_id: str, kind: str) -> GenerateResponse | ChatResponse:
        metrics = self._metrics(time.perf_counter_ns())
        if kind == "generate":
            return GenerateResponse(model=self.name, done=True, done_reason="load", **metrics)
        return ChatResponse(model=self.name, done=True, done_reason="load", **metrics)

    def final(self, job: GenJob) -> GenerateResponse | ChatResponse:
        kind, _, started = self.kinds[job.request_id]
        metrics = self._metrics(started)
        metrics.update(
            prompt_eval_count=len(job.prompt),
            prompt_eval_duration=job.prompt_eval_ns,
            eval_count=len(job.output),
            eval_duration=job.eval_ns,
        )
        fields: dict[str, Any] = {"done": True, "done_reason": job.done_reason, "stop_sequence": job.stop_sequence}
        if kind == "generate":
            return GenerateResponse(model=self.name, response="", context=job.prompt + job.output, **fields, **metrics)
        return ChatResponse(model=self.name, message=Message(role="assistant", content=""), **fields, **metrics)

    def finished(self, request_id: str) -> None:
        self.kinds.pop(request_id, None)

    def _metrics(self, started_ns: int) -> dict[str, int]:
        load_ns, self._unreported_load_ns = self._unreported_load_ns, 0
        return {"total_duration": time.perf_counter_ns() - started_ns + load_ns, "load_duration": load_ns}

    def generate(self, request: GenerateRequest) -> Iterator[GenerateResponse]:
        """In this process: stream one generate request (`ember run` without a server)."""
        request_id = "local"
        if not self.start("generate", request_id, request, 1):
            yield self.loaded(request_id, "generate")  # type: ignore[misc]
            return
        try:
            while self.batcher.has_work():
                for update in self.batcher.step():
                    if update.text:
                        yield GenerateResponse(model=self.name, response=update.text)
                    if update.done:
                        yield self.final(update.job)  # type: ignore[misc]
        finally:
            self.batcher.cancel(request_id)
            self.finished(request_id)

    def close(self) -> None:
        self.hf.close()


class _Loop(RunnerLoop):
    def __init__(self, connection: Connection, answering: Answering) -> None:
        super().__init__(connection)
        self.answering = answering
        self.open: dict[str, int] = {}  # request id -> choices not done yet

    def handle(self, message: Start | Cancel | Shutdown) -> None:
        if isinstance(message, Start):
            self.start(message)
        elif isinstance(message, Cancel):
            self.answering.batcher.cancel(message.request_id)
            self.open.pop(message.request_id, None)
            self.answering.finished(message.request_id)
        elif isinstance(message, Shutdown):
            self.running = False

    def start(self, message: Start) -> None:
        try:
            if message.kind == "generate":
                request: Any = GenerateRequest.model_validate(message.payload)
            elif message.kind == "chat":
                request = ChatRequest.model_validate(message.payload)
            else:
                raise InvalidRequestError("the transformers engine does not make embeddings; use a GGUF model")
            if not self.answering.start(message.kind, message.request_id, request, message.choices):
                self.events.append(Done(message.request_id, self.answering.loaded(message.request_id, message.kind)))
            else:
                self.open[message.request_id] = message.choices
        except Exception as error:  # a bad request fails alone; the runner goes on
            self.events.append(Failed(message.request_id, error_to_tuple(error)))
        self.urgent = True

    def step(self) -> None:
        try:
            updates = self.answering.batcher.step()
        except Exception as error:  # a failed step fails the requests of its batch, not the runner
            log.exception("a transformers step failed")
            for job in self.answering.batcher.rows:
                if not job.done and job.request_id in self.open:
                    self.events.append(Failed(job.request_id, error_to_tuple(error)))
                    self.open.pop(job.request_id, None)
                job.done_reason = job.done_reason or "error"
            self.urgent = True
            return
        for update in updates:
            self._event(update)

    def _event(self, update: Update) -> None:
        job = update.job
        if job.request_id not in self.open:
            return
        if update.text:
            if not job.sent or job.sent == len(update.text):
                self.urgent = True  # the first text goes at once
            self.events.append(Text(job.request_id, update.text, job.index))
        if update.done:
            self.events.append(Done(job.request_id, self.answering.final(job), job.index))
            self.urgent = True
            self.open[job.request_id] -= 1
            if not self.open[job.request_id]:
                del self.open[job.request_id]
                self.answering.finished(job.request_id)

    def current_stats(self) -> RunnerStats:
        options = self.answering.hf.options
        return RunnerStats(self.answering.batcher.kv_tokens(), options.num_ctx * options.num_parallel, resident_bytes())

    def loop(self) -> None:
        batcher = self.answering.batcher
        self.report_stats(force=True)
        while self.running:
            wait: float | None = 0 if batcher.has_work() or self.events else None
            while self.connection.poll(wait):
                self.handle(self.connection.recv())
                wait = 0
                if not self.running:
                    break
            if batcher.starts_batch() and self.running:
                # Requests sent together reach the runner a few milliseconds apart: gather them into one batch.
                deadline = time.monotonic() + BATCH_GATHER_S
                while batcher.starts_batch() and len(batcher.waiting) < batcher.max_batch and self.running:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.connection.poll(left):
                        break
                    self.handle(self.connection.recv())
            if batcher.has_work():
                self.step()
            busy = batcher.has_work()
            self.flush(force=not busy)
            self.report_stats(force=not busy)


def _facts(answering: Answering) -> dict[str, Any]:
    hf = answering.hf
    layers = 0 if hf.device.type == "cpu" else int(hf.directory.config.get("num_hidden_layers") or 0)
    return {
        "load_duration": hf.load_duration_ns,
        "gpu_layers": layers,
        "engine": "transformers",
        "device": str(hf.device),
    }


def main() -> None:
    """`python -m ember.engine_transformers.runner FD` (runner/host.py)."""
    host_runner(Answering, _facts, lambda connection, answering: _Loop(connection, answering).loop(), Answering.close)


if __name__ == "__main__":
    main()
