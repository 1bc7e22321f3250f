"""The OpenAI API: /v1/chat/completions, /v1/completions and /v1/models, translated to native requests.

Only the fields a request gives become options, so a model's own defaults (and Ollama's) apply otherwise, as
Ollama's OpenAI compatibility does. Streams are server-sent events ending in `data: [DONE]`. `n` > 1 runs n
sequences side by side (seeds seed, seed+1 ... when a seed is given), each a choice with its own index.
Logprobs (chat `logprobs`/`top_logprobs`, completions `logprobs: N`) come from the raw logits: see
openai_logprobs.py. `logit_bias` becomes the sampling option of that name; `repeat_penalty` (llama.cpp
server's extension) is taken too, since Ollama's default of 1.1 applies otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.api import schemas
from ember.api.ollama import PRIORITY_HEADER, first_then_rest, manager_of, read_json
from ember.api.openai_calls import NativeCall
from ember.api.openai_logprobs import Offsets, chat_fields, chat_logprobs, completion_fields, entries_of
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.store.bundled import DEFAULT_MODEL
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from ember.tools import from_openai_message, openai_tool_call
from ember.types import ChatRequest, GenerateRequest, build_request

router = APIRouter()
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _options(body: dict[str, Any], settings: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequestError("max_tokens must be a positive integer")
        if max_tokens > settings.max_num_predict:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} is above this server's limit of {settings.max_num_predict}"
            )
        options["num_predict"] = max_tokens
    for openai_name, name in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
        ("repeat_penalty", "repeat_penalty"),  # llama.cpp server's extension: 1 turns Ollama's default 1.1 off
        # llama.cpp server's other sampling extensions, so `ember batch --top-k ...` means the same everywhere
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("typical_p", "typical_p"),
        ("repeat_last_n", "repeat_last_n"),
        ("mirostat", "mirostat"),
        ("mirostat_tau", "mirostat_tau"),
        ("mirostat_eta", "mirostat_eta"),
    ):
        if body.get(openai_name) is not None:
            options[name] = body[openai_name]
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    logit_bias = body.get("logit_bias")
    if logit_bias:  # {"token id": bias}; ids and ranges are checked with the other sampling options
        if not isinstance(logit_bias, dict):
            raise InvalidRequestError('logit_bias must be an object of token ids to biases, such as {"1234": -100}')
        options["logit_bias"] = logit_bias
    return options


def _format(body: dict[str, Any]) -> Any:
    response_format = body.get("response_format")
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequestError('response_format must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")


def _n(body: dict[str, Any], settings: Any) -> int:
    n = body.get("n", 1) or 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= settings.max_n:
        raise InvalidRequestError(f"n must be an integer from 1 to {settings.max_n}")
    return n


def _message_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url", "input_text"):
                raise InvalidRequestError('message content parts must be {"type": "text", "text": ...}')
            if part["type"] == "image_url":
                raise InvalidRequestError("this model does not support images; send text only")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise InvalidRequestError("message content must be a string or a list of text parts")


def _usage(final: Any) -> dict[str, Any]:
    prompt = final.prompt_eval_count + final.prompt_cached_count
    return {
        "prompt_tokens": prompt,
        "completion_tokens": final.eval_count,
        "total_tokens": prompt + final.eval_count,
        "prompt_tokens_details": {"cached_tokens": final.prompt_cached_count},
    }


def _sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    total = {
        "prompt_tokens": usages[0]["prompt_tokens"],
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": usages[0]["prompt_tokens_details"],
    }
    total["completion_tokens"] = sum(usage["completion_tokens"] for usage in usages)
    total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    return total


async def _merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Chunks of several streams as they come, tagged with their index; an error in one ends all."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except BaseException as error:  # delivered to the reader, which re-raises it
            await queue.put((index, error))
            return
        await queue.put((index, done))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _seeded(options: dict[str, Any], index: int) -> dict[str, Any]:
    if index and "seed" in options:
        return {**options, "seed": options["seed"] + index}
    return options


def _finish_reason(final: Any) -> str:
    return _FINISH.get(final.done_reason or "stop", "stop")


def _collected(head: dict[str, Any], kind: str, choices: list[dict[str, Any]], finals: list[Any]) -> dict[str, Any]:
    """A whole (non-streamed) answer: its choices and the usage summed over them."""
    usage = _sum_usage([_usage(final) for final in finals])
    return {**head, "object": kind, "choices": choices, "usage": usage}


def _stream_end(chunk_head: dict[str, Any], include_usage: bool, usages: list[dict[str, Any]]) -> bytes:
    """The end of an SSE stream: the usage chunk when asked for, then `[DONE]`."""
    usage = _sse({**chunk_head, "choices": [], "usage": _sum_usage(usages)}) if include_usage and usages else b""
    return usage + _sse("[DONE]")


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(request: Request, make: Any, n: int, shape: Any) -> AsyncIterator[tuple[int, Any]]:
    manager = manager_of(request)
    priority = request.headers.get(PRIORITY_HEADER)
    timeout = request.app.state.settings.request_timeout
    streams = [make(manager, index, priority, timeout) for index in range(n)]
    return await first_then_rest(_merged(streams))


def chat_call(body: dict[str, Any], settings: Any) -> NativeCall:
    """A chat completion body as native chat requests (one per choice) and the collector of their answers."""
    options, n, response_format = _options(body, settings), _n(body, settings), _format(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    native_messages, call_names = [], {}
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequestError("each message must be an object with role and content")
        role = "system" if message.get("role") == "developer" else message.get("role")
        native_messages.append(
            {"role": role, "content": _message_text(message.get("content")), **from_openai_message(message, call_names)}
        )
    model = body.get("model")
    tools = body.get("tools") or None  # parallel_tool_calls is accepted and ignored
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError('tools must be a list of {"type": "function", "function": {...}} objects')
    base = build_request(
        ChatRequest,
        model=model or "",
        messages=native_messages,
        format=response_format,
        stream=True,
        options=options,
        tools=tools,
        tool_choice=body.get("tool_choice"),
        **chat_fields(body),
    )
    requests = [base.model_copy(update={"options": _seeded(options, index)}) for index in range(n)]
    return NativeCall("chat", requests, ChatCollector(base, n, model))


class ChatCollector:
    """Collects the chunks of n chat answers into one chat.completion body."""

    def __init__(self, base: ChatRequest, n: int, model: Any) -> None:
        self.with_logprobs = base.logprobs
        self.head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "ember",
        }
        self.texts, self.finals = [""] * n, [None] * n
        self.calls: list[list[Any]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def add(self, index: int, chunk: Any) -> None:
        self.texts[index] += chunk.message.content
        self.logprobs[index] += entries_of(chunk)
        self.calls[index].extend(chunk.message.tool_calls or ())
        if chunk.done:
            self.finals[index] = chunk

    def body(self) -> dict[str, Any]:
        texts, calls = self.texts, self.calls
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i] or (None if calls[i] else "")}
                | ({"tool_calls": [openai_tool_call(call) for call in calls[i]]} if calls[i] else {}),
                "logprobs": chat_logprobs(self.logprobs[i] if self.with_logprobs else None),
                "finish_reason": "tool_calls" if calls[i] else _finish_reason(self.finals[i]),
            }
            for i in range(len(texts))
        ]
        return _collected(self.head, "chat.completion", choices, self.finals)


@router.post("/v1/chat/completions", openapi_extra=schemas.OPENAI_CHAT)
async def chat_completions(request: Request) -> Response:
    body = await read_json(request)
    call = chat_call(body, request.app.state.settings)
    base, n = call.requests[0], len(call.requests)

    def make(manager: Any, index: int, priority: Any, timeout: Any) -> AsyncIterator[Any]:
        return manager.chat(call.requests[index], priority=priority, timeout=timeout)

    chunks = await _stream(request, make, n, None)
    head = call.collector.head
    if not body.get("stream"):
        async for index, chunk in chunks:
            call.collector.add(index, chunk)
        return JSONResponse(call.collector.body())
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        for index in range(n):
            yield _sse(
                {
                    **chunk_head,
                    "choices": [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        usages, calls_sent = [], [0] * n
        try:
            async for index, chunk in chunks:
                if chunk.message.content or chunk.logprobs:
                    yield _sse(
                        {
                            **chunk_head,
                            "choices": [
                                {
                                    "index": index,
                                    "delta": {"content": chunk.message.content},
                                    "logprobs": chat_logprobs(entries_of(chunk) if base.logprobs else None),
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                if chunk.message.tool_calls:  # whole calls, after the text before them
                    new_calls, first = chunk.message.tool_calls, calls_sent[index]
                    calls_sent[index] += len(new_calls)
                    delta = {"tool_calls": [openai_tool_call(c, first + k) for k, c in enumerate(new_calls)]}
                    yield _sse(
                        {
                            **chunk_head,
                            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
                        }
                    )
                if chunk.done:
                    usages.append(_usage(chunk))
                    reason = "tool_calls" if calls_sent[index] else _finish_reason(chunk)
                    yield _sse(
                        {
                            **chunk_head,
                            "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}],
                        }
                    )
        except EmberError as error:
            yield _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}})
            return
        yield _stream_end(chunk_head, include_usage, usages)

    return StreamingResponse(events(), media_type="text/event-stream")


def completion_call(body: dict[str, Any], settings: Any) -> NativeCall:
    """A (legacy) completion body as native raw generate requests (one per choice) and their collector."""
    options, n = _options(body, settings), _n(body, settings)
    options.setdefault("num_predict", 16)  # OpenAI's default max_tokens for completions
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string (lists of prompts are not supported)")
    if body.get("suffix"):
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported; put the text in the prompt")
    model = body.get("model")
    base = build_request(
        GenerateRequest,
        model=model or "",
        prompt=prompt,
        raw=True,
        stream=True,
        options=options,
        format=_format(body),
        **completion_fields(body),
    )
    requests = [base.model_copy(update={"options": _seeded(options, index)}) for index in range(n)]
    return NativeCall("generate", requests, CompletionCollector(base, n, model, echo=bool(body.get("echo"))))


class CompletionCollector:
    """Collects the chunks of n raw completions into one text_completion body."""

    def __init__(self, base: GenerateRequest, n: int, model: Any, *, echo: bool) -> None:
        self.with_logprobs, self.prompt, self.echo = base.logprobs, base.prompt, echo
        self.offsets = Offsets(n, len(base.prompt) if echo else 0)  # where each choice's generated text starts
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "ember",
        }
        self.texts, self.finals = [base.prompt if echo else ""] * n, [None] * n
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def add(self, index: int, chunk: Any) -> None:
        self.texts[index] += chunk.response
        self.logprobs[index] += entries_of(chunk)
        if chunk.done:
            self.finals[index] = chunk

    def body(self) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": self.texts[i],
                "logprobs": self.offsets.shape(i, self.logprobs[i]) if self.with_logprobs else None,
                "finish_reason": _finish_reason(self.finals[i]),
            }
            for i in range(len(self.texts))
        ]
        return _collected(self.head, "text_completion", choices, self.finals)


@router.post("/v1/completions", openapi_extra=schemas.OPENAI_COMPLETION)
async def completions(request: Request) -> Response:
    body = await read_json(request)
    call = completion_call(body, request.app.state.settings)
    base, n = call.requests[0], len(call.requests)
    collector = call.collector
    assert isinstance(collector, CompletionCollector)
    prompt, echo, offsets = base.prompt, collector.echo, collector.offsets

    def make(manager: Any, index: int, priority: Any, timeout: Any) -> AsyncIterator[Any]:
        return manager.generate(call.requests[index], priority=priority, timeout=timeout)

    chunks = await _stream(request, make, n, None)
    head = collector.head
    if not body.get("stream"):
        async for index, chunk in chunks:
            collector.add(index, chunk)
        return JSONResponse(collector.body())
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        chunk_head = {**head, "object": "text_completion"}
        if echo:
            for index in range(n):
                yield _sse(
                    {
                        **chunk_head,
                        "choices": [{"index": index, "text": prompt, "logprobs": None, "finish_reason": None}],
                    }
                )
        usages = []
        try:
            async for index, chunk in chunks:
                reason = _finish_reason(chunk) if chunk.done else None
                if chunk.response or chunk.done or chunk.logprobs:
                    shaped = offsets.shape(index, entries_of(chunk)) if base.logprobs else None
                    yield _sse(
                        {
                            **chunk_head,
                            "choices": [
                                {"index": index, "text": chunk.response, "logprobs": shaped, "finish_reason": reason}
                            ],
                        }
                    )
                if chunk.done:
                    usages.append(_usage(chunk))
        except EmberError as error:
            yield _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}})
            return
        yield _stream_end(chunk_head, include_usage, usages)

    return StreamingResponse(events(), media_type="text/event-stream")


def _model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "ember"}


def _known_models() -> list[dict[str, Any]]:
    cards = {str(m.name): _model_card(str(m.name), m.modified) for m in ModelStore().list()}
    default = f"{DEFAULT_MODEL.name}:latest"
    if default not in cards:
        try:
            path = DEFAULT_MODEL.locate()
        except EmberError:
            return list(cards.values())
        cards[default] = _model_card(default, path.stat().st_mtime)
    return list(cards.values())


@router.get("/v1/models")
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": await asyncio.to_thread(_known_models)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str) -> dict[str, Any]:
    try:
        source = await asyncio.to_thread(resolve_model, model_id)
    except (ModelNotFoundError, InvalidRequestError):
        raise ModelNotFoundError(f"The model '{model_id}' does not exist") from None
    return _model_card(source.name if ":" in model_id else model_id, source.path.stat().st_mtime)
