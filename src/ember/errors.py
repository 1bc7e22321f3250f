"""Typed errors. Each carries a message a user can act on and the HTTP status it maps to.

Front ends (CLI, HTTP API) never format their own messages for these: they print `str(error)`
or send it as the error body with `error.http_status`.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember reports to a user."""

    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(EmberError):
    """The request itself is wrong: a bad option value, an unknown field, an empty prompt."""

    http_status = 400


class InvalidOptionError(InvalidRequestError):
    """An option has a value out of range or of the wrong type, or the option does not exist."""


class ContextOverflowError(InvalidRequestError):
    """The prompt does not fit in the context window and the caller did not ask for truncation."""

    def __init__(self, prompt_tokens: int, num_ctx: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the context window (num_ctx) is {num_ctx} tokens; "
            "shorten the prompt, raise num_ctx, or ask for truncation (truncate=True)"
        )
        self.prompt_tokens = prompt_tokens
        self.num_ctx = num_ctx


class ModelNotFoundError(EmberError):
    """No model of that name is known and no file exists at that path."""

    http_status = 404


class PullError(EmberError):
    """Fetching a model from a remote source failed: an HTTP error, an interrupted or damaged download, a full disk.

    502 (Bad Gateway) because most of these lie with the upstream server or the way to it, not with the request.
    """

    http_status = 502


class CorruptModelError(EmberError):
    """A model file is not a readable GGUF file (empty, truncated, garbage, damaged)."""

    http_status = 422


class ModelLoadError(EmberError):
    """llama.cpp refused a model or context (unsupported architecture, out of memory ...)."""

    http_status = 500
    transient = False  # True when another try may well succeed (the runner died while loading)


class TemplateError(EmberError):
    """A chat template failed to compile or to render."""

    http_status = 400


class EngineError(EmberError):
    """llama.cpp failed while decoding (for example the KV cache is full)."""

    http_status = 500


class BackendVersionError(EmberError):
    """The installed llama-cpp-python lacks a function ember needs."""

    http_status = 500


class ServerBusyError(EmberError):
    """Too many requests already wait for a model; refused at once rather than queued without bound.

    503 with `retry_after` (seconds, at least 1) so HTTP front ends can send a Retry-After header: an
    unbounded queue would only turn overload into timeouts and memory growth.
    """

    http_status = 503

    def __init__(self, max_queued: int, retry_after: int) -> None:
        super().__init__(
            f"server busy, please try again. maximum pending requests exceeded ({max_queued} already waiting); "
            f"retry in about {retry_after} s"
        )
        self.max_queued = max_queued
        self.retry_after = retry_after


class RequestTimeoutError(EmberError):
    """A request waited longer than its timeout for a free slot on the model."""

    http_status = 504

    def __init__(self, waited: float) -> None:
        super().__init__(
            f"the request waited {waited:g} s for a free slot on the model and timed out; "
            "raise the request's timeout to wait longer, or try again when the server is less busy"
        )
        self.waited = waited


class ResponseTimeoutError(EmberError):
    """A request ran past its first-token or total timeout: its sequence was cancelled and its slot freed."""

    http_status = 504


class ServerShuttingDownError(EmberError):
    """The server is stopping and this answer did not finish within the shutdown grace period."""

    http_status = 503


class DiskFullError(EmberError):
    """The disk holding EMBER_HOME is full: the write was abandoned whole (507 Insufficient Storage)."""

    http_status = 507
