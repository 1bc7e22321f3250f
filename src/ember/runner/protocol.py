"""The messages between the server and a runner process, over a socket pair (pickled by multiprocessing).

Each message is a small typed struct (a NamedTuple: pickled as a class and its fields, cheaply, once per
engine step). Responses and logprob entries cross the pipe once, as the objects the server hands on.

Server to runner: `Start` (a generate, chat or embed request; `choices` > 1 asks for several completions
of one prompt, prefilled once), `Cancel`, `Shutdown`.

Runner to server: `Ready` or `LoadFailed` once, after the load; then `Steps`, everything one or more engine
steps produced for every request at once: `Text` (a piece of an answer: its content and, for a thinking
model, its reasoning apart, with the logprob entries of its tokens when asked for), `ToolCalls` (the calls a
chat's tool-call parser found), `Done` (a completion's final chunk with its metrics), `Embedded` (an embed
request's vectors, not normalized) and `Failed` (that request failed; the others go on). `index` tells the
completions of one request apart. `RunnerStats` (KV cells in use, resident memory) about once a second.

An error travels as (class name, message, http status) and is rebuilt on the server side as the same
EmberError subclass, so the user sees the message the runner wrote.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ember import errors
from ember.types import ChatResponse, EmbedResponse, GenerateResponse, TokenLogprob, ToolCall

ErrorTuple = tuple[str, str, int]


class Start(NamedTuple):
    kind: str  # "generate", "chat" or "embed"
    request_id: str
    payload: dict[str, Any]  # the native request, as JSON
    choices: int = 1


class Cancel(NamedTuple):
    request_id: str


class Shutdown(NamedTuple):
    pass


class Ready(NamedTuple):
    facts: dict[str, Any]


class LoadFailed(NamedTuple):
    error: ErrorTuple


class Text(NamedTuple):
    request_id: str
    text: str  # the answer's content; may be "" when only logprobs or thinking are new (the rest is held back)
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    thinking: str = ""  # a thinking model's reasoning (the `<think>` part), split from the content
    tokens: int = 1  # generated tokens this text covers (more than one when text was held back or joined)


class ToolCalls(NamedTuple):
    request_id: str
    calls: tuple[ToolCall, ...]
    index: int = 0


class Prefill(NamedTuple):
    """How much of a prompt is decoded (`done` of `total` tokens), for a request that asked (report_prefill)."""

    request_id: str
    done: int
    total: int


class Done(NamedTuple):
    request_id: str
    final: GenerateResponse | ChatResponse
    index: int = 0


class Embedded(NamedTuple):
    request_id: str
    response: EmbedResponse


class Failed(NamedTuple):
    request_id: str
    error: ErrorTuple


Event = Text | ToolCalls | Prefill | Done | Embedded | Failed


class Steps(NamedTuple):
    events: list[Event]


class RunnerStats(NamedTuple):
    """The runner's numbers for /metrics, sent about once a second while it works and when it goes idle."""

    kv_cells_used: int  # cells of the KV cache holding tokens, all slots together
    kv_cells_total: int
    rss_bytes: int  # resident memory of the runner process


def error_to_tuple(error: BaseException) -> ErrorTuple:
    if isinstance(error, errors.EmberError):
        return type(error).__name__, str(error), error.http_status
    return type(error).__name__, f"the runner failed: {type(error).__name__}: {error}", 500


def error_from_tuple(value: ErrorTuple) -> errors.EmberError:
    name, message, status = value
    kind: Any = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, errors.EmberError):
        error = errors.EmberError.__new__(kind)
        errors.EmberError.__init__(error, message)  # subclasses with other constructors keep the message as is
    else:
        error = errors.EngineError(message)
    error.http_status = status
    return error
