"""One record per request: its id (X-Request-Id, accepted and echoed), its timeout header, its log line.

Plain ASGI middleware, outside the security guard so that refused requests are logged and counted too (and,
like security.py, not BaseHTTPMiddleware, so streams and disconnects are left as the app has them). It opens
a RequestRecord (serve/tracking.py) that the manager fills in, and when the response ends writes one JSON line
to EMBER_HOME/logs/requests.jsonl and counts the request on /metrics. The model that answered goes back in
an `X-Ember-Model` header (a fallback may answer for the model asked for).
"""

from __future__ import annotations

import logging
from typing import Any

from ember.config import Settings
from ember.errors import EmberError
from ember.serve.events import JsonLines, utc_time
from ember.serve.observe import CLIENT_LEFT
from ember.serve.tracking import (
    TIMEOUT_HEADER,
    RequestRecord,
    close_request,
    open_request,
    parse_timeout,
    request_id,
)

Scope = dict[str, Any]
UNLOGGED_PATHS = frozenset({"/health", "/metrics"})  # scraped every few seconds: counted, never logged


def log_line(record: RequestRecord, duration: float, with_content: bool) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": record.id,
        "time": utc_time(record.arrived),
        "method": record.method,
        "route": record.route,
        "model": record.model,
        "served_by": record.served_by,
        "status": record.status,
        "client": record.client,
        "prompt_tokens": record.prompt_tokens,
        "eval_tokens": record.eval_tokens,
        "cached_tokens": record.cached_tokens,
        "ttft_ms": None if record.ttft is None else round(record.ttft * 1000, 1),
        "duration_ms": round(duration * 1000, 1),
        "from_cache": record.from_cache,
        "error": record.error,
    }
    if with_content:
        line["prompt"] = record.prompt
        line["answer"] = "".join(record.answer)
    return line


class RequestTracker:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.log = JsonLines(settings.home / "logs" / "requests.jsonl", settings.log_max_bytes)
        self.with_content = settings.log_content

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        client = scope.get("client")
        record = RequestRecord(
            id=request_id(headers.get("x-request-id")),
            route=scope.get("path", ""),
            method=scope.get("method", "WS"),
            client=f"{client[0]}:{client[1]}" if client else None,
        )
        token = open_request(record)
        try:
            given = headers.get(TIMEOUT_HEADER)
            if given is not None:
                try:
                    record.total_timeout = parse_timeout(given, "the X-Ember-Timeout header", self.settings.max_timeout)
                except EmberError as error:
                    from ember.api.security import _refuse

                    record.status, record.error = error.http_status, str(error)
                    await _refuse(scope, send, error.http_status, str(error))
                    return
            await self.app(scope, receive, self._sending(record, send))
        except BaseException as error:
            record.status = record.status or 500
            record.error = record.error or f"{type(error).__name__}: {error}"
            raise
        finally:
            close_request(token)
            self._finished(scope, record)

    def _sending(self, record: RequestRecord, send: Any) -> Any:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                extra = [(b"x-request-id", record.id.encode())]
                if record.served_by:
                    extra.append((b"x-ember-model", record.served_by.encode("utf-8", "replace")))
                if record.from_cache:
                    extra.append((b"x-ember-cache", b"hit"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "websocket.accept":
                record.status = 101
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", record.id.encode())]}
            await send(message)

        return sending

    def _finished(self, scope: Scope, record: RequestRecord) -> None:
        duration = record.elapsed()
        route = scope.get("route")
        template = getattr(route, "path", None) or ("unmatched" if record.status == 404 else record.route)
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if metrics is not None:
            metrics.count_request(template, record.method, record.status or 0)
        if record.error and not record.error.startswith(CLIENT_LEFT) and "app" in scope:  # GET /api/errors
            scope["app"].state.recent_errors.append(
                {
                    "time": utc_time(record.arrived),
                    "route": record.route,
                    "status": record.status,
                    "model": record.model,
                    "error": record.error[:300],
                    "id": record.id,
                }
            )
        if record.route in UNLOGGED_PATHS:
            return
        try:
            self.log.write(log_line(record, duration, self.with_content))
        except OSError:  # a full disk loses a log line, never the answer
            logging.getLogger(__name__).warning("could not write the request log", exc_info=True)


def install_request_log(app: Any, settings: Settings) -> None:
    """Outermost middleware: every request, refused or not, gets an id, a record and a log line."""
    app.add_middleware(RequestTracker, settings=settings)
