"""Serving with the real model through the manager and runner processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

import pytest

from ember.runner.client import RunnerCrashedError
from ember.serve.manager import ModelManager
from ember.types import ChatRequest, GenerateRequest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "The largest planet in our solar system is",
    "In 1969, astronauts",
    "A good recipe for pancakes needs",
]


def _options(index: int) -> dict[str, Any]:
    return {
        "temperature": 0,
        "num_predict": 16 + 2 * index,
        "repeat_penalty": 1.0 + 0.05 * (index % 3),
        "presence_penalty": 0.2 * (index % 2),
        "num_ctx": 1024,
        "num_parallel": 8,
    }


async def _text(manager: ModelManager, prompt: str, options: dict[str, Any]) -> str:
    request = GenerateRequest(model="smollm2", prompt=prompt, raw=True, options=options)
    return "".join([chunk.response async for chunk in manager.generate(request)])


def test_eight_concurrent_requests_match_each_alone() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        manager = ModelManager()
        try:
            alone = [await _text(manager, prompt, _options(i)) for i, prompt in enumerate(PROMPTS)]
            together = await asyncio.gather(*(_text(manager, p, _options(i)) for i, p in enumerate(PROMPTS)))
            return alone, list(together)
        finally:
            await manager.close()

    alone, together = asyncio.run(scenario())
    assert together == alone
    assert all(text.strip() for text in alone)


def test_running_streams_keep_receiving_tokens_while_a_long_prompt_prefills() -> None:
    options = {"temperature": 0, "num_ctx": 2048, "num_parallel": 4, "num_predict": 400}
    long_prompt = "The history of the city goes back many centuries and is full of stories. " * 60

    async def scenario() -> tuple[dict[int, list[float]], float, float]:
        manager = ModelManager()
        arrivals: dict[int, list[float]] = {0: [], 1: []}
        try:
            await _text(manager, "warm up", {**options, "num_predict": 1})

            async def stream(index: int) -> None:
                request = GenerateRequest(model="smollm2", prompt=f"Story number {index}:", raw=True, options=options)
                async for _ in manager.generate(request):
                    arrivals[index].append(time.perf_counter())

            streams = [asyncio.create_task(stream(i)) for i in range(2)]
            while min(len(times) for times in arrivals.values()) < 5:
                await asyncio.sleep(0.01)
            submitted = time.perf_counter()
            long_request = GenerateRequest(
                model="smollm2", prompt=long_prompt, raw=True, options={**options, "num_predict": 1}
            )
            first_token = 0.0
            async for _ in manager.generate(long_request):
                first_token = first_token or time.perf_counter()
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return arrivals, submitted, first_token
        finally:
            await manager.close()

    arrivals, submitted, first_token = asyncio.run(scenario())
    prefill_seconds = first_token - submitted
    assert prefill_seconds > 0.5, "the long prompt should take a while to prefill for this test to mean anything"
    for times in arrivals.values():
        during = [t for t in times if submitted <= t <= first_token]
        assert len(during) >= 5, f"only {len(during)} tokens arrived during a {prefill_seconds:.2f}s prefill"
        gaps = [later - earlier for earlier, later in itertools.pairwise(times) if submitted <= later <= first_token]
        assert max(gaps) < prefill_seconds / 3


def test_a_second_chat_turn_reuses_the_kv_and_gives_the_same_text() -> None:
    # Exact prefill chunks: only then is a reused prefix bit for bit what a fresh prefill computes.
    options = {"temperature": 0, "num_predict": 20, "num_ctx": 1024, "deterministic": True}
    first_turn = [{"role": "user", "content": "Name a large animal."}]

    async def scenario() -> tuple[Any, Any]:
        manager = ModelManager()
        try:
            first = [c async for c in manager.chat(ChatRequest(model="smollm2", messages=first_turn, options=options))]
            answer = "".join(chunk.message.content for chunk in first)
            second_turn = [
                *first_turn,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Where does it live?"},
            ]
            request = ChatRequest(model="smollm2", messages=second_turn, options=options)
            reused = [c async for c in manager.chat(request)]
            await manager.stop("smollm2")
            fresh = [c async for c in manager.chat(request)]
            return reused, fresh
        finally:
            await manager.close()

    reused, fresh = asyncio.run(scenario())
    assert reused[-1].prompt_cached_count > 0
    assert fresh[-1].prompt_cached_count == 0
    assert "".join(c.message.content for c in reused) == "".join(c.message.content for c in fresh)


def test_kill_9_of_a_runner_fails_its_request_clearly_and_the_next_one_succeeds() -> None:
    options = {"num_predict": 400, "num_ctx": 1024}

    async def scenario() -> tuple[BaseException | None, str]:
        manager = ModelManager()
        try:
            await _text(manager, "warm up", {**options, "num_predict": 1})
            pid = manager.entries["smollm2:latest"].runner.pid  # type: ignore[attr-defined]
            caught: BaseException | None = None
            try:
                request = GenerateRequest(model="smollm2", prompt="Tell me a long story.", options=options)
                async for chunk in manager.generate(request):
                    if chunk.response:
                        os.kill(pid, signal.SIGKILL)
            except RunnerCrashedError as error:
                caught = error
            after = await _text(manager, "Hello", {**options, "num_predict": 5})
            return caught, after
        finally:
            await manager.close()

    caught, after = asyncio.run(scenario())
    assert caught is not None and "SIGKILL" in str(caught) and "next request" in str(caught)
    assert after.strip()


@pytest.mark.parametrize("kind", ["generate", "chat"])
def test_a_bad_request_fails_alone(kind: str) -> None:
    async def scenario() -> str:
        manager = ModelManager()
        try:
            too_long = "word " * 3000
            # truncate=False: left unset, an over-long prompt is cut to fit (Ollama's default), not refused.
            with pytest.raises(Exception, match="num_ctx"):
                if kind == "generate":
                    request = GenerateRequest(
                        model="smollm2", prompt=too_long, raw=True, truncate=False, options={"num_ctx": 512}
                    )
                    [c async for c in manager.generate(request)]
                else:
                    request = ChatRequest(
                        model="smollm2",
                        messages=[{"role": "user", "content": too_long}],
                        truncate=False,
                        options={"num_ctx": 512},
                    )
                    [c async for c in manager.chat(request)]
            return await _text(manager, "Hello", {"num_ctx": 512, "num_predict": 4})
        finally:
            await manager.close()

    assert asyncio.run(scenario()).strip()


def test_several_choices_share_one_prefill_and_match_separate_requests_by_seed() -> None:
    """n completions of one prompt: the prompt is prefilled once (the others copy its KV), and choice i is
    what a separate request with seed + i gives."""
    options = {"temperature": 0.9, "seed": 11, "num_predict": 12, "num_ctx": 512, "num_parallel": 4}
    request = ChatRequest(
        model="smollm2", messages=[{"role": "user", "content": "Name three rivers."}], options=options
    )

    async def scenario() -> tuple[dict[int, Any], dict[int, str], list[str]]:
        manager = ModelManager()
        try:
            finals: dict[int, Any] = {}
            texts: dict[int, str] = {0: "", 1: "", 2: ""}
            async for index, chunk in manager.chat_choices(request, 3):
                texts[index] += chunk.message.content
                if chunk.done:
                    finals[index] = chunk
            separate = []
            for index in range(3):
                alone = request.model_copy(update={"options": {**options, "seed": 11 + index, "num_ctx": 512}})
                separate.append("".join([chunk.message.content async for chunk in manager.chat(alone)]))
            return finals, texts, separate
        finally:
            await manager.close()

    finals, texts, separate = asyncio.run(scenario())
    assert sorted(finals) == [0, 1, 2]
    prompt_length = finals[0].prompt_eval_count + finals[0].prompt_cached_count
    evaluated = sorted(final.prompt_eval_count for final in finals.values())
    assert evaluated == [0, 0, prompt_length]  # one prefill; the two forks copied its KV
    assert [texts[index] for index in range(3)] == separate
    assert len(set(separate)) > 1
