"""Running summaries for the `summarize` strategy, written by a model through the model manager at low priority.

The summarizer sees the previous summary and the turns being folded, as a transcript in one user message. A
transcript too long for the summarizer's own context is folded in parts, each into the summary of the last.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ember.types import ChatRequest, Message

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Update the summary of a conversation with its new part. Keep names, facts, numbers and decisions. "
    "Write only the summary, in a few short sentences."
)


def transcript(messages: Sequence[Message]) -> str:
    lines = []
    for message in messages:
        text = message.content
        if message.tool_calls:
            calls = ", ".join(f"{call.function.name}({call.function.arguments})" for call in message.tool_calls)
            text = f"{text} [called {calls}]".strip()
        lines.append(f"{message.role}: {text}")
    return "\n".join(lines)


def summary_request(previous: str | None, messages: Sequence[Message]) -> list[Message]:
    earlier = f"The summary so far:\n{previous}\n\n" if previous else ""
    return [
        Message(role="system", content=INSTRUCTIONS),
        Message(role="user", content=f"{earlier}The new part of the conversation:\n{transcript(messages)}"),
    ]


class Summarizer:
    """Writes summaries with one model. `chat` is the model manager's chat; `count` counts a request's prompt
    tokens and `budget` is how many the summarizer's context leaves for a prompt."""

    def __init__(
        self,
        chat: Callable[..., Any],
        model: str,
        *,
        options: dict[str, Any],
        count: Callable[[list[Message]], Awaitable[int]],
        budget: int,
        timeout: float | None = None,
    ) -> None:
        self.chat = chat
        self.model = model
        self.options = options
        self.count = count
        self.budget = budget
        self.timeout = timeout

    async def __call__(self, previous: str | None, messages: list[Message], max_tokens: int) -> str:
        summary = previous
        for part in await self._parts(previous, messages, max_tokens):
            summary = await self._write(summary, part, max_tokens) or summary
        return summary or _fallback(previous, messages, max_tokens)

    async def _parts(self, previous: str | None, messages: list[Message], max_tokens: int) -> list[list[Message]]:
        """The messages in parts that each fit the summarizer's prompt, with room for the summary so far (which
        is at most max_tokens long once the model has written it)."""
        limit = self.budget - max(max_tokens, await self.count([Message(role="user", content=previous or "")]))
        parts: list[list[Message]] = []
        current: list[Message] = []
        for message in messages:
            trial = [*current, message]
            if current and await self.count(summary_request(None, trial)) > limit:
                parts.append(current)
                current = [message]
            else:
                current = trial
        if current:
            parts.append(current)
        return parts

    async def _write(self, previous: str | None, messages: list[Message], max_tokens: int) -> str:
        request = ChatRequest(
            model=self.model,
            messages=summary_request(previous, messages),
            options={**self.options, "num_predict": max_tokens, "temperature": 0.2},
            truncate=True,
            stream=True,
        )
        parts = []
        try:
            async for chunk in self.chat(request, priority="low", timeout=self.timeout):
                parts.append(chunk.message.content)
        except Exception:  # a summary is worth less than the turn: keep the previous one and go on
            log.warning("writing a conversation summary with %s failed", self.model, exc_info=True)
            return ""
        return "".join(parts).strip()


def _fallback(previous: str | None, messages: Sequence[Message], max_tokens: int) -> str:
    """When the model wrote nothing: the start of each folded message, so the facts are not simply lost."""
    room = max(40, 3 * max_tokens)
    lines = [previous] if previous else []
    each = max(20, room // max(1, len(messages)))
    lines += [f"{m.role}: {' '.join(m.content.split())[:each]}" for m in messages if m.content.strip()]
    return "\n".join(lines)[:room]
