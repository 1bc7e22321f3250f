"""The OpenAI API: /v1/chat/completions, /v1/completions and /v1/models, translated to native requests.

The bodies are the protocol models of openai_protocol.py. Streams are server-sent events ending in
`data: [DONE]`. `n` > 1 runs n sequences side by side (seeds seed, seed+1 ... when a seed is given), each a
choice with its own index; a completions request with several prompts gives n choices for each, in order.
Logprobs (chat `logprobs`/`top_logprobs`, completions `logprobs: N`) come from the raw logits: see
openai_logprobs.py. A thinking model's reasoning comes as `reasoning_content`, apart from `content`.
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
from ember.api.bodies import parse_body
from ember.api.ollama import PRIORITY_HEADER, first_then_rest, manager_of
from ember.api.openai_logprobs import Offsets, chat_logprobs, entries_of
from ember.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from ember.collect import AnswerCollector
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from ember.tools import openai_tool_call
from ember.types import ChatResponse, GenerateResponse

router = APIRouter()
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _usage(finals: list[Any], prompt_of: list[int]) -> dict[str, Any]:
    """Usage summed over the choices; each prompt's tokens counted once (the n choices of a prompt share it)."""
    prompt_tokens: dict[int, int] = {}
    cached: dict[int, int] = {}
    for final, prompt in zip(finals, prompt_of, strict=True):
        prompt_tokens.setdefault(prompt, final.prompt_eval_count + final.prompt_cached_count)
        cached.setdefault(prompt, final.prompt_cached_count)
    prompt = sum(prompt_tokens.values())
    completion = sum(final.eval_count for final in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


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


def _finish_reason(final: Any, has_calls: bool = False) -> str:
    if has_calls:
        return "tool_calls"
    return _FINISH.get(final.done_reason or "stop", "stop")


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _error_event(error: EmberError) -> bytes:
    return _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}})


