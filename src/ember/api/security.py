"""Safe by default: API keys, a Host allow-list against DNS rebinding, a body size limit, and CORS.

The Host check is Ollama's (server/routes.go, allowedHostsMiddleware): a server bound to a non-loopback
address (0.0.0.0, a LAN address) was exposed on purpose and checks no Host; one bound to loopback accepts
only Host names a DNS-rebinding page cannot point at it: localhost, this machine's name, `*.localhost`,
`*.local`, `*.internal` (Docker's host.docker.internal), and loopback, private or unspecified IP addresses,
plus EMBER_ALLOWED_HOSTS. API keys, when set, apply either way.

Written as plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so that streaming responses and the
detection of a client that went away are left exactly as the app has them.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ember.config import Settings

Scope = dict[str, Any]
OPEN_PATHS = frozenset({"/health", "/"})
# The built-in page's files: open, so that the page can load and ask for the key it then sends on every call.
OPEN_PREFIX = "/web/"
# Blob uploads (model files, gigabytes) are streamed to disk, never held in memory: no body size limit there.
UNLIMITED_BODY_PREFIX = "/api/blobs/"
# Batch input uploads (multipart, spooled to disk) have their own, larger limit: EMBER_MAX_FILE_BYTES.
FILE_UPLOAD_PATH = "/v1/files"
_MULTIPART_OVERHEAD = 1024 * 1024  # the form's other fields and boundaries around the file
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class Guard:
    """Refuses, before the app sees it: a bad Host header, a missing or wrong API key, an over-large body."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.keys = [key.encode() for key in _split(settings.api_keys)]
        self.max_bytes = settings.max_request_bytes
        self.max_upload_bytes = settings.max_file_bytes + _MULTIPART_OVERHEAD
        bound_host, _ = settings.host_and_port
        self.check_host = bound_to_loopback(bound_host)
        self.allowed_hosts = {host.lower() for host in _split(settings.allowed_hosts)}
        self.open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        problem = self._refusal(scope, headers)
        if problem is not None:
            status, message = problem
            await _refuse(scope, send, status, message)
            return
        if scope["type"] == "http" and not scope.get("path", "").startswith(UNLIMITED_BODY_PREFIX):
            length = headers.get("content-length")
            limit = self.max_upload_bytes if scope.get("path") == FILE_UPLOAD_PATH else self.max_bytes
            if length is not None and length.isdigit() and int(length) > limit:
                await _refuse(scope, send, 413, f"the request body is larger than {limit} bytes")
                return
            receive = self._limited(receive, limit)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if self.check_host:
            host = headers.get("host", "")
            if not allowed_host(host, self.allowed_hosts):
                return 403, f"host {host!r} is not allowed; add it to EMBER_ALLOWED_HOSTS to serve it"
        path = scope.get("path", "")
        open_path = path in self.open_paths or path.startswith(OPEN_PREFIX)
        if self.keys and not open_path and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not any(hmac.compare_digest(token.encode(), key) for key in self.keys):
                return 401, "missing or invalid API key: send `Authorization: Bearer <key>`"
        return None

    def _limited(self, receive: Any, limit: int) -> Any:
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive


def bound_to_loopback(host: str) -> bool:
    """Whether the server listens on loopback only (a name is judged by the addresses it resolves to)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return True  # cannot tell: check the Host header, the safe side
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _host_name(header: str) -> str:
    """The name or address of a Host header, without its port or an IPv6 address's brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


def allowed_host(header: str, extra: set[str]) -> bool:
    """Ollama's rule for a server bound to loopback (see the module's docstring)."""
    name = _host_name(header)
    if not name or name == "localhost" or name in extra or header.strip().lower() in extra:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name == socket.gethostname().lower() or name.endswith(_LOCAL_SUFFIXES)
    return address.is_loopback or address.is_private or address.is_unspecified


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


async def _refuse(scope: Scope, send: Any, status: int, message: str) -> None:
    from ember.serve.tracking import current_request

    record = current_request()
    if record is not None:  # the request log's line says why it was refused
        record.error = message
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    from ember.api.app import error_body

    payload = json.dumps(error_body(scope.get("path", ""), status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def install_security(app: FastAPI, settings: Settings) -> None:
    origins = _split(settings.allowed_origins)
    # Any port of each allowed origin: browsers send e.g. http://localhost:3000 for a local web UI.
    pattern = "|".join(re.escape(origin) + r"(:\d+)?" for origin in origins) or "$^"
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=f"^({pattern})$",
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
    )
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Any, error: BodyTooLarge) -> Any:
        from ember.api.app import error_response

        return error_response(request, 413, str(error))
