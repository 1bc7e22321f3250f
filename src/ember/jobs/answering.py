"""Where the worker and the schedules get their answers: a model manager in this process, or a running server.

Both take native requests and give native chunks, so the code that answers queued messages and scheduled runs
is the same either way. `ManagerAnswerer` wraps a `ModelManager` (the server's own, inside `ember serve`, or
one of the worker's: models load in runner processes, on demand, with the server's slots and queue).
`ServerAnswerer` sends the requests to an ember server's native routes (/api/chat, /api/generate) and reads
its NDJSON stream, so the model stays loaded there and the worker's requests queue with everyone else's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ember.errors import (
    CorruptModelError,
    EmberError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
)
from ember.serve.manager import ModelManager
from ember.types import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse

NativeRequest = ChatRequest | GenerateRequest
NativeChunk = ChatResponse | GenerateResponse
_PRIORITY_HEADER = "X-Ember-Priority"
# Statuses that say the request itself is wrong: sending it again gives the same answer.
_RETRYABLE_CLIENT_STATUSES = {408, 409, 425, 429}


class RemoteError(EmberError):
    """An ember server refused a request or could not be reached; carries the status it answered (or 503)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status


def is_permanent(error: BaseException) -> bool:
    """True when trying the request again cannot help: the request or the model named is wrong."""
    if not isinstance(error, EmberError):
        return False
    return 400 <= error.http_status < 500 and error.http_status not in _RETRYABLE_CLIENT_STATUSES


class Answerer(Protocol):
    """Answers native requests; the worker and the scheduler depend on nothing else."""

    def answer(self, request: NativeRequest, *, priority: str | int | None) -> AsyncIterator[NativeChunk]:
        """The chunks of the answer, the last one with done=True and the timings."""
        ...

    async def slots(self, model: str) -> int:
        """How many requests for this model are decoded at once (a worker's prefetch)."""
        ...

    async def close(self) -> None: ...


class ManagerAnswerer:
    """Answers through a ModelManager; closes it at the end only when it owns it."""

    def __init__(self, manager: ModelManager, *, owned: bool) -> None:
        self.manager = manager
        self.owned = owned

    def answer(self, request: NativeRequest, *, priority: str | int | None) -> AsyncIterator[NativeChunk]:
        if isinstance(request, ChatRequest):
            return self.manager.chat(request, priority=priority)
        return self.manager.generate(request, priority=priority)

    async def slots(self, model: str) -> int:
        for entry in self.manager.entries.values():
            if model in (entry.name, entry.source.name) or entry.name.split(":")[0] == model:
                return entry.queue.slots
        return int(self.manager.default_options.get("num_parallel", 1))

    async def close(self) -> None:
        if self.owned:
            await self.manager.close()


class ServerAnswerer:
    """Answers through an ember server's native routes over HTTP."""

    def __init__(self, base_url: str, api_key: str | None = None, *, default_slots: int = 4) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout while an answer streams: a request may wait in the server's queue for a long time.
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(30.0, read=None))
        self.default_slots = default_slots

    async def answer(self, request: NativeRequest, *, priority: str | int | None) -> AsyncIterator[NativeChunk]:
        import httpx

        chat = isinstance(request, ChatRequest)
        path = "/api/chat" if chat else "/api/generate"
        body = request.model_dump(mode="json", exclude_none=True) | {"stream": True}
        headers = {_PRIORITY_HEADER: str(priority)} if priority is not None else {}
        kind = ChatResponse if chat else GenerateResponse
        try:
            async with self.client.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise _refusal(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    if "error" in data:  # the answer failed after it began
                        raise EngineError(f"the server's answer failed: {data['error']}")
                    yield kind.model_validate(data)
        except httpx.HTTPError as error:
            raise RemoteError(
                f"could not reach the ember server at {self.base_url} ({type(error).__name__}: {error}); "
                "is `ember serve` running there?",
                503,
            ) from None

    async def slots(self, model: str) -> int:
        import httpx

        try:
            response = await self.client.get("/api/ps")
            models = response.json().get("models", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return self.default_slots
        for row in models:
            if model in (row.get("name"), row.get("model")) or str(row.get("name", "")).split(":")[0] == model:
                return int(row.get("ember", {}).get("slots") or self.default_slots)
        return self.default_slots

    async def close(self) -> None:
        await self.client.aclose()


def _refusal(status: int, body: bytes) -> EmberError:
    try:
        data: Any = json.loads(body or b"{}")
    except ValueError:
        data = {}
    message = data.get("error") if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    text = str(message or f"the server answered {status}")
    if status == 404:
        return ModelNotFoundError(text)
    if status == 422:
        return CorruptModelError(text)
    if status == 400:
        return InvalidRequestError(text)
    return RemoteError(text, status)