def _seeded(options: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
    if index and options and "seed" in options:
        return {**options, "seed": options["seed"] + index}
    return options


async def _start(request: Request, natives: list[Any], start: Any) -> AsyncIterator[tuple[int, Any]]:
    """Start every choice's stream (choice i with seed + i), merged; an error before the first chunk is raised
    here, so it becomes the response's status."""
    priority = request.headers.get(PRIORITY_HEADER)
    timeout = request.app.state.settings.request_timeout
    streams = [start(native, priority=priority, timeout=timeout) for native in natives]
    return await first_then_rest(_merged(streams))


def _head(prefix: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "ember",
    }


# --- chat completions -------------------------------------------------------------------------------------


@router.post("/v1/chat/completions", openapi_extra=schemas.model_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    manager = manager_of(request)
    manager.limits.check_n(body.n)
    base = body.to_native()
    natives = [base.model_copy(update={"options": _seeded(base.options, i)}) for i in range(body.n)]
    chunks = await _start(request, natives, manager.chat)
    head = _head("chatcmpl", body.model)
    if not body.stream:
        return await _whole_chat(head, chunks, body)
    return StreamingResponse(_chat_events(head, chunks, body), media_type="text/event-stream")


def _chat_message(answer: ChatResponse) -> dict[str, Any]:
    message = answer.message
    calls = message.tool_calls or []
    result: dict[str, Any] = {"role": "assistant", "content": message.content or (None if calls else "")}
    if message.thinking:
        result["reasoning_content"] = message.thinking
    if calls:
        result["tool_calls"] = [openai_tool_call(call) for call in calls]
    return result


async def _whole_chat(head: dict[str, Any], chunks: AsyncIterator[tuple[int, Any]], body: Any) -> JSONResponse:
    collectors = [AnswerCollector() for _ in range(body.n)]
    async for index, chunk in chunks:
        collectors[index].add(chunk)
    answers = [collector.result() for collector in collectors]
    choices = [
        {
            "index": i,
            "message": _chat_message(answer),
            "logprobs": chat_logprobs(entries_of(answer) if body.logprobs else None),
            "finish_reason": _finish_reason(answer, bool(answer.message.tool_calls)),
        }
        for i, answer in enumerate(answers)
    ]
    result = {**head, "object": "chat.completion", "choices": choices, "usage": _usage(answers, [0] * body.n)}
    if answers[0].truncated_messages:
        result["truncated_messages"] = answers[0].truncated_messages  # ember: the oldest turns that went
    return JSONResponse(result)


async def _chat_events(head: dict[str, Any], chunks: AsyncIterator[tuple[int, Any]], body: Any) -> AsyncIterator[bytes]:
    chunk_head = {**head, "object": "chat.completion.chunk"}

    def event(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**chunk_head, "choices": [choice]})

    for index in range(body.n):
        yield event(index, {"role": "assistant", "content": ""})
    finals: list[Any] = [None] * body.n
    calls_sent = [0] * body.n
    try:
        async for index, chunk in chunks:
            message = chunk.message
            if message.thinking:
                yield event(index, {"reasoning_content": message.thinking})
            if message.content or chunk.logprobs:
                logprobs = chat_logprobs(entries_of(chunk) if body.logprobs else None)
                yield event(index, {"content": message.content}, logprobs)
            if message.tool_calls:  # whole calls, after the text before them, numbered by `index`
                first = calls_sent[index]
                calls_sent[index] += len(message.tool_calls)
                calls = [openai_tool_call(call, first + k) for k, call in enumerate(message.tool_calls)]
                yield event(index, {"tool_calls": calls})
            if chunk.done:
                finals[index] = chunk
                yield event(index, {}, None, _finish_reason(chunk, bool(calls_sent[index])))
    except EmberError as error:
        yield _error_event(error)
        return
    if body.include_usage:
        yield _sse({**chunk_head, "choices": [], "usage": _usage(finals, [0] * body.n)})
    yield _sse("[DONE]")


# --- completions ------------------------------------------------------------------------------------------


@router.post("/v1/completions", openapi_extra=schemas.model_body(CompletionRequest))
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    manager = manager_of(request)
    manager.limits.check_n(body.n)
    prompts = body.prompts()
    if body.echo and not all(isinstance(prompt, str) for prompt in prompts):
        raise InvalidRequestError("echo needs text prompts; send the prompt as a string")
    natives, prompt_of = [], []
    for number, prompt in enumerate(prompts):
        base = body.to_native(prompt)
        for i in range(body.n):
            natives.append(base.model_copy(update={"options": _seeded(base.options, i)}))
            prompt_of.append(number)
    echoes = [prompts[number] if body.echo else "" for number in prompt_of]
    chunks = await _start(request, natives, manager.generate)
    head = _head("cmpl", body.model)
    offsets = Offsets(len(natives), 0)  # where each choice's generated text starts
    offsets.next = [len(echo) for echo in echoes]
    if not body.stream:
        return await _whole_completion(head, chunks, body, echoes, prompt_of, offsets)
    return StreamingResponse(
        _completion_events(head, chunks, body, echoes, prompt_of, offsets), media_type="text/event-stream"
    )


async def _whole_completion(
    head: dict[str, Any], chunks: Any, body: Any, echoes: list[Any], prompt_of: list[int], offsets: Offsets
) -> JSONResponse:
    collectors = [AnswerCollector() for _ in echoes]
    async for index, chunk in chunks:
        collectors[index].add(chunk)
    answers: list[GenerateResponse] = [collector.result() for collector in collectors]
    choices = [
        {
            "index": i,
            "text": echoes[i] + answer.response,
            "logprobs": offsets.shape(i, entries_of(answer)) if body.logprobs is not None else None,
            "finish_reason": _finish_reason(answer),
        }
        for i, answer in enumerate(answers)
    ]
    return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": _usage(answers, prompt_of)})


async def _completion_events(
    head: dict[str, Any], chunks: Any, body: Any, echoes: list[Any], prompt_of: list[int], offsets: Offsets
) -> AsyncIterator[bytes]:
    chunk_head = {**head, "object": "text_completion"}

    def event(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**chunk_head, "choices": [choice]})

    for index, echo in enumerate(echoes):
        if echo:
            yield event(index, echo)
    finals: list[Any] = [None] * len(echoes)
    try:
        async for index, chunk in chunks:
            if chunk.response or chunk.done or chunk.logprobs:
                shaped = offsets.shape(index, entries_of(chunk)) if body.logprobs is not None else None
                yield event(index, chunk.response, shaped, _finish_reason(chunk) if chunk.done else None)
            if chunk.done:
                finals[index] = chunk
    except EmberError as error:
        yield _error_event(error)
        return
    if body.include_usage:
        yield _sse({**chunk_head, "choices": [], "usage": _usage(finals, prompt_of)})
    yield _sse("[DONE]")


# --- models -----------------------------------------------------------------------------------------------


def _model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "ember"}


def _known_models() -> list[dict[str, Any]]:
    # The store lists the bundled default model too (registered when the store is first used).
    return [_model_card(str(m.name), m.modified) for m in ModelStore().list()]


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
