"""What the server knows about the request being served: its id, its time limits, and what happened to it.

The HTTP layer (api/request_log.py) opens a RequestRecord for each request and keeps it in a context variable;
the manager reads the record's time limits and writes into it which model served the request, its token
counts, its time to first token and its error, so that the request log line, the metrics and the
`X-Ember-Model` header all come from one place. Code that runs outside a request (batch lines, schedules, the
worker) has no record: the manager then uses the server's default limits alone.
"""

from __future__ import annotations

import math
import time
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from ember.errors import InvalidRequestError

TIMEOUT_HEADER = "x-ember-timeout"
_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
MAX_ID_LENGTH = 128


@dataclass
class RequestRecord:
    """One request as the server saw it; filled in as it is served (see the module's docstring)."""

    id: str
    route: str
    method: str = ""
    client: str | None = None
    arrived: float = field(default_factory=time.time)  # wall clock
    started: float = field(default_factory=time.monotonic)
    total_timeout: float | None = None  # asked for by this request ("timeout" or X-Ember-Timeout); None: default
    model: str | None = None  # the model asked for
    served_by: str | None = None  # the model that answered (a fallback may answer for the one asked for)
    fell_back: bool = False  # served_by is a fallback of the model asked for
    status: int | None = None
    prompt_tokens: int = 0
    eval_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None  # seconds from arrival to the first chunk of the answer
    error: str | None = None
    from_cache: bool = False
    prompt: Any = None  # only kept when EMBER_LOG_CONTENT=1
    answer: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


_current: ContextVar[RequestRecord | None] = ContextVar("ember_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the request being served in this context, or None outside a request."""
    return _current.get()


def open_request(record: RequestRecord) -> Token[RequestRecord | None]:
    return _current.set(record)


def close_request(token: Token[RequestRecord | None]) -> None:
    _current.reset(token)


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a sensible token (so it can be traced across services), else a new
    one; anything else (too long, spaces, control characters) is replaced rather than written to the logs."""
    if given and len(given) <= MAX_ID_LENGTH and set(given) <= _ID_CHARACTERS:
        return given
    return uuid.uuid4().hex


def parse_timeout(value: Any, where: str, cap: float) -> float:
    """A request's own total timeout in seconds: a positive number no larger than the server's cap."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidRequestError(f"{where} must be a number of seconds, such as 30; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{where} must be a positive number of seconds, such as 30; got {value!r}")
    if value > cap:
        raise InvalidRequestError(
            f"{where} is {value:g} s but this server allows at most {cap:g} s (EMBER_MAX_TIMEOUT); ask for less"
        )
    return float(value)


def take_body_timeout(body: dict[str, Any], cap: float) -> None:
    """Apply (and remove) ember's `"timeout"` field of a request body to the current request."""
    if "timeout" not in body:
        return
    value = body.pop("timeout")
    if value is None:
        return
    seconds = parse_timeout(value, '"timeout"', cap)
    record = current_request()
    if record is not None:
        record.total_timeout = seconds
