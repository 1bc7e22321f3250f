"""The Anthropic Messages API: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

A request becomes one native chat request (anthropic_protocol.py) and goes through the ModelManager like
any other; the answer comes back as Anthropic's content blocks: `thinking` (a thinking model's reasoning),
`text`, and `tool_use` for each tool call. A stream is Anthropic's server-sent events: message_start, then
for each block content_block_start, content_block_delta (text_delta, thinking_delta, input_json_delta) and
content_block_stop, then message_delta (stop_reason and usage) and message_stop. Errors have Anthropic's
shape, `{"type": "error", "error": {"type": ..., "message": ...}}` (see app.error_response).
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember import capabilities
from ember.api import schemas
from ember.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from ember.api.bodies import parse_body
from ember.api.ollama import PRIORITY_HEADER, first_then_rest, manager_of
from ember.collect import collect_async
from ember.errors import EmberError, InvalidRequestError
from ember.store.resolve import LLAMA_CPP, ModelSource, resolve_model
from ember.types import ChatRequest, ChatResponse

router = APIRouter()
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }.get(status, "invalid_request_error" if status < 500 else "api_error")


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def _stop_reason(final: ChatResponse, has_calls: bool) -> str:
    if has_calls:
        return "tool_use"
    if final.stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(final.done_reason or "stop", "end_turn")


def _usage(final: ChatResponse) -> dict[str, int]:
    return {
        "input_tokens": final.prompt_eval_count + final.prompt_cached_count,
        "output_tokens": final.eval_count,
        "cache_read_input_tokens": final.prompt_cached_count,
    }


def _tool_use(call: Any) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id or f"toolu_{uuid.uuid4().hex[:24]}",
        "name": call.function.name,
        "input": call.function.arguments,
    }


async def _native(body: MessagesRequest | CountTokensRequest) -> tuple[ModelSource, ChatRequest]:
    source = await asyncio.to_thread(resolve_model, body.model) if body.model else None
    thinks = source is not None and await asyncio.to_thread(capabilities.thinks, source)
    return source, body.to_native(model_thinks=thinks)  # type: ignore[return-value]


@router.post("/v1/messages", openapi_extra=schemas.model_body(MessagesRequest))
async def messages(request: Request) -> Response:
    body = await parse_body(request, MessagesRequest)
    _, native = await _native(body)
    chunks = manager_of(request).chat(
        native, priority=request.headers.get(PRIORITY_HEADER), timeout=request.app.state.settings.request_timeout
    )
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if not body.stream:
        answer = await collect_async(chunks)
        return JSONResponse(_whole(message_id, body.model, answer))
    return StreamingResponse(
        _events(message_id, body.model, await first_then_rest(chunks)), media_type="text/event-stream"
    )


def _whole(message_id: str, model: str, answer: ChatResponse) -> dict[str, Any]:
    message = answer.message
    content: list[dict[str, Any]] = []
    if message.thinking:
        content.append({"type": "thinking", "thinking": message.thinking, "signature": ""})
    if message.content:
        content.append({"type": "text", "text": message.content})
    content.extend(_tool_use(call) for call in message.tool_calls or ())
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(answer, bool(message.tool_calls)),
        "stop_sequence": answer.stop_sequence,
        "usage": _usage(answer),
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


class _Blocks:
    """The content blocks of a streamed answer: one open at a time, each started, filled and stopped."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the kind of the open block

    def switch(self, kind: str, start: dict[str, Any]) -> list[bytes]:
        events = self.close()
        self.index += 1
        self.open = kind
        events.append(_event("content_block_start", {"index": self.index, "content_block": start}))
        return events

    def delta(self, kind: str, start: dict[str, Any], delta: dict[str, Any]) -> list[bytes]:
        events = self.switch(kind, start) if self.open != kind else []
        events.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
        return events

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"index": self.index})]


async def _events(message_id: str, model: str, chunks: AsyncIterator[ChatResponse]) -> AsyncIterator[bytes]:
    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    yield _event("message_start", {"message": start})
    blocks, calls = _Blocks(), 0
    try:
        async for chunk in chunks:
            message = chunk.message
            if message.thinking:
                for event in blocks.delta(
                    "thinking",
                    {"type": "thinking", "thinking": "", "signature": ""},
                    {"type": "thinking_delta", "thinking": message.thinking},
                ):
                    yield event
            if message.content:
                for event in blocks.delta(
                    "text", {"type": "text", "text": ""}, {"type": "text_delta", "text": message.content}
                ):
                    yield event
            for call in message.tool_calls or ():
                calls += 1
                block = _tool_use(call)
                for event in blocks.switch("tool_use", {**block, "input": {}}):
                    yield event
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                yield _event("content_block_delta", {"index": blocks.index, "delta": delta})
                for event in blocks.close():
                    yield event
            if chunk.done:
                for event in blocks.close():
                    yield event
                stop = {"stop_reason": _stop_reason(chunk, bool(calls)), "stop_sequence": chunk.stop_sequence}
                yield _event("message_delta", {"delta": stop, "usage": _usage(chunk)})
                yield _event("message_stop", {})
    except EmberError as error:
        yield _event("error", {"error": {"type": error_type(error.http_status), "message": str(error)}})


@router.post("/v1/messages/count_tokens", openapi_extra=schemas.model_body(CountTokensRequest))
async def count_tokens(request: Request) -> dict[str, int]:
    """The prompt's length in the model's own tokens: the conversation rendered with its template (and the
    tools as the model sees them) and tokenized, as a request would be."""
    body = await parse_body(request, CountTokensRequest)
    source, native = await _native(body)
    if source is not None and source.upstream is not None:
        raise InvalidRequestError(f"{source.name} is an upstream model: its tokenizer is on its server")
    if source is not None and source.engine != LLAMA_CPP:
        raise InvalidRequestError(f"{source.name} runs on the {source.engine} engine: count_tokens reads GGUF models")
    # The checks of a request (model, options, capabilities), and the defaults it would get.
    resolved = await asyncio.to_thread(manager_of(request).prepare, native)
    return {"input_tokens": await asyncio.to_thread(_count, source, resolved.request)}


def _count(source: ModelSource, native: ChatRequest) -> int:
    from ember.tools import ToolPlan

    prompts = _prompt_builder(source.path, source.template, source.system, json.dumps(list(source.messages)))
    plan = ToolPlan.for_request(native.tools, native.tool_choice, native.template or prompts.template_source)
    conversation = plan.conversation(prompts.chat_messages(native.messages, None))
    text = prompts.render_chat(conversation, tools=plan.template_tools(), think=native.think)
    return len(prompts.tokenize_prompt(text))


@functools.lru_cache(maxsize=4)
def _prompt_builder(path: Path, template: str | None, system: str | None, messages: str) -> Any:
    """A PromptBuilder on the model's vocabulary alone (no weights), kept for the next count."""
    from ember.engine.llamacpp import LlamaModel
    from ember.options import LoadOptions
    from ember.prompt import PromptBuilder

    vocabulary = LlamaModel.vocab_only(path, LoadOptions())
    return PromptBuilder(vocabulary, template=template, system=system, messages=json.loads(messages))
