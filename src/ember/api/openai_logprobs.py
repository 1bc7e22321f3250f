"""OpenAI's logprobs: the request fields, and the shapes of chat and (legacy) completion choices.

The runner reports one entry per generated token: its text (the token's piece), logprob, bytes and the most
likely tokens at its position, from the raw logits (see `ember.logprobs`). Chat completions return them as
they are (`choices[i].logprobs.content`); completions in the legacy shape {tokens, token_logprobs,
top_logprobs, text_offset}. The end-of-generation token is not part of the answer and has no entry.
"""

from __future__ import annotations

from typing import Any

from ember.errors import InvalidRequestError
from ember.logprobs import completion_logprobs

MAX_TOP_LOGPROBS = 20

__all__ = ["Offsets", "chat_fields", "chat_logprobs", "completion_fields", "entries_of"]


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    return value


def chat_fields(body: dict[str, Any]) -> dict[str, Any]:
    """`logprobs: true` and `top_logprobs: N` of a chat completion, as native request fields."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequestError("logprobs must be true or false")
    if top is not None:
        top = _count(top, "top_logprobs")
        if not logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
    return {"logprobs": bool(logprobs), "top_logprobs": top or 0}


def completion_fields(body: dict[str, Any]) -> dict[str, Any]:
    """`logprobs: N` of a completion (the sampled token's logprob and the N most likely), as native fields."""
    value = body.get("logprobs")
    if value is None:
        return {"logprobs": False, "top_logprobs": 0}
    return {"logprobs": True, "top_logprobs": _count(value, "logprobs")}


def entries_of(chunk: Any) -> list[dict[str, Any]]:
    """The logprob entries a native chunk carries, as dicts."""
    return [entry.model_dump() for entry in chunk.logprobs or ()]


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A chat choice's (or delta's) `logprobs`: None when not asked for."""
    return None if entries is None else {"content": entries, "refusal": None}


class Offsets:
    """Character offsets of each choice's tokens in its text, for the completions shape as it streams."""

    def __init__(self, n: int, start: int) -> None:
        self.next = [start] * n

    def shape(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        shaped = completion_logprobs(entries, self.next[index])
        self.next[index] += sum(len(entry["token"]) for entry in entries)
        return shaped
