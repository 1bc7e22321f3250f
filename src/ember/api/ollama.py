"""The Ollama API (docs/api.md): generate, chat, models, running models, version.

Streams are NDJSON, one JSON object per line, the last with done=true and the timings; an error after the
stream began arrives as a line `{"error": "..."}`. `stream: false` returns the collected answer at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember import __version__
from ember.api import schemas
from ember.api.bodies import parse_body, read_json
from ember.api.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaModelRequest
from ember.capabilities import model_capabilities
from ember.collect import collect_async
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.serve.manager import ModelManager
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.model_directory import ModelDirectory, read_model_directory
from ember.store.pull import format_parameter_count
from ember.store.resolve import TRANSFORMERS, ModelSource, resolve_model
from ember.store.store import MODEL_FILES_MEDIA_TYPE, UPSTREAM_MEDIA_TYPE, ModelStore
from ember.types import ChatResponse, GenerateResponse
from ember.upstream.facts import DETAILS as UPSTREAM_DETAILS
from ember.upstream.facts import upstream_info, upstream_modelfile

__all__ = ["PRIORITY_HEADER", "chunk_json", "first_then_rest", "manager_of", "read_json", "router"]

router = APIRouter()
PRIORITY_HEADER = "x-ember-priority"


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


def chunk_json(chunk: GenerateResponse | ChatResponse) -> dict[str, Any]:
    """A chunk as Ollama writes it: the text (and thinking, tool calls, logprobs) of a part, or the last
    chunk whole, with its timings."""
    if not chunk.done:
        data: dict[str, Any] = {"model": chunk.model, "created_at": chunk.created_at, "done": False}
        if isinstance(chunk, GenerateResponse):
            data["response"] = chunk.response
            if chunk.thinking:
                data["thinking"] = chunk.thinking
        else:
            data["message"] = chunk.message.model_dump(exclude_none=True)
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


@router.post("/api/generate", openapi_extra=schemas.model_body(OllamaGenerateRequest))
async def generate(request: Request) -> Response:
    native = (await parse_body(request, OllamaGenerateRequest)).to_native()
    return await _answer(request, native, manager_of(request).generate)


@router.post("/api/chat", openapi_extra=schemas.model_body(OllamaChatRequest))
async def chat(request: Request) -> Response:
    native = (await parse_body(request, OllamaChatRequest)).to_native()
    return await _answer(request, native, manager_of(request).chat)


async def _answer(request: Request, native: Any, start: Any) -> Response:
    """Run a generate or chat request: NDJSON chunks, or (stream false) the collected answer. A request that
    only loads or unloads the model (no prompt) gets one JSON object either way, as from Ollama."""
    priority = request.headers.get(PRIORITY_HEADER)
    chunks = start(native, priority=priority, timeout=request.app.state.settings.request_timeout)
    if not native.stream:
        return JSONResponse((await collect_async(chunks)).model_dump(exclude_none=True))
    first = await anext(chunks)
    if first.done and first.done_reason in ("load", "unload"):
        return JSONResponse(first.model_dump(exclude_none=True))

    async def rest() -> AsyncIterator[Any]:
        yield first
        async for chunk in chunks:
            yield chunk

    return ndjson(rest())


def directory_details(directory: ModelDirectory) -> dict[str, Any]:
    """`details` of a transformers model directory."""
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": directory.architecture,
        "families": [directory.architecture],
        "parameter_size": format_parameter_count(directory.parameter_count),
        "quantization_level": directory.stored_dtype,
    }


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
@router.head("/api/tags")
async def tags() -> dict[str, Any]:
    def listing() -> list[dict[str, Any]]:
        store = ModelStore()
        models = []
        for manifest in store.list():
            try:
                layer = manifest.model_layer
                if layer.media_type == UPSTREAM_MEDIA_TYPE:
                    details = UPSTREAM_DETAILS
                elif layer.media_type == MODEL_FILES_MEDIA_TYPE:
                    details = directory_details(read_model_directory(store.model_tree(layer)))
                else:
                    details = model_details(read_gguf(store.blob_path(layer.digest)))
            except (EmberError, OSError):
                continue
            name = str(manifest.name)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": _rfc3339(manifest.modified),
                    "size": manifest.size,
                    "digest": manifest.model_layer.digest.removeprefix("sha256:"),
                    "details": details,
                }
            )
        return models

    return {"models": await asyncio.to_thread(listing)}


@router.get("/api/ps")
async def running(request: Request) -> dict[str, Any]:
    models = []
    for row in manager_of(request).ps():
        entry = manager_of(request).entries.get(row.name)
        details: dict[str, Any] = {}
        if entry is not None and entry.source.upstream is not None:
            details = UPSTREAM_DETAILS
        elif entry is not None and entry.source.engine == TRANSFORMERS:
            details = directory_details(read_model_directory(entry.source.path))
        elif entry is not None:
            details = model_details(read_gguf(entry.source.path))
        models.append(
            {
                "name": row.name,
                "model": row.name,
                "size": row.size,
                "digest": (row.digest or "").removeprefix("sha256:"),
                "details": details,
                "expires_at": _rfc3339(row.expires_at) if row.expires_at else "0001-01-01T00:00:00Z",
                "size_vram": row.size_vram,
                "context_length": row.num_ctx,
                "ember": {
                    "gpu_layers": row.gpu_layers,
                    "slots": row.slots,
                    "slots_in_use": row.slots_in_use,
                    "queued": row.queued,
                    "load": row.load_note,
                    **({"replicas": row.replicas} if row.replicas is not None else {}),
                },
            }
        )
    return {"models": models}


@router.post("/api/stop", openapi_extra=schemas.model_body(OllamaModelRequest))
async def stop(request: Request) -> dict[str, Any]:
    name = (await parse_body(request, OllamaModelRequest)).model_name()
    if not name:
        raise InvalidRequestError('give the model to stop: {"model": "NAME"}')
    if not await manager_of(request).stop(name):
        raise ModelNotFoundError(f"model '{name}' is not loaded")
    return {"status": "stopped", "model": name}


@router.get("/api/version")
@router.head("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.post("/api/show", openapi_extra=schemas.model_body(OllamaModelRequest))
async def show(request: Request) -> dict[str, Any]:
    name = (await parse_body(request, OllamaModelRequest)).model_name()
    if not name:
        raise InvalidRequestError('give the model to show: {"model": "NAME"}')
    source = await asyncio.to_thread(resolve_model, name)
    if source.engine == TRANSFORMERS:
        return await asyncio.to_thread(_show_directory, source)
    if source.upstream is not None:
        return await asyncio.to_thread(_show_upstream, source)
    info = await asyncio.to_thread(read_gguf, source.path)
    capabilities = await asyncio.to_thread(model_capabilities, source)
    parameters = "\n".join(
        f"{key} {json.dumps(item) if isinstance(item, str) else item}"
        for key, value in source.parameters.items()
        for item in (value if isinstance(value, list) else [value])
    )
    model_info = {key: value for key, value in info.metadata.items() if not key.startswith("tokenizer.chat")}
    model_info["general.parameter_count"] = info.parameter_count
    return _shown(
        source,
        parameters=parameters,
        template=info.chat_template,
        details=model_details(info),
        model_info=model_info,
        capabilities=capabilities.names(),
        modified=await asyncio.to_thread(_modified, source),
    )


def _show_directory(source: ModelSource) -> dict[str, Any]:
    """/api/show of a transformers model directory: its config as model_info, its own chat template."""
    directory = read_model_directory(source.path)
    model_info: dict[str, Any] = {f"config.{key}": value for key, value in directory.config.items()}
    arch, config = directory.architecture, directory.config
    model_info.update(
        {
            "general.architecture": arch,
            "general.parameter_count": directory.parameter_count,
            f"{arch}.context_length": directory.context_length,
            f"{arch}.embedding_length": config.get("hidden_size"),
            f"{arch}.block_count": config.get("num_hidden_layers"),
        }
    )
    return _shown(
        source,
        parameters="\n".join(f"{key} {value}" for key, value in source.parameters.items()),
        template=directory.chat_template,
        details=directory_details(directory),
        model_info=model_info,
        capabilities=model_capabilities(source).names(),
        modified=_modified(source),
        files=list(directory.files),
    )


def _shown(
    source: ModelSource,
    *,
    parameters: str,
    template: str | None,
    details: dict[str, Any],
    model_info: dict[str, Any],
    capabilities: list[str],
    modified: float,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """/api/show's answer for a local model, from what its engine reads of it (GGUF header, model directory)."""
    from ember.store.modelfile import render_modelfile

    adapters = [str(path) for path in source.adapters]
    ember_facts: dict[str, Any] = {
        "name": source.name,
        "digest": source.digest,
        "parameters": dict(source.parameters),
        "adapters": adapters,
        "engine": source.engine,
    }
    if files is not None:
        ember_facts["files"] = files
    return {
        "license": source.license or "",
        "modelfile": render_modelfile(
            from_=str(source.path),
            parameters=dict(source.parameters),
            template=source.template,
            system=source.system,
            messages=[dict(m) for m in source.messages],
            license=[source.license] if source.license else [],
            adapters=adapters,
        ),
        "parameters": parameters,
        "template": source.template or template or "",
        "system": source.system or "",
        "details": details,
        "model_info": model_info,
        "messages": [dict(m) for m in source.messages],
        "ember": ember_facts,
        "capabilities": capabilities,
        "modified_at": _rfc3339(modified),
    }


def _show_upstream(source: ModelSource) -> dict[str, Any]:
    """/api/show of an upstream model: its servers and defaults, never its key."""
    return {
        "license": source.license or "",
        "modelfile": upstream_modelfile(source),
        "parameters": "\n".join(f"{key} {json.dumps(value)}" for key, value in source.parameters.items()),
        "template": "",
        "system": source.system or "",
        "details": UPSTREAM_DETAILS,
        "model_info": upstream_info(source),
        "messages": [dict(m) for m in source.messages],
        "ember": {"name": source.name, "digest": source.digest, "parameters": dict(source.parameters), "adapters": []},
        "capabilities": model_capabilities(source).names(),
        "modified_at": _rfc3339(_modified(source)),
    }


def _modified(source: ModelSource) -> float:
    """When the model was last changed: its manifest (a stored model) or its file (a path, a bundled model)."""
    if source.digest is not None:
        manifest = ModelStore().get(source.name)
        if manifest is not None:
            return manifest.modified
    return source.path.stat().st_mtime
