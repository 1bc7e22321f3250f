"""What the manager notes about each request it serves: into its RequestRecord (the log line, the X-Ember-Model
header) and into the metrics (queue wait, time to first token, end-to-end latency, tokens)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ember.errors import ResponseTimeoutError, ServerShuttingDownError
from ember.serve.metrics import ServeMetrics
from ember.serve.tracking import current_request

CLIENT_LEFT = "the client went away before the answer ended"


class Observation:
    """One request on one model, from the moment the model is ready for it."""

    def __init__(
        self, metrics: ServeMetrics | None, request: Any, served_by: str, *, with_content: bool = False
    ) -> None:
        asked_for = request.model
        self.metrics = metrics
        self.model = served_by
        self.record = current_request()
        self.with_content = with_content
        self.started = time.monotonic()
        self.first = True
        self.completed = False  # a final chunk (or an embedding) came: the consumer may stop reading after it
        if self.record is not None:
            self.record.model = self.record.model or asked_for
            self.record.served_by = served_by
            if with_content:
                self.record.prompt = getattr(request, "prompt", None) or [
                    message.model_dump(exclude_none=True) for message in getattr(request, "messages", None) or []
                ]

    def admitted(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_wait.labels(self.model).observe(time.monotonic() - self.started)

    def chunk(self, item: Any) -> None:
        chunk = item[1] if isinstance(item, tuple) else item
        if self.first:
            self.first = False
            if self.metrics is not None:
                ttft = time.monotonic() - self.started
                self.metrics.ttft.labels(self.model).observe(ttft)
                self.metrics.recent_ttft.add(ttft)
            if self.record is not None and self.record.ttft is None:
                self.record.ttft = self.record.elapsed()
        record = self.record
        if record is not None and self.with_content:
            text = getattr(chunk, "response", None)
            message = getattr(chunk, "message", None)
            if text is None and message is not None:
                text = message.content
            if text:
                record.answer.append(text)
        if not hasattr(chunk, "done") or chunk.done:
            self.completed = True
        if getattr(chunk, "done", False):
            if self.metrics is not None:
                self.metrics.observe_final(self.model, chunk)
            if record is not None:
                record.prompt_tokens += chunk.prompt_eval_count or 0
                record.eval_tokens += chunk.eval_count or 0
                record.cached_tokens += chunk.prompt_cached_count or 0

    def finished(self, error: BaseException | None) -> None:
        if isinstance(error, GeneratorExit) and self.completed:
            error = None  # the caller stopped reading after the answer's end
        if self.metrics is not None:
            self.metrics.e2e.labels(self.model).observe(time.monotonic() - self.started)
            if isinstance(error, ResponseTimeoutError | ServerShuttingDownError):
                kind = "shutdown" if isinstance(error, ServerShuttingDownError) else "timeout"
                self.metrics.timeouts.labels(self.model, kind).inc()
        if error is not None and self.record is not None:
            if isinstance(error, GeneratorExit | asyncio.CancelledError):
                self.record.error = CLIENT_LEFT
            else:
                self.record.error = str(error) or type(error).__name__
