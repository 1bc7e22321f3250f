"""The OpenAI API: /v1/chat/completions, /v1/completions and /v1/models, translated to native requests.

The bodies are the protocol models of openai_protocol.py. Streams are server-sent events ending in
`data: [DONE]`. `n` > 1 runs n sequences side by side from one prefill of the prompt (the manager's
*_choices calls; seeds seed, seed+1 ... when a seed is given), each a choice with its own index; a completions
request with several prompts gives n choices for each, in order.
Logprobs (chat `logprobs`/`top_logprobs`, completions `logprobs: N`) come from the raw logits: see
openai_logprobs.py. A thinking model's reasoning comes as `reasoning_content`, apart from `content`.
`chat_call` and `completion_call` are what the routes run, and what batch lines and queued messages run too
(see openai_calls.py), so a body means the same on every way in.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.api import schemas
from ember.api.bodies import parse_body
from ember.api.ollama import PRIORITY_HEADER, first_then_rest, manager_of
from ember.api.openai_logprobs import Offsets, chat_logprobs, entries_of
from ember.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from ember.collect import collect_choices_async
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.serve.tracking import current_request
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from ember.tools import openai_tool_call
from ember.types import ChatRequest, ChatResponse, EmbedRequest, GenerateRequest, GenerateResponse

router = APIRouter()
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class OpenAICall:
    """The native requests one OpenAI body makes (one per prompt), how many completions of each it asks for
    (`choices`, OpenAI's n: they share the prompt's prefill, see ModelManager.chat_choices), and how their whole
    answers become the body the route returns. The routes, batch lines and queued messages all go through one: a
    single translation (the protocol models' `to_native()`), a single collection (`ember.collect`), a single
    response shape."""

    kind: Literal["chat", "generate", "embed"]
    requests: list[ChatRequest] | list[GenerateRequest] | list[EmbedRequest]
    choices: int
    head: dict[str, Any]
    # whole answers, choice c of request r at r * choices + c -> the response body
    respond: Callable[[list[Any]], dict[str, Any]]

    @property
    def answers(self) -> int:
        """How many whole answers the body is made of: `choices` for each request."""
        return len(self.requests) * self.choices

    def body(self, answers: list[Any]) -> dict[str, Any]:
        return self.respond(answers)


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


async def _merged(streams: list[AsyncIterator[tuple[int, Any]]], n: int) -> AsyncIterator[tuple[int, Any]]:
    """The (choice, chunk) items of several prompts' streams as they come, choice i of prompt p numbered
    p * n + i; an error in one ends all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(number: int, stream: AsyncIterator[tuple[int, Any]]) -> None:
        try:
            async for index, chunk in stream:
                await queue.put((number * n + index, chunk))
        except BaseException as error:  # delivered to the reader, which re-raises it
            await queue.put((number, error))
            return
        await queue.put((number, done))

    tasks = [asyncio.create_task(pump(number, stream)) for number, stream in enumerate(streams)]
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


async def _start(request: Request, call: OpenAICall, start: Any) -> AsyncIterator[tuple[int, Any]]:
    """Start the choices of every prompt of the call (`start` is the manager's generate_choices or chat_choices;
    it checks n with the other caps before loading), merged; an error before the first chunk is raised here, so
    it becomes the response's status."""
    priority = request.headers.get(PRIORITY_HEADER)
    timeout = request.app.state.settings.request_timeout
    streams = [start(native, call.choices, priority=priority, timeout=timeout) for native in call.requests]
    chunks = await first_then_rest(_merged(streams, call.choices))
    record = current_request()
    if record is not None and record.fell_back and record.served_by:  # the answer names the model that gave it
        call.head["model"] = record.served_by
    return chunks


def _head(prefix: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "ember",
    }


# --- chat completions -------------------------------------------------------------------------------------


def chat_call(body: ChatCompletionRequest) -> OpenAICall:
    """A chat completion body as a native chat request with its n choices, and its response shape."""
    head = _head("chatcmpl", body.model)
    return OpenAICall("chat", [body.to_native()], body.n, head, lambda answers: chat_completion(head, answers, body))


@router.post("/v1/chat/completions", openapi_extra=schemas.model_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    call = chat_call(body)
    chunks = await _start(request, call, manager_of(request).chat_choices)
    if not body.stream:
        return JSONResponse(call.body(await collect_choices_async(chunks, call.answers)))
    return StreamingResponse(_chat_events(call.head, chunks, body), media_type="text/event-stream")


def _chat_message(answer: ChatResponse) -> dict[str, Any]:
    message = answer.message
    calls = message.tool_calls or []
    result: dict[str, Any] = {"role": "assistant", "content": message.content or (None if calls else "")}
    if message.thinking:
        result["reasoning_content"] = message.thinking
    if calls:
        result["tool_calls"] = [openai_tool_call(call) for call in calls]
    return result


def chat_completion(head: dict[str, Any], answers: list[ChatResponse], body: ChatCompletionRequest) -> dict[str, Any]:
    """The `chat.completion` object of the whole answers, one per choice."""
    choices = [
        {
            "index": i,
            "message": _chat_message(answer),
            "logprobs": chat_logprobs(entries_of(answer) if body.logprobs else None),
            "finish_reason": _finish_reason(answer, bool(answer.message.tool_calls)),
        }
        for i, answer in enumerate(answers)
    ]
    result = {**head, "object": "chat.completion", "choices": choices, "usage": _usage(answers, [0] * len(answers))}
    if answers[0].truncated_messages:
        result["truncated_messages"] = answers[0].truncated_messages  # ember: the oldest turns that went
    return result


class ChatChunks:
    """Native chat chunks as `chat.completion.chunk` objects: the server-sent events of a streamed chat
    completion, and the chunks of a streamed queued request."""

    def __init__(self, head: dict[str, Any], n: int, logprobs: bool) -> None:
        self.head = {**head, "object": "chat.completion.chunk"}
        self.logprobs = logprobs
        self.calls_sent = [0] * n  # tool calls numbered by `index` across a choice's chunks

    def event(
        self, index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def opening(self, index: int) -> dict[str, Any]:
        return self.event(index, {"role": "assistant", "content": ""})

    def of(self, index: int, chunk: ChatResponse) -> list[dict[str, Any]]:
        """The events of one native chunk: its reasoning, its text, its whole tool calls, then (the last chunk)
        the finish reason."""
        events = []
        message = chunk.message
        if message.thinking:
            events.append(self.event(index, {"reasoning_content": message.thinking}))
        if message.content or chunk.logprobs:
            logprobs = chat_logprobs(entries_of(chunk) if self.logprobs else None)
            events.append(self.event(index, {"content": message.content}, logprobs))
        if message.tool_calls:  # whole calls, after the text before them
            first = self.calls_sent[index]
            self.calls_sent[index] += len(message.tool_calls)
            calls = [openai_tool_call(call, first + k) for k, call in enumerate(message.tool_calls)]
            events.append(self.event(index, {"tool_calls": calls}))
        if chunk.done:
            events.append(self.event(index, {}, None, _finish_reason(chunk, bool(self.calls_sent[index]))))
        return events


async def _chat_events(
    head: dict[str, Any], chunks: AsyncIterator[tuple[int, Any]], body: ChatCompletionRequest
) -> AsyncIterator[bytes]:
    shaper = ChatChunks(head, body.n, bool(body.logprobs))
    for index in range(body.n):
        yield _sse(shaper.opening(index))
    finals: list[Any] = [None] * body.n
    try:
        async for index, chunk in chunks:
            for event in shaper.of(index, chunk):
                yield _sse(event)
            if chunk.done:
                finals[index] = chunk
    except EmberError as error:
        yield _error_event(error)
        return
    if body.include_usage:
        yield _sse({**shaper.head, "choices": [], "usage": _usage(finals, [0] * body.n)})
    yield _sse("[DONE]")


# --- completions ------------------------------------------------------------------------------------------


@dataclass
class CompletionCall(OpenAICall):
    """A completions call also knows, for each choice, its prompt's number and the prompt it echoes."""

    prompt_of: list[int]
    echoes: list[str]

    def offsets(self) -> Offsets:
        offsets = Offsets(len(self.echoes), 0)  # where each choice's generated text starts
        offsets.next = [len(echo) for echo in self.echoes]
        return offsets


def completion_call(body: CompletionRequest) -> CompletionCall:
    """A completions body as native raw generate requests (one per prompt, in order, each with n choices) and its
    response shape."""
    prompts = body.prompts()
    if body.echo and not all(isinstance(prompt, str) for prompt in prompts):
        raise InvalidRequestError("echo needs text prompts; send the prompt as a string")
    requests = [body.to_native(prompt) for prompt in prompts]
    prompt_of = [number for number in range(len(prompts)) for _ in range(body.n)]  # choice -> its prompt
    echoes = [str(prompts[number]) if body.echo else "" for number in prompt_of]

    def respond(answers: list[Any]) -> dict[str, Any]:
        return text_completion(call, answers, body)

    call = CompletionCall("generate", requests, body.n, _head("cmpl", body.model), respond, prompt_of, echoes)
    return call


@router.post("/v1/completions", openapi_extra=schemas.model_body(CompletionRequest))
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    call = completion_call(body)
    chunks = await _start(request, call, manager_of(request).generate_choices)
    if not body.stream:
        return JSONResponse(call.body(await collect_choices_async(chunks, call.answers)))
    return StreamingResponse(_completion_events(call, chunks, body), media_type="text/event-stream")


def text_completion(call: CompletionCall, answers: list[GenerateResponse], body: CompletionRequest) -> dict[str, Any]:
    """The `text_completion` object of the whole answers, one per choice."""
    offsets = call.offsets()
    choices = [
        {
            "index": i,
            "text": call.echoes[i] + answer.response,
            "logprobs": offsets.shape(i, entries_of(answer)) if body.logprobs is not None else None,
            "finish_reason": _finish_reason(answer),
        }
        for i, answer in enumerate(answers)
    ]
    usage = _usage(answers, call.prompt_of)
    return {**call.head, "object": "text_completion", "choices": choices, "usage": usage}


async def _completion_events(
    call: CompletionCall, chunks: AsyncIterator[tuple[int, Any]], body: CompletionRequest
) -> AsyncIterator[bytes]:
    chunk_head = {**call.head, "object": "text_completion"}
    offsets = call.offsets()

    def event(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**chunk_head, "choices": [choice]})

    for index, echo in enumerate(call.echoes):
        if echo:
            yield event(index, echo)
    finals: list[Any] = [None] * len(call.echoes)
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
        yield _sse({**chunk_head, "choices": [], "usage": _usage(finals, call.prompt_of)})
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
