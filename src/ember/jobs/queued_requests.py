"""What a queued message asks for: a native request (Ollama's fields) or an OpenAI chat-completions body.

    {"request_id": "r1", "model": "smollm2", "prompt": "Hi", "options": {"temperature": 0}, "stream": false}
    {"request_id": "r2", "messages": [{"role": "user", "content": "Hi"}], "format": "json"}
    {"model": "smollm2", "messages": [...], "max_tokens": 64, "temperature": 0.2}      (OpenAI's; answered so)

`request_id` may instead come as the message's message_id or correlation_id property; one of them is needed, so
that a redelivered message is recognised. A body is read as OpenAI's when the message's `type` property is
"openai", or when it has fields only OpenAI's API has (max_tokens, temperature, n, response_format ...); it is
then read exactly as POST /v1/chat/completions reads it (the route's own protocol model and translation, see
ember.api.openai_calls) and its answer is the route's `chat.completion`. A native body is read as ember's native
request types read it (an unknown field is an error). The model defaults to the worker's; `stream` to false.
Either way the server's caps (EMBER_MAX_NUM_PREDICT, EMBER_MAX_NUM_CTX) and the options' values are checked
here, by the serve layer's rules, so a message that can never run goes to the dead letters at once.

Priorities: the queue is declared with x-max-priority 9, so RabbitMQ hands out higher-priority messages
first; in ember's own queue for the model, AMQP priority 0 (or none) is ember's "low" (background work yields
to interactive requests on a shared server), 1 to 4 "normal", 5 and up "high". A body's `priority` field wins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ember.api.openai_calls import OpenAICall, native_call
from ember.config import Settings
from ember.errors import InvalidRequestError
from ember.serve.resolve import Limits
from ember.types import ChatRequest, GenerateRequest, build_request

MAX_AMQP_PRIORITY = 9
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces
_NATIVE_ONLY = {"prompt", "options", "format", "keep_alive", "truncate", "priority", "system", "template", "raw"}
_NATIVE_ONLY |= {"images", "context"}
_OPENAI_ONLY = {
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "response_format",
    "stream_options",
    "logit_bias",
    "user",
    "parallel_tool_calls",
    "metadata",
    "store",
    "service_tier",
}


class MalformedMessageError(InvalidRequestError):
    """A queued message that no worker can answer as it is: not JSON, no request id, invalid fields."""


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    request: ChatRequest | GenerateRequest
    api: Literal["ollama", "openai"]
    stream: bool
    priority: str | int
    openai: OpenAICall | None = None  # an OpenAI body's call, which shapes its answer as the route's


def ember_priority(amqp_priority: int | None) -> str:
    """ember's priority class for a message's AMQP priority (see the module's docstring)."""
    if not amqp_priority:
        return "low"
    return "normal" if amqp_priority < 5 else "high"


def parse_queued_request(
    body: bytes,
    *,
    settings: Settings,
    default_model: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    message_type: str | None = None,
    amqp_priority: int | None = None,
) -> QueuedRequest:
    """Read a message into a native request, or raise MalformedMessageError saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedMessageError(f"the message is not JSON ({error}); send a JSON object") from None
    if not isinstance(data, dict):
        raise MalformedMessageError('the message must be a JSON object such as {"request_id": ..., "prompt": ...}')
    request_id = _request_id(data.pop("request_id", None), message_id, correlation_id)
    stream = data.pop("stream", False)
    if not isinstance(stream, bool):
        raise MalformedMessageError("stream must be true or false")
    openai = (message_type or "").lower() in ("openai", "chat.completions") or (
        not data.keys() & _NATIVE_ONLY and bool(data.keys() & _OPENAI_ONLY)
    )
    data["model"] = data.get("model") or default_model
    call: OpenAICall | None = None
    try:
        if openai:
            call = native_call("/v1/chat/completions", data, settings)
            if call.answers != 1:
                raise InvalidRequestError("n must be 1 in a queued request; publish one message per completion")
            request: ChatRequest | GenerateRequest = call.requests[0]  # type: ignore[assignment]
        else:
            request = _native(data)
            Limits.from_settings(settings).check_options(request.options)
    except InvalidRequestError as error:
        raise MalformedMessageError(str(error)) from None
    priority = request.priority if request.priority is not None else ember_priority(amqp_priority)
    return QueuedRequest(request_id, request, "openai" if openai else "ollama", stream, priority, call)


def _request_id(*candidates: Any) -> str:
    for candidate in candidates:
        if candidate is None or candidate == "":
            continue
        if isinstance(candidate, bool) or not isinstance(candidate, str | int):
            raise MalformedMessageError("request_id must be a string or an integer")
        text = str(candidate)
        if not _REQUEST_ID.fullmatch(text):
            raise MalformedMessageError("request_id must be 1 to 200 printable characters without spaces")
        return text
    raise MalformedMessageError(
        "the message has no request_id: give one in the body (or as the message_id or correlation_id property), "
        "so that a redelivered message is not answered twice"
    )


def _native(data: dict[str, Any]) -> ChatRequest | GenerateRequest:
    if "prompt" in data and "messages" in data:
        raise InvalidRequestError("give either prompt or messages, not both")
    if "messages" in data:
        if not data["messages"]:
            raise InvalidRequestError("messages must not be empty")
        return build_request(ChatRequest, **data)
    if not isinstance(data.get("prompt"), str) or not data["prompt"]:
        raise InvalidRequestError('give a prompt ("prompt": "...") or messages ("messages": [...])')
    return build_request(GenerateRequest, **data)
