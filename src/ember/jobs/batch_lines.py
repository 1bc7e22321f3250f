"""Running one batch line, and the shape of its output line (OpenAI's batch output JSONL).

A line runs through the native path: its body becomes native requests (see `ember.api.openai_calls`, passed
in as `translate` so that this layer does not reach up into the API), which run on a model in this process
(`run_in_process`) or on the server's model manager at low priority in the batch class (`run_on_manager`).
Their answers, collected by `ember.collect`, become the body the HTTP route would have returned.

Every line ends as exactly one output line:
    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code", "request_id", "body"}, "error": null}
A request the model refused (a bad body, a prompt too long) has its HTTP status and OpenAI's error body in
`response`, as OpenAI writes failed requests; a line that never ran (the batch expired or was cancelled) has
`response: null` and `error: {code, message}`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ember.collect import collect_choices, collect_choices_async
from ember.errors import EmberError
from ember.jobs.batch_input import BatchLine
from ember.serve.resolve import apply_defaults

log = logging.getLogger(__name__)

Translate = Callable[[str, dict[str, Any], Any], Any]  # (endpoint, body, settings) -> OpenAICall

EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")
CANCELLED = ("batch_cancelled", "This request was not executed because the batch was cancelled.")


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def response_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """The output line of a request that got an HTTP answer (200, or an error status with its error body)."""
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": _new_id("req_"), "body": body},
        "error": None,
    }


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a failure, as the routes would have answered it."""
    if isinstance(error, EmberError):
        status, message = error.http_status, str(error)
    else:  # a bug: the line fails, the batch goes on, the log has the traceback
        log.error("a batch line failed unexpectedly", exc_info=error)
        status, message = 500, f"internal error: {type(error).__name__}: {error}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    return status, {"error": {"message": message, "type": kind, "param": None, "code": None}}


def failed_line(custom_id: str, error: BaseException) -> dict[str, Any]:
    status, body = error_body(error)
    return response_line(custom_id, status, body)


def unrun_line(custom_id: str, reason: tuple[str, str]) -> dict[str, Any]:
    """The error-file line of a request that never ran (OpenAI's `batch_expired` shape)."""
    code, message = reason
    error = {"code": code, "message": message}
    return {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error}


def succeeded(output: dict[str, Any]) -> bool:
    response = output.get("response")
    return bool(response) and response.get("status_code") == 200


def usage_of(output: dict[str, Any]) -> dict[str, int]:
    """Token counts of an output line: input, cached input, output (zero for a failed line)."""
    usage = ((output.get("response") or {}).get("body") or {}).get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "input": int(usage.get("prompt_tokens", 0)),
        "cached": int(details.get("cached_tokens", 0)),
        "output": int(usage.get("completion_tokens", 0)),
    }


@dataclass(frozen=True)
class LineResult:
    """A finished line: its output line, whether it succeeded, and what it cost."""

    index: int
    custom_id: str
    output: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return succeeded(self.output)

    @property
    def tokens(self) -> int:
        return usage_of(self.output)["output"]

    def record(self) -> dict[str, Any]:
        return {"index": self.index, "custom_id": self.custom_id, "output": self.output, "seconds": self.seconds}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LineResult:
        return cls(int(record["index"]), str(record["custom_id"]), dict(record["output"]), float(record["seconds"]))


# --- in this process ---------------------------------------------------------------------------------------


class ModelPool(Protocol):
    """Where `run_in_process` finds a line's model by name, loaded once (a Ray actor holds one)."""

    def get(self, name: str) -> Any: ...


def run_in_process(pool: ModelPool, line: BatchLine, translate: Translate, settings: Any) -> LineResult:
    """Run one line on a model of this process; a failure becomes the line's error, never an exception.

    Each request is resolved as the server resolves it (Ollama's defaults, capability checks) and runs on the
    model as loaded: a line naming other load options fails (its threads share the model), it does not reload.
    """
    started = time.perf_counter()
    try:
        call = translate(line.url, line.body, settings)
        model = pool.get(call.requests[0].model)
        answers = []
        for request in call.requests:
            if call.kind == "embed":
                answers.append(model.loaded.embed(request))
                continue
            request = apply_defaults(request, model.source)
            if request.priority is None:  # a batch line, as on the server: low, unless the line says otherwise
                request = request.model_copy(update={"priority": "low"})
            start = model.loaded.chat_choices if call.kind == "chat" else model.loaded.generate_choices
            answers.extend(collect_choices(start(request, call.choices), call.choices))  # n > 1: one prefill
        output = response_line(line.custom_id, 200, call.body(answers))
    except Exception as error:
        output = failed_line(line.custom_id, error)
    return LineResult(line.index, line.custom_id, output, time.perf_counter() - started)


# --- on the server's model manager -------------------------------------------------------------------------


async def run_on_manager(
    manager: Any, line: BatchLine, translate: Translate, settings: Any, *, timeout: float | None
) -> LineResult:
    """Run one line on the server's models at low priority, in the batch class of the queue (EMBER_BATCH_SLOTS).

    A RequestTimeoutError (the completion window ran out while the line waited) and a ServerBusyError (the
    queue is full of other requests) are raised, not recorded: the caller ends the batch as expired, or waits and
    runs the line again. Any other failure is the line's error.
    """
    from ember.errors import RequestTimeoutError, ServerBusyError

    started = time.perf_counter()
    try:
        call = translate(line.url, line.body, settings)
        answers = []
        for request in call.requests:
            if call.kind == "embed":
                answers.append(await manager.embed(request, priority="low", timeout=timeout, batch=True))
                continue
            start = manager.chat_choices if call.kind == "chat" else manager.generate_choices
            choices = start(request, call.choices, priority="low", timeout=timeout, batch=True)
            answers.extend(await collect_choices_async(choices, call.choices))
        output = response_line(line.custom_id, 200, call.body(answers))
    except (RequestTimeoutError, ServerBusyError):
        raise
    except Exception as error:
        output = failed_line(line.custom_id, error)
    return LineResult(line.index, line.custom_id, output, time.perf_counter() - started)
