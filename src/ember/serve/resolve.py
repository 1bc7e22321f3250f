"""Resolve and validate a native request once, before any load or queueing.

Every way into the server (the Ollama, OpenAI and Anthropic routes, the WebSocket, and code that calls the
ModelManager directly: conversations, batches, workers) reaches `ModelManager.generate/chat/embed`, and each
of those resolves its request here first. So a request with a bad option, a value above the server's caps
(EMBER_MAX_NUM_PREDICT, EMBER_MAX_NUM_CTX), a capability the model lacks (thinking, insertion, images) or an
unknown model fails at once with a clear error, and nothing is loaded or queued for it.

Options resolve in one order, later layers winning: the server's defaults, the model's own parameters (a
Modelfile's PARAMETER lines), then the request. "Not set" (None) stays apart from false and zero, as in
Ollama: a request that says nothing about `think` or `truncate` gets Ollama's defaults, decided here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ember import capabilities
from ember.errors import InvalidRequestError
from ember.options import LoadOptions, SamplingOptions, resolve_options
from ember.store.resolve import TRANSFORMERS, ModelSource
from ember.types import ChatRequest, EmbedRequest, GenerateRequest, Priority, parse_priority

NativeRequest = GenerateRequest | ChatRequest | EmbedRequest
RequestT = TypeVar("RequestT", GenerateRequest, ChatRequest, EmbedRequest)


@dataclass(frozen=True)
class Limits:
    """The server's caps on what one request may ask for; None is no cap."""

    max_num_predict: int | None = None
    max_num_ctx: int | None = None
    max_n: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(settings.max_num_predict, settings.max_num_ctx, settings.max_n)

    def check(self, asked: Mapping[str, Any], load: LoadOptions, sampling: SamplingOptions) -> None:
        """Refuse what a request asks for (`asked`, its own options) above the caps; the server's defaults
        and a model's own parameters are the operator's choice and are not capped."""
        if "num_ctx" in asked and self.max_num_ctx is not None and load.num_ctx > self.max_num_ctx:
            raise InvalidRequestError(
                f"num_ctx={load.num_ctx} is above this server's limit of {self.max_num_ctx} (EMBER_MAX_NUM_CTX)"
            )
        if "num_predict" in asked and self.max_num_predict is not None and sampling.num_predict > self.max_num_predict:
            raise InvalidRequestError(
                f"num_predict={sampling.num_predict} is above this server's limit of {self.max_num_predict} "
                "(EMBER_MAX_NUM_PREDICT); ask for fewer tokens"
            )

    def check_options(self, options: Mapping[str, Any] | None) -> None:
        """A request's own options checked before its model is known (a queued message as it arrives, a batch
        line as it is read): their values, and the caps. A request's options win over every other layer, so
        what this refuses, `resolve_request` would refuse too."""
        asked = {k: v for k, v in (options or {}).items() if v is not None}
        load, sampling = resolve_options(asked)
        self.check(asked, load, sampling)

    def check_n(self, n: int) -> None:
        """OpenAI's `n`: the completions one request asks for (they share one prefill, but each takes a slot)."""
        if n < 1 or (self.max_n is not None and n > self.max_n):
            raise InvalidRequestError(f"n must be an integer from 1 to {self.max_n} (EMBER_MAX_N)")


@dataclass(frozen=True)
class Resolved(Generic[RequestT]):
    """A request ready to queue: its model found, its options validated, Ollama's defaults filled in."""

    request: RequestT
    name: str  # the model's canonical name (smollm2:latest)
    source: ModelSource
    load: LoadOptions
    sampling: SamplingOptions
    keep_alive: float | None
    priority: Priority = field(default=Priority.NORMAL)


def resolve_request(
    request: RequestT,
    *,
    find_model: Callable[[str], ModelSource],
    default_options: Mapping[str, Any],
    limits: Limits,
    keep_alive: float | None,
    priority: str | int | None = None,
    choices: int = 1,
) -> Resolved[RequestT]:
    """Check a native request (asking for `choices` completions) against the server's rules and the model;
    raise an EmberError that says why."""
    limits.check_n(choices)
    if not request.model:
        raise InvalidRequestError("name a model in the request's `model` field")
    source = find_model(request.model)
    own = {key: value for key, value in source.parameters.items() if key != "fallback"}  # the manager's, not an option
    load, sampling = resolve_options(default_options, own, request.options)
    limits.check({k: v for k, v in (request.options or {}).items() if v is not None}, load, sampling)
    if source.engine == TRANSFORMERS:  # what that engine cannot do is a 400 now, before any load
        from ember.engine_transformers.support import check_request

        check_request(request, sampling)
    level = parse_priority(priority if priority is not None else request.priority)
    native = apply_defaults(request, source)
    if not isinstance(native, EmbedRequest):  # it travels with the request: the engine prefills urgent prompts first
        native = native.model_copy(update={"priority": int(level)})
    return Resolved(native, source.name, source, load, sampling, keep_alive, level)


def apply_defaults(request: RequestT, source: ModelSource) -> RequestT:
    """`think` and `truncate` decided as Ollama decides them, after the capability checks (images, insertion,
    thinking). The Python API, which loads a model in its own process, resolves its requests here too."""
    if isinstance(request, EmbedRequest):
        return request
    updates: dict[str, Any] = {}
    images = [request.images] if isinstance(request, GenerateRequest) else [m.images for m in request.messages]
    if any(images):
        raise InvalidRequestError(f"model '{source.name}' does not support images; send text only")
    insert = isinstance(request, GenerateRequest) and bool(request.suffix)
    if insert and source.upstream is not None:
        raise InvalidRequestError(f'"{request.model}" is an upstream model: insertion (suffix) is not available')
    if insert and capabilities.fim_tokens(source.path) is None:
        raise InvalidRequestError(
            f'"{request.model}" does not support insert: its vocabulary has no fill-in-the-middle tokens; '
            "use a code model that has them (or send the text before the gap as the prompt)"
        )
    # A raw prompt or an insertion (FIM tokens, no template) never goes through the template that thinks.
    templated = not insert and not (isinstance(request, GenerateRequest) and request.raw)
    if templated:
        thinks = capabilities.thinks(source, request.template)
        if request.think is None and thinks:
            updates["think"] = True
        elif request.think not in (None, False) and not thinks and source.upstream is None:
            raise InvalidRequestError(f'"{request.model}" does not support thinking')
    if request.truncate is None:
        updates["truncate"] = True
    return request.model_copy(update=updates) if updates else request
