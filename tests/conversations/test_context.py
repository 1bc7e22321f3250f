"""Context strategies, with the real tokenizer and chat template of the default model.

The planner is logic around the model: the summaries here are written by a stand-in (the real model writes them
in tests/api/test_conversations.py), and the counts are the real ones. The prompt counter itself is checked
against what the loaded model decodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ember
from ember.conversations.context import (
    SLIDE_TO,
    SUMMARIZE_AT,
    SUMMARIZE_TO,
    SUMMARY_HEADING,
    ContextPlan,
    ContextPlanner,
    ConversationOverflowError,
    Entry,
)
from ember.conversations.db import new_id
from ember.conversations.records import ContextSettings, StoredMessage
from ember.conversations.retrieval import Ranker
from ember.conversations.store import ConversationStore, NewMessage
from ember.conversations.tokens import PromptCounter, window_for
from ember.store.resolve import resolve_model
from ember.types import Message
from tests.conftest import greedy

SYSTEM = "You are a helpful assistant. Answer briefly."
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "stormy", "mild"]


@pytest.fixture(scope="module")
def counter() -> Iterator[PromptCounter]:
    counter = PromptCounter(resolve_model("smollm2"))
    yield counter
    counter.close()


def entry(counter: PromptCounter, role: str, content: str, *, pinned: bool = False, new: bool = False) -> Entry:
    message = Message(role=role, content=content)  # type: ignore[arg-type]
    return Entry(id=new_id("msg"), message=message, tokens=counter.message_tokens(message), pinned=pinned, new=new)


def planner(counter: PromptCounter, strategy: str, num_ctx: int, **fields: Any) -> ContextPlanner:
    async def count(messages: list[Message]) -> int:
        return len(counter.prompt_tokens(messages))

    window = window_for(resolve_model("smollm2"), {}, {"num_ctx": num_ctx, "num_predict": 32})
    return ContextPlanner(
        strategy=strategy, settings=ContextSettings(), window=window, count=count, system=SYSTEM, **fields
    )


def run_turns(counter: PromptCounter, plan_with: ContextPlanner, turns: int) -> list[tuple[ContextPlan, list[int]]]:
    """A conversation of `turns` turns, the planner's state carried from turn to turn as the service does."""
    history: list[Entry] = [entry(counter, "user", "Remember: my locker code is 7391.", pinned=True)]
    history.append(entry(counter, "assistant", "I will remember your locker code."))
    results = []
    for n in range(turns):
        question = entry(counter, "user", f"Turn {n}: what will the weather be on day {n}?", new=True)
        plan = asyncio.run(plan_with.plan([*history, question]))
        results.append((plan, counter.prompt_tokens(plan.messages)))
        plan_with.state = plan.state
        question.new = False
        history += [question, entry(counter, "assistant", f"On day {n} it will be {WEATHER[n % 8]} and {n % 30} C.")]
    return results


