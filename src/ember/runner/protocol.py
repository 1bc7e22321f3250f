"""The messages between the server and a runner process, over a multiprocessing pipe.

Server to runner:
    ("generate", request_id, GenerateRequest as a dict)
    ("chat", request_id, ChatRequest as a dict)
    ("embed", request_id, EmbedRequest as a dict)   answered by "embedded" or "error"
    ("cancel", request_id)
    ("shutdown",)

Runner to server:
    ("ready", facts)                       once, after the model loaded
    ("load_failed", error)                 instead of "ready"; then the runner exits
    ("steps", [event, ...])                what one engine step produced, for every request at once:
        ("text", request_id, text)         a piece of the answer
        ("text", request_id, text, [entry dict])   the same, for a request that asked for logprobs: the
                                           TokenLogprob of the token just sampled (text may be "": held back)
        ("chunk", request_id, chunk dict)  a chunk with tool calls or thinking (requests with tools, or a
                                           thinking model's)
        ("done", request_id, final chunk as a dict)
        ("error", request_id, error)       the request failed; others go on
        ("embedded", request_id, EmbedResponse as a dict)   an embed request's vectors (not normalized);
                                           the runner embeds one input per turn of its loop, between steps

An error travels as (class name, message, http status) and is rebuilt on the server side as the same
EmberError subclass, so the user sees the message the runner wrote.
"""

from __future__ import annotations

from typing import Any

from ember import errors

ErrorTuple = tuple[str, str, int]


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
