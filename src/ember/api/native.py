"""ember's own routes: liveness and readiness, metrics, tokenizing, the server's live numbers (/api/stats), and
a WebSocket stream of tokens."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect

from ember.api import schemas
from ember.api.bodies import parse, read_json
from ember.api.ollama import chunk_json, manager_of
from ember.api.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest
from ember.errors import EmberError, InvalidRequestError
from ember.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ember.serve.tracking import RequestRecord, open_request, request_id, take_body_timeout
from ember.store.resolve import LLAMA_CPP, resolve_model

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The server is up (open even when API keys are set, for load balancers and supervisors)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, Any]:
    """A model can be served: the default model (or any loaded one) is there."""
    settings = request.app.state.settings
    loaded = [row.name for row in manager_of(request).ps()]
    if not loaded:
        await asyncio.to_thread(resolve_model, settings.default_model)
    return {"status": "ready", "loaded": loaded, "default_model": settings.default_model}


async def _tokenizer(name: str) -> Any:
    from ember.engine.llamacpp import LlamaModel
    from ember.options import load_options

    source = await asyncio.to_thread(resolve_model, name)
    if source.upstream is not None:
        raise InvalidRequestError(f"{source.name} is an upstream model: its tokenizer is on its server")
    if source.engine != LLAMA_CPP:
        raise InvalidRequestError(f"{source.name} runs on the {source.engine} engine: /api/tokenize reads GGUF models")
    return await asyncio.to_thread(LlamaModel.vocab_only, source.path, load_options({}))


@router.post("/api/tokenize", openapi_extra=schemas.TOKENIZE)
async def tokenize(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    name, text = body.get("model"), body.get("content", body.get("text"))
    if not isinstance(name, str) or not isinstance(text, str):
        raise InvalidRequestError('give {"model": NAME, "content": TEXT}')
    model = await _tokenizer(name)
    try:
        tokens = model.tokenize(
            text, add_special=bool(body.get("add_special", False)), parse_special=bool(body.get("parse_special", False))
        )
    finally:
        model.close()
    return {"model": name, "tokens": tokens}


@router.post("/api/detokenize", openapi_extra=schemas.DETOKENIZE)
async def detokenize(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    name, tokens = body.get("model"), body.get("tokens")
    if not isinstance(name, str) or not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise InvalidRequestError('give {"model": NAME, "tokens": [INT, ...]}')
    model = await _tokenizer(name)
    try:
        for token in tokens:
            model.validate_token(token)
        text = model.detokenize(tokens)
    finally:
        model.close()
    return {"model": name, "content": text}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format (serve/metrics.py); behind the API key unless EMBER_METRICS_PUBLIC=1."""
    body = await asyncio.to_thread(request.app.state.metrics.exposition)  # NVML reads may block briefly
    return Response(body, media_type=METRICS_CONTENT_TYPE)


@router.get("/api/errors")
async def recent_errors(request: Request) -> dict[str, Any]:
    """The last requests that failed (status 400 and up), oldest first: what `ember top` shows."""
    return {"errors": list(request.app.state.recent_errors)}


@router.websocket("/api/ws")
async def stream_socket(socket: WebSocket) -> None:
    """Each message `{"type": "generate"|"chat", ...request}` is answered by chunk messages (Ollama's shape),
    the last with done=true; `{"type": "cancel"}` stops the current answer; errors arrive as {"error": ...}.
    A request is read like the HTTP route's body and goes through the same manager, so the same checks and
    caps apply."""
    await socket.accept()
    manager = socket.app.state.manager
    current: asyncio.Task[None] | None = None

    async def answer(payload: dict[str, Any]) -> None:
        kind = payload.pop("type", "generate")
        # Each message is a request of its own: its own record (this task's copy of the context), its own timeout.
        open_request(RequestRecord(id=request_id(None), route="/api/ws", method="WS"))
        try:
            take_body_timeout(payload, socket.app.state.settings.max_timeout)
            if kind == "chat":
                chunks = manager.chat(parse(OllamaChatRequest, payload).to_native())
            elif kind == "generate":
                chunks = manager.generate(parse(OllamaGenerateRequest, payload).to_native())
            else:
                raise InvalidRequestError(f"unknown message type {kind!r}: use generate, chat or cancel")
            async for chunk in chunks:
                await socket.send_json(chunk_json(chunk))
        except EmberError as error:
            await socket.send_json({"error": str(error)})

    try:
        while True:
            message = await socket.receive_json()
            if not isinstance(message, dict):
                await socket.send_json({"error": "each message must be a JSON object"})
                continue
            if message.get("type") == "cancel":
                if current is not None:
                    current.cancel()
                continue
            if current is not None and not current.done():
                await socket.send_json({"error": 'an answer is still streaming; send {"type": "cancel"} first'})
                continue
            current = asyncio.create_task(answer(message))
    except (WebSocketDisconnect, RuntimeError):
        pass
    except ValueError:
        await socket.close(code=1003, reason="messages must be JSON")
    finally:
        if current is not None:
            current.cancel()


@router.get("/api/stats")
async def stats(request: Request) -> dict[str, Any]:
    """What the server does now: rates over the last minute, and per loaded model its slots, queue and size;
    the machine's memory. The page's live view polls this."""
    from ember.serve.memory import system_memory

    manager = manager_of(request)
    models = [
        {
            "name": row.name,
            "size": row.size,
            "size_vram": row.size_vram,
            "num_ctx": row.num_ctx,
            "slots": row.slots,
            "slots_in_use": row.slots_in_use,
            "queued": row.queued,
        }
        for row in manager.ps()
    ]
    memory = await asyncio.to_thread(system_memory)
    return {
        **manager.stats.snapshot(),
        "queued": sum(model["queued"] for model in models),
        "slots_in_use": sum(model["slots_in_use"] for model in models),
        "slots": sum(model["slots"] for model in models),
        "models": models,
        "memory": {"total": memory.total, "available": memory.available, "models": sum(m["size"] for m in models)},
    }
