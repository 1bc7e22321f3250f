"""Embedding routes: Ollama's /api/embed and legacy /api/embeddings, and OpenAI's /v1/embeddings.

All three go through ModelManager.embed (queued like any request; keep_alive honoured). The runner returns
each input's vector as the model pooled it (mean over its tokens); /api/embed and /v1/embeddings return them
L2-normalized, as Ollama does, /api/embeddings as they are (as Ollama's legacy route does).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ember.api import schemas
from ember.api.ollama import PRIORITY_HEADER, check_caps, manager_of, read_json
from ember.api.openai_calls import NativeCall
from ember.embeddings import finish_vector, float32_base64
from ember.errors import InvalidRequestError
from ember.types import EmbedRequest, EmbedResponse, build_request

router = APIRouter()


async def _embed(request: Request, native: EmbedRequest) -> EmbedResponse:
    check_caps(request, native.options)
    return await manager_of(request).embed(
        native,
        priority=request.headers.get(PRIORITY_HEADER),
        timeout=request.app.state.settings.request_timeout,
    )


@router.post("/api/embed", openapi_extra=schemas.EMBED)
async def embed(request: Request) -> dict[str, Any]:
    native = build_request(EmbedRequest, **await read_json(request))
    result = await _embed(request, native)
    vectors = [finish_vector(v, normalize=True, dimensions=native.dimensions) for v in result.embeddings]
    return {**result.model_dump(), "model": native.model, "embeddings": vectors}


@router.post("/api/embeddings", openapi_extra=schemas.EMBEDDINGS)
async def embeddings(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    prompt = body.pop("prompt", "")
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string")
    native = build_request(EmbedRequest, **{**body, "input": prompt})
    result = await _embed(request, native)
    if not result.embeddings:  # an empty prompt only loads the model, as in Ollama
        return {"embedding": []}
    return {"embedding": finish_vector(result.embeddings[0], normalize=False, dimensions=native.dimensions)}


def embeddings_call(body: dict[str, Any]) -> NativeCall:
    """An OpenAI embeddings body as one native embed request and the collector that shapes its answer."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise InvalidRequestError("input must be a string or a non-empty list of strings")
    if not all(isinstance(text, str) for text in texts):
        raise InvalidRequestError("input must be text: token arrays are not supported by ember; send the strings")
    if not all(texts):
        raise InvalidRequestError("input must not contain empty strings")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError(f'encoding_format must be "float" or "base64", not {encoding!r}')
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise InvalidRequestError("dimensions must be a positive integer")
    model = body.get("model")
    native = build_request(EmbedRequest, model=model or "", input=texts, dimensions=dimensions)
    return NativeCall("embed", [native], EmbeddingsCollector(model, encoding, dimensions))


class EmbeddingsCollector:
    """Shapes the native embeddings of one request as OpenAI's list of embedding objects."""

    def __init__(self, model: Any, encoding: str, dimensions: int | None) -> None:
        self.head = {"model": model}
        self.encoding, self.dimensions = encoding, dimensions
        self.result: EmbedResponse | None = None

    def add(self, index: int, chunk: EmbedResponse) -> None:
        self.result = chunk

    def body(self) -> dict[str, Any]:
        assert self.result is not None, "no embeddings were added"
        data = []
        for index, vector in enumerate(self.result.embeddings):
            values = finish_vector(vector, normalize=True, dimensions=self.dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": float32_base64(values) if self.encoding == "base64" else values,
                }
            )
        tokens = self.result.prompt_eval_count
        return {
            "object": "list",
            "data": data,
            "model": self.head["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


@router.post("/v1/embeddings", openapi_extra=schemas.OPENAI_EMBEDDINGS)
async def openai_embeddings(request: Request) -> dict[str, Any]:
    call = embeddings_call(await read_json(request))
    call.collector.add(0, await _embed(request, call.requests[0]))
    return call.collector.body()
