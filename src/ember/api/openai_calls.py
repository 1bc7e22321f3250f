"""One OpenAI request body as native requests: the seam that batch jobs run their lines through.

A batch line is an OpenAI body for one endpoint. `native_call` turns it into the native requests to run (one per
choice when n > 1) and a collector that turns their answers into the very body the HTTP route would return, so a
batch line's output is what a client calling the route gets. The routes in openai.py and embeddings.py build
their requests with the same functions, so there is one translation, not one per caller.

When the OpenAI protocol models with `to_native()` replace those functions, only `native_call` changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ember.errors import InvalidRequestError

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Collector(Protocol):
    """Gathers the native answers of one call (chunks tagged with their request's index) into the response body."""

    head: dict[str, Any]

    def add(self, index: int, chunk: Any) -> None: ...

    def body(self) -> dict[str, Any]: ...


@dataclass
class NativeCall:
    """The native requests of one OpenAI body, and the collector of their answers."""

    kind: Literal["chat", "generate", "embed"]
    requests: list[Any]  # ChatRequest | GenerateRequest | EmbedRequest, one per choice
    collector: Collector


def native_call(endpoint: str, body: dict[str, Any], settings: Any) -> NativeCall:
    """Translate the body of a request to `endpoint`; an unknown endpoint or a bad body raises InvalidRequestError."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if endpoint == "/v1/chat/completions":
        from ember.api.openai import chat_call

        return chat_call(body, settings)
    if endpoint == "/v1/completions":
        from ember.api.openai import completion_call

        return completion_call(body, settings)
    if endpoint == "/v1/embeddings":
        from ember.api.embeddings import embeddings_call

        return embeddings_call(body)
    raise InvalidRequestError(f"endpoint {endpoint!r} is not supported; use one of {', '.join(BATCH_ENDPOINTS)}")
