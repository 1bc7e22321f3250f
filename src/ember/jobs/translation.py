"""The jobs' one doorway to the API layer's translations, so that no third copy of them grows here.

A queued message may be an OpenAI chat-completions body; its answer is then shaped as OpenAI's. The translation
of such a body into a native ChatRequest lives in `ember.api.openai` today (inside its route, built from the
helpers used below); once the API's protocol models with `to_native()` land, `chat_request_from_openai` becomes
`ChatCompletionRequest.model_validate(body).to_native()` and the answer shapes come from the same module.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ember.api.ollama import chunk_json, collect_chat, collect_generate
from ember.api.openai import _finish_reason, _format, _message_text, _options, _usage
from ember.api.openai_logprobs import chat_fields, chat_logprobs, entries_of
from ember.config import Settings
from ember.errors import InvalidRequestError
from ember.tools import from_openai_message, openai_tool_call
from ember.types import ChatRequest, ChatResponse, GenerateResponse, ToolCall, build_request

__all__ = [
    "OpenAIHead",
    "chat_request_from_openai",
    "collect",
    "ollama_chunk",
    "openai_chunk",
    "openai_completion",
]


def chat_request_from_openai(body: Mapping[str, Any], settings: Settings) -> ChatRequest:
    """A native ChatRequest for an OpenAI chat-completions body (n must be 1: one answer per message)."""
    body = dict(body)
    if (body.get("n") or 1) != 1:
        raise InvalidRequestError("n must be 1 in a queued request; publish one message per completion")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    native_messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequestError("each message must be an object with role and content")
        role = "system" if message.get("role") == "developer" else message.get("role")
        native_messages.append(
            {"role": role, "content": _message_text(message.get("content")), **from_openai_message(message, call_names)}
        )
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError('tools must be a list of {"type": "function", "function": {...}} objects')
    return build_request(
        ChatRequest,
        model=body.get("model") or "",
        messages=native_messages,
        format=_format(body),
        options=_options(body, settings),
        tools=tools,
        tool_choice=body.get("tool_choice"),
        **chat_fields(body),
    )


async def collect(chunks: AsyncIterator[ChatResponse | GenerateResponse], chat: bool) -> dict[str, Any]:
    """The whole answer of a native stream, as the Ollama API returns it with stream false."""
    return await (collect_chat(chunks) if chat else collect_generate(chunks))


def ollama_chunk(chunk: ChatResponse | GenerateResponse) -> dict[str, Any]:
    """A streamed chunk as the Ollama API sends it."""
    return chunk_json(chunk)


class OpenAIHead:
    """The fields every chunk and the answer of one OpenAI-shaped completion share."""

    def __init__(self, model: str) -> None:
        self.fields = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "ember",
        }


def openai_chunk(chunk: ChatResponse, head: OpenAIHead, logprobs: bool) -> dict[str, Any]:
    """A `chat.completion.chunk` with the text (or whole tool calls) of one native chunk."""
    delta: dict[str, Any] = {"content": chunk.message.content}
    if chunk.message.tool_calls:
        delta["tool_calls"] = [openai_tool_call(call, index) for index, call in enumerate(chunk.message.tool_calls)]
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": chat_logprobs(entries_of(chunk) if logprobs else None),
        "finish_reason": None,
    }
    return {**head.fields, "object": "chat.completion.chunk", "choices": [choice]}


def openai_completion(collected: Mapping[str, Any], head: OpenAIHead, logprobs: bool) -> dict[str, Any]:
    """A `chat.completion` made from a collected native chat answer, with its usage."""
    final = ChatResponse.model_validate(collected)
    calls: list[ToolCall] = list(final.message.tool_calls or ())
    message: dict[str, Any] = {"role": "assistant", "content": final.message.content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [openai_tool_call(call) for call in calls]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(entries_of(final) if logprobs else None),
        "finish_reason": "tool_calls" if calls else _finish_reason(final),
    }
    return {**head.fields, "object": "chat.completion", "choices": [choice], "usage": _usage(final)}
