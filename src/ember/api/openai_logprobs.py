"""OpenAI's logprobs: the shapes of chat and (legacy) completion choices (openai_protocol.py checks the fields).

The runner reports one entry per generated token: its text (the token's piece), logprob, bytes and the most
likely tokens at its position, from the raw logits (see `ember.logprobs`). Chat completions return them as
they are (`choices[i].logprobs.content`); completions in the legacy shape {tokens, token_logprobs,
top_logprobs, text_offset}. The end-of-generation token is not part of the answer and has no entry.
"""

from __future__ import annotations

from typing import Any

from ember.logprobs import completion_logprobs

MAX_TOP_LOGPROBS = 20

__all__ = ["MAX_TOP_LOGPROBS", "Offsets", "chat_logprobs", "entries_of"]


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
