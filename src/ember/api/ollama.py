"""The Ollama API (docs/api.md): generate, chat, models, running models, version.

Streams are NDJSON, one JSON object per line, the last with done=true and the timings; an error after the
stream began arrives as a line `{"error": "..."}`. `stream: false` returns the collected answer at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember import __version__
from ember.api import schemas
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.serve.manager import ModelManager
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.pull import format_parameter_count
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from ember.types import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse, Message, build_request

router = APIRouter()
PRIORITY_HEADER = "x-ember-priority"


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return value


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


def check_caps(request: Request, options: dict[str, Any] | None) -> None:
    settings = request.app.state.settings
    if not options:
        return
    for name, cap in (("num_predict", settings.max_num_predict), ("num_ctx", settings.max_num_ctx)):
        value = options.get(name)
        if isinstance(value, int) and value > cap:
            raise InvalidRequestError(f"{name}={value} is above this server's limit of {cap}")


def chunk_json(chunk: GenerateResponse | ChatResponse) -> dict[str, Any]:
    if not chunk.done:
        data = {"model": chunk.model, "created_at": chunk.created_at, "done": False}
        if isinstance(chunk, GenerateResponse):
            data["response"] = chunk.response
        else:
            data["message"] = {"role": "assistant", "content": chunk.message.content}
            if chunk.message.tool_calls:
                data["message"]["tool_calls"] = [c.model_dump(exclude_none=True) for c in chunk.message.tool_calls]
        if chunk.logprobs is not None:
            data["logprobs"] = [entry.model_dump() for entry in chunk.logprobs]
        return data
    return chunk.model_dump(exclude_none=True)


def ndjson(chunks: AsyncIterator[GenerateResponse | ChatResponse]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield (json.dumps(chunk_json(chunk)) + "\n").encode()
        except EmberError as error:
            yield (json.dumps({"error": str(error)}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def first_then_rest(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Start a stream now, so that an error before the first chunk becomes a proper HTTP error status."""
    first = await anext(chunks)

    async def rest() -> AsyncIterator[Any]:
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()


@router.post("/api/generate", openapi_extra=schemas.GENERATE)
async def generate(request: Request) -> Response:
    native = build_request(GenerateRequest, **await read_json(request))
    return await _answer(request, native, manager_of(request).generate, collect_generate)


@router.post("/api/chat", openapi_extra=schemas.CHAT)
async def chat(request: Request) -> Response:
    native = build_request(ChatRequest, **await read_json(request))
    return await _answer(request, native, manager_of(request).chat, collect_chat)


async def _answer(request: Request, native: Any, start: Any, collect: Any) -> Response:
    """Run a generate or chat request: NDJSON chunks, or (stream false) the collected answer."""
    check_caps(request, native.options)
    priority = request.headers.get(PRIORITY_HEADER)
    chunks = start(native, priority=priority, timeout=request.app.state.settings.request_timeout)
    if not native.stream:
        return JSONResponse(await collect(chunks))
    return ndjson(await first_then_rest(chunks))


async def collect_generate(chunks: AsyncIterator[GenerateResponse]) -> dict[str, Any]:
    parts, logprobs = [], []
    async for chunk in chunks:
        parts.append(chunk.response)
        logprobs.extend(chunk.logprobs or ())
        if chunk.done:
            update = {"response": "".join(parts), "logprobs": logprobs or None}
            return chunk.model_copy(update=update).model_dump(exclude_none=True)
    raise EmberError("the generation ended without a final chunk")


async def collect_chat(chunks: AsyncIterator[ChatResponse]) -> dict[str, Any]:
    parts, calls, logprobs = [], [], []
    async for chunk in chunks:
        parts.append(chunk.message.content)
        calls.extend(chunk.message.tool_calls or ())
        logprobs.extend(chunk.logprobs or ())
        if chunk.done:
            message = Message(role="assistant", content="".join(parts), tool_calls=calls or None)
            update = {"message": message, "logprobs": logprobs or None}
            return chunk.model_copy(update=update).model_dump(exclude_none=True)
    raise EmberError("the chat ended without a final chunk")


def model_details(info: GGUFInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": format_parameter_count(info.parameter_count),
        "quantization_level": info.file_type,
    }


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


@router.get("/api/tags")
async def tags() -> dict[str, Any]:
    def listing() -> list[dict[str, Any]]:
        store = ModelStore()
        models = []
        for manifest in store.list():
            try:
                info = read_gguf(store.blob_path(manifest.model_layer.digest))
            except EmberError:
                continue
            name = str(manifest.name)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": _rfc3339(manifest.modified),
                    "size": manifest.size,
                    "digest": manifest.model_layer.digest.removeprefix("sha256:"),
                    "details": model_details(info),
                }
            )
        return models

    return {"models": await asyncio.to_thread(listing)}


@router.get("/api/ps")
async def running(request: Request) -> dict[str, Any]:
    models = []
    for row in manager_of(request).ps():
        entry = manager_of(request).entries.get(row.name)
        info = read_gguf(entry.source.path) if entry is not None else None
        models.append(
            {
                "name": row.name,
                "model": row.name,
                "size": row.size,
                "digest": (row.digest or "").removeprefix("sha256:"),
                "details": model_details(info) if info is not None else {},
                "expires_at": _rfc3339(row.expires_at) if row.expires_at else "0001-01-01T00:00:00Z",
                "size_vram": row.size_vram,
                "context_length": row.num_ctx,
                "ember": {
                    "gpu_layers": row.gpu_layers,
                    "slots": row.slots,
                    "slots_in_use": row.slots_in_use,
                    "queued": row.queued,
                    "load": row.load_note,
                },
            }
        )
    return {"models": models}


@router.post("/api/stop", openapi_extra=schemas.NAMED_MODEL)
async def stop(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError('give the model to stop: {"model": "NAME"}')
    if not await manager_of(request).stop(name):
        raise ModelNotFoundError(f"model '{name}' is not loaded")
    return {"status": "stopped", "model": name}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.post("/api/show", openapi_extra=schemas.NAMED_MODEL)
async def show(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError('give the model to show: {"model": "NAME"}')
    source = await asyncio.to_thread(resolve_model, name)
    info = await asyncio.to_thread(read_gguf, source.path)
    from ember.store.modelfile import render_modelfile

    parameters = "\n".join(
        f"{key} {json.dumps(item) if isinstance(item, str) else item}"
        for key, value in source.parameters.items()
        for item in (value if isinstance(value, list) else [value])
    )
    model_info = {key: value for key, value in info.metadata.items() if not key.startswith("tokenizer.chat")}
    model_info["general.parameter_count"] = info.parameter_count
    return {
        "license": source.license or "",
        "modelfile": render_modelfile(
            from_=str(source.path),
            parameters=dict(source.parameters),
            template=source.template,
            system=source.system,
            messages=[dict(m) for m in source.messages],
            license=[source.license] if source.license else [],
            adapters=[str(path) for path in source.adapters],
        ),
        "parameters": parameters,
        "template": source.template or info.chat_template or "",
        "system": source.system or "",
        "details": model_details(info),
        "model_info": model_info,
        "messages": [dict(m) for m in source.messages],
        "ember": {
            "name": source.name,
            "digest": source.digest,
            "parameters": dict(source.parameters),
            "adapters": [str(path) for path in source.adapters],
        },
        "capabilities": ["completion", "tools"],  # tools: natively, or through ember.tools' preamble
        "modified_at": _rfc3339(time.time()),
    }
