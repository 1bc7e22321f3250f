"""The HTTP server: one FastAPI app with the Ollama API, the OpenAI API and ember's own routes.

Every route reads its body into a protocol model (ollama_protocol.py, openai_protocol.py,
anthropic_protocol.py), turns it into ember's native request type and goes through one ModelManager, which
resolves and validates it (serve/resolve.py), so the Ollama, OpenAI and Anthropic routes share one code path.
Errors leave as `{"error": "..."}` (OpenAI routes: OpenAI's error object; Anthropic routes: Anthropic's) with
the status the EmberError carries; nothing else, and never a traceback.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.api.anthropic import error_type, is_anthropic_path
from ember.api.request_log import install_request_log
from ember.api.security import install_security
from ember.config import Settings
from ember.conversations.store import ConversationStore
from ember.conversations.turns import ConversationService
from ember.errors import EmberError
from ember.jobs.schedules import server_scheduler
from ember.serve.alerts import Alerts
from ember.serve.circuit import CircuitBreakers
from ember.serve.deadlines import Deadlines
from ember.serve.events import JsonLines, ServerEvents
from ember.serve.manager import ModelManager, parse_keep_alive
from ember.serve.metrics import ServeMetrics
from ember.serve.resolve import Limits
from ember.serve.response_cache import ResponseCache
from ember.serve.tracking import current_request

log = logging.getLogger(__name__)


def create_manager(
    settings: Settings, metrics: ServeMetrics | None = None, events: ServerEvents | None = None
) -> ModelManager:
    return ModelManager(
        default_options={"num_parallel": settings.num_parallel},
        keep_alive=parse_keep_alive(settings.keep_alive, 300.0),
        max_loaded=settings.max_loaded_models,
        max_queued=settings.max_queue,
        limits=Limits.from_settings(settings),
        load_timeout=settings.load_timeout,
        batch_slots=settings.batch_slots,
        deadlines=Deadlines(first_token=settings.first_token_timeout, total=settings.total_timeout),
        metrics=metrics,
        events=events,
        log_content=settings.log_content,
        breakers=CircuitBreakers(
            threshold=settings.circuit_failures,
            window=settings.circuit_window,
            cooldown=settings.circuit_cooldown,
            events=events,
        ),
        fallbacks=settings.fallback_map(),
        response_cache=ResponseCache(settings.response_cache) if settings.response_cache else None,
    )


def create_conversations(settings: Settings, manager: ModelManager) -> ConversationService:
    store = ConversationStore(settings.home / "ember.db")
    return ConversationService(store, manager, default_model=settings.default_model)


def create_app(settings: Settings | None = None, manager: ModelManager | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.manager = manager or create_manager(settings, app.state.metrics, app.state.events)
        app.state.metrics.watch(app.state.manager)
        app.state.conversations = create_conversations(settings, app.state.manager)
        from ember.api.openai_batches import create_batch_service

        app.state.batches = create_batch_service(app.state.manager, settings)
        await app.state.batches.start()  # resumes the batches a stopped server left unfinished
        app.state.scheduler = server_scheduler(settings.home, app.state.manager)
        app.state.alerts = Alerts(settings, manager=app.state.manager, latencies=app.state.metrics.recent_ttft)
        app.state.events.listeners.append(app.state.alerts.on_event)
        app.state.scheduler.on_failure = app.state.alerts.scheduled_run_failed
        await app.state.alerts.start()
        if settings.schedules:
            await app.state.scheduler.start()
        try:
            yield
        finally:
            await app.state.scheduler.stop()
            await app.state.alerts.stop()
            await app.state.batches.close()
            await app.state.manager.close()
            app.state.conversations.close()
            if app.state.events.sink is not None:
                app.state.events.sink.close()

    app = FastAPI(
        title="ember",
        version=__version__,
        lifespan=lifespan,
        description="A local LLM runtime: the Ollama API, the OpenAI API and native routes.",
    )
    app.state.settings = settings
    app.state.metrics = ServeMetrics()
    app.state.recent_errors = deque(maxlen=50)  # GET /api/errors, for `ember top`
    app.state.events = ServerEvents(JsonLines(settings.home / "logs" / "server.jsonl", settings.log_max_bytes))
    install_security(app, settings)
    install_request_log(app, settings)  # outermost: refused requests get an id and a log line too
    _install_error_handlers(app)

    from ember.api import (
        anthropic,
        conversations,
        documents,
        embeddings,
        native,
        ollama,
        ollama_models,
        openai,
        openai_batches,
        openai_conversations,
        openai_responses,
        presets,
        schedules,
        web,
    )

    app.include_router(web.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(ollama_models.router)
    app.include_router(openai.router)
    app.include_router(native.router)
    app.include_router(embeddings.router)
    app.include_router(openai_batches.router)
    app.include_router(schedules.router)
    app.include_router(conversations.router)
    app.include_router(presets.router)
    app.include_router(documents.router)
    app.include_router(openai_responses.router)
    app.include_router(openai_conversations.router)
    return app


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str, kind: str | None = None) -> dict[str, Any]:
    """An error in the shape of the API the path belongs to: Anthropic's, OpenAI's, or Ollama's."""
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": error_type(status), "message": message}}
    if is_openai_path(path):
        error_type_name = kind or ("invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": error_type_name, "param": None, "code": None}}
    return {"error": message}


def error_response(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None, kind: str | None = None
) -> JSONResponse:
    record = current_request()
    if record is not None:  # the request log's line says why
        record.error = message
    return JSONResponse(error_body(request.url.path, status, message, kind), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EmberError)
    async def ember_error(request: Request, error: EmberError) -> JSONResponse:
        retry_after = getattr(error, "retry_after", None)  # busy, or a model whose circuit is open
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        kind = "not_found_error" if error.http_status == 404 else None
        return error_response(request, error.http_status, str(error), headers, kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for detail in error.errors():
            where = ".".join(str(part) for part in detail.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {detail.get('msg')}")
        return error_response(request, 400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail) if error.detail else "error"
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error: {type(error).__name__}; see the server's log")
