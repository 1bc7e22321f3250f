"""One OpenAI request body as the route would run it: the seam that batch lines and queued messages go through.

A batch line (or a queued message) is the body of a request to one of the OpenAI routes. `native_call` reads it
with that route's protocol model (openai_protocol.py), so it is checked exactly as the route checks it, and
returns the route's own `OpenAICall`: the native requests to run (one per prompt, each with its n choices) and the
shape that turns their whole answers (collected with `ember.collect`) into the very body the route would return.
So there is one translation, whichever way a request comes in.

Batch jobs get `native_call` passed in (`translate`), so that the jobs layer does not reach up into the API.
"""

from __future__ import annotations

from typing import Any

from ember.api.bodies import parse
from ember.api.embeddings import embeddings_call
from ember.api.openai import OpenAICall, chat_call, completion_call
from ember.api.openai_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.errors import InvalidRequestError
from ember.jobs.batch_input import SUPPORTED_URLS as BATCH_ENDPOINTS
from ember.serve.resolve import Limits

__all__ = ["BATCH_ENDPOINTS", "OpenAICall", "native_call"]


def native_call(endpoint: str, body: Any, settings: Any) -> OpenAICall:
    """The call a body to `endpoint` makes, under `settings`' caps (n, num_predict, num_ctx: checked here too, so
    a line that runs in this process is held to them as the server holds its requests). A bad body or an
    endpoint without a translation raises InvalidRequestError, with the route's message."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    limits = Limits.from_settings(settings)
    call: OpenAICall
    if endpoint == "/v1/chat/completions":
        chat = parse(ChatCompletionRequest, body)
        limits.check_n(chat.n)
        call = chat_call(chat)
    elif endpoint == "/v1/completions":
        completion = parse(CompletionRequest, body)
        limits.check_n(completion.n)
        call = completion_call(completion)
    elif endpoint == "/v1/embeddings":
        return embeddings_call(parse(EmbeddingRequest, body), settings.openai_token_encoding)
    else:
        raise InvalidRequestError(f"endpoint {endpoint!r} is not supported; use one of {', '.join(BATCH_ENDPOINTS)}")
    for request in call.requests:
        limits.check_options(request.options)
    return call