def test_the_counter_counts_what_the_model_decodes(counter: PromptCounter, model: ember.Model) -> None:
    messages = [
        Message(role="system", content=SYSTEM),
        Message(role="user", content="Hello, who are you?"),
        Message(role="assistant", content="I am a small model."),
        Message(role="user", content="Write one word."),
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tools": tools}):
        answer = model.chat([m.model_dump() for m in messages], options=greedy(num_predict=1), **extra)
        decoded = answer.prompt_eval_count + answer.prompt_cached_count
        assert len(counter.prompt_tokens(messages, tools=extra.get("tools"))) == decoded
    without_system = messages[1:]  # the template's own default system prompt is counted too
    answer = model.chat([m.model_dump() for m in without_system], options=greedy(num_predict=1))
    assert len(counter.prompt_tokens(without_system)) == answer.prompt_eval_count + answer.prompt_cached_count


def test_none_sends_everything_or_refuses_with_the_numbers(counter: PromptCounter) -> None:
    short = [entry(counter, "user", "Hi", new=True)]
    plan = asyncio.run(planner(counter, "none", 256).plan(short))
    assert plan.messages[0].content == SYSTEM and plan.dropped == [] and plan.prompt_tokens <= plan.window.budget
    long = [entry(counter, "user", "word " * 300, new=True)]
    with pytest.raises(ConversationOverflowError) as caught:
        asyncio.run(planner(counter, "none", 256).plan(long))
    assert f"only {plan.window.budget} of num_ctx 256" in str(caught.value) and caught.value.prompt_tokens > 256


def test_sliding_keeps_system_pins_and_last_turns_in_rare_steps(counter: PromptCounter) -> None:
    results = run_turns(counter, planner(counter, "sliding", 256), 30)
    steps = 0
    for turn, ((plan, tokens), (previous, previous_tokens)) in enumerate(zip(results[1:], results, strict=False)):
        assert plan.prompt_tokens == len(tokens) <= plan.window.budget
        assert plan.messages[0].content == SYSTEM and "7391" in plan.messages[1].content  # system, then the pin
        assert plan.messages[-1].content.startswith(f"Turn {turn + 1}:")
        if len(plan.dropped) > len(previous.dropped):  # a step: a large one, down to SLIDE_TO of the budget
            steps += 1
            assert plan.prompt_tokens <= SLIDE_TO * plan.window.budget
        else:  # no step: the prompt continues the last one, token for token (the engine can reuse its KV)
            assert tokens[: len(previous_tokens) - 3] == previous_tokens[:-3]  # less "<|im_start|>assistant\n"
    assert results[-1][0].dropped and 1 <= steps <= len(results) // 2


def test_summarize_folds_in_large_rare_steps(counter: PromptCounter) -> None:
    summaries: dict[str, StoredMessage] = {}
    folded: list[list[str]] = []

    async def summarize(previous: str | None, messages: list[Message], room: int) -> str:
        folded.append([m.content for m in messages])
        return f"Part {len(folded)}: the user asked about the weather of {len(messages) // 2} days."

    async def store_summary(text: str, info: dict[str, Any]) -> str:
        summary = StoredMessage(id=new_id("msg"), conversation_id="", parent_id=None, seq=0, role="system")
        summary.content, summary.info, summary.kind = text, info, "summary"
        summaries[summary.id] = summary
        return summary.id

    async def load_summary(summary_id: str) -> StoredMessage | None:
        return summaries.get(summary_id)

    summarizing = planner(
        counter, "summarize", 512, summarize=summarize, store_summary=store_summary, load_summary=load_summary
    )
    results = run_turns(counter, summarizing, 40)
    assert 1 <= len(folded) <= len(results) // 4  # rare steps
    for (plan, tokens), (previous, _) in zip(results[1:], results, strict=False):
        assert plan.prompt_tokens == len(tokens) <= SUMMARIZE_AT * plan.window.budget
        assert "7391" in " ".join(m.content for m in plan.messages)  # the pin is never folded away
        if plan.summary_id != previous.summary_id:  # a fold: a large step, to about SUMMARIZE_TO of the budget
            assert plan.prompt_tokens <= (SUMMARIZE_TO + 0.1) * plan.window.budget
    last = results[-1][0]
    assert last.summarized and last.messages[0].content.startswith(SYSTEM)
    assert SUMMARY_HEADING in last.messages[0].content and f"Part {len(folded)}:" in last.messages[0].content


def test_selective_keeps_the_relevant_early_fact(counter: PromptCounter, tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "ember.db")
    conversation = store.create(model="smollm2")
    texts = ["My bicycle is painted bright orange.", "Orange is a fine colour for a bicycle."]
    for n in range(24):
        texts += [f"Turn {n}: what will the weather be on day {n}?", f"On day {n} it will be {WEATHER[n % 8]}."]
    stored = store.append(
        conversation.id, None, [NewMessage(["user", "assistant"][i % 2], t) for i, t in enumerate(texts)]
    )
    history = [
        Entry(id=m.id, message=m.to_native(), tokens=counter.message_tokens(m.to_native()), pinned=i == 2)
        for i, m in enumerate(stored)
    ]
    question = entry(counter, "user", "What colour is my bicycle?", new=True)
    selecting = planner(counter, "selective", 256, rank=Ranker(store))
    plan = asyncio.run(selecting.plan([*history, question]))
    prompt = counter.detokenize(counter.prompt_tokens(plan.messages))
    assert plan.prompt_tokens <= plan.window.budget and plan.dropped
    assert "bright orange" in prompt and "Turn 0:" in prompt  # relevant, and pinned
    assert prompt.index("bright orange") < prompt.index("Turn 0:") < prompt.index("What colour")  # original order
    assert "day 21 it will be" in prompt and "day 3 it will be" not in prompt  # the room left: the recent ones
