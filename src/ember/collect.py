"""Collecting a stream of answer chunks into the whole answer, in one place for every caller.

The Python API, the Ollama routes (`stream: false`), the OpenAI and Anthropic routes and the llama-cpp-python
call shapes all read the same chunks (`GenerateResponse` or `ChatResponse`): the text, the thinking, the tool
calls and the logprobs of each chunk are joined in order, and the last chunk's timings and reasons are kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from typing import Any

from ember.errors import EngineError
from ember.types import ChatResponse, GenerateResponse, Message, TokenLogprob, ToolCall

Chunk = GenerateResponse | ChatResponse


class AnswerCollector:
    """Feed it chunks with `add`; once the last one came, `result()` is the whole answer."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] = []
        self.final: Chunk | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    def add(self, chunk: Chunk) -> None:
        if isinstance(chunk, ChatResponse):
            self.text.append(chunk.message.content)
            self.thinking.append(chunk.message.thinking or "")
            self.calls.extend(chunk.message.tool_calls or ())
        else:
            self.text.append(chunk.response)
            self.thinking.append(chunk.thinking or "")
        self.logprobs.extend(chunk.logprobs or ())
        if chunk.done:
            self.final = chunk

    def result(self) -> Chunk:
        if self.final is None:
            raise EngineError("the answer ended without a final chunk")
        text, thinking = "".join(self.text), "".join(self.thinking) or None
        update: dict[str, Any] = {"logprobs": self.logprobs or None}
        if isinstance(self.final, ChatResponse):
            update["message"] = Message(
                role="assistant", content=text, thinking=thinking, tool_calls=self.calls or None
            )
        else:
            update.update(response=text, thinking=thinking)
        return self.final.model_copy(update=update)


def collect(chunks: Iterable[Chunk]) -> Any:
    """The whole answer of a stream of chunks."""
    collector = AnswerCollector()
    for chunk in chunks:
        collector.add(chunk)
        if collector.done:
            break
    return collector.result()


async def collect_async(chunks: AsyncIterable[Chunk]) -> Any:
    """The whole answer of an asynchronous stream of chunks."""
    collector = AnswerCollector()
    async for chunk in chunks:
        collector.add(chunk)
        if collector.done:
            break
    return collector.result()


def collect_choices(items: Iterable[tuple[int, Chunk]], count: int) -> list[Any]:
    """The whole answer of each of `count` choices, from their (choice index, chunk) items in one stream."""
    collectors = [AnswerCollector() for _ in range(count)]
    for index, chunk in items:
        collectors[index].add(chunk)
    return [collector.result() for collector in collectors]


async def collect_choices_async(items: AsyncIterable[tuple[int, Chunk]], count: int) -> list[Any]:
    """The whole answer of each of `count` choices, from an asynchronous stream of (choice index, chunk)."""
    collectors = [AnswerCollector() for _ in range(count)]
    async for index, chunk in items:
        collectors[index].add(chunk)
    return [collector.result() for collector in collectors]
