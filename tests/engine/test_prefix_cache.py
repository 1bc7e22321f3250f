"""The prefix cache with the real model: a conversation whose slot was taken comes back from host RAM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import ember
from ember.engine.scheduler import common_prefix
from tests.conftest import greedy


@pytest.fixture(scope="module")
def two_slots() -> Iterator[ember.Model]:
    """Two slots, exact (deterministic) prefill, and the host-RAM tier on (its default budget)."""
    with ember.Model("smollm2", num_ctx=512, num_parallel=2, deterministic=True) as loaded:
        assert loaded.loaded.engine.scheduler.host.budget > 0
        yield loaded


def _chat(model: ember.Model, messages: list[dict[str, str]]) -> ember.ChatResponse:
    return model.chat(messages, **greedy(num_predict=24))


def test_a_conversation_whose_slot_was_taken_comes_back_from_host_ram_with_the_same_answer(
    two_slots: ember.Model,
) -> None:
    engine = two_slots.loaded.engine
    scheduler = engine.scheduler
    engine.forget_cache()
    system = {"role": "system", "content": "You are a patient geography teacher. Answer in two sentences."}
    first_turn = [system, {"role": "user", "content": "Which river is the longest in Africa?"}]
    first = _chat(two_slots, first_turn)
    (held,) = [list(slot.tokens) for slot in scheduler.slots if slot.tokens]  # the first conversation's KV
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": first.message.content},
        {"role": "user", "content": "Which countries does it flow through?"},
    ]
    # Two more conversations with the same system prompt: the first copies it from the first conversation's
    # slot into the empty one; the second takes the least recently used slot, the first conversation's, whose
    # KV moves to host RAM.
    for question in ("Which is the highest mountain in Asia?", "Name a large desert."):
        _chat(two_slots, [system, {"role": "user", "content": question}])
    in_host = [entry for entry in scheduler.host.entries.values() if entry.tokens == held]
    assert in_host, "the first conversation should be in host RAM"
    assert all(common_prefix(slot.tokens, held) < len(held) // 2 for slot in scheduler.slots), (
        "no slot should still hold the first conversation"
    )

    restored = _chat(two_slots, second_turn)
    # Its first turn came back (slots hold only the shared system prompt); only the new turn is prefilled.
    assert restored.prompt_cached_count >= first.prompt_eval_count + first.prompt_cached_count
    assert in_host[0].id not in scheduler.host.entries  # moved back into a slot

    engine.forget_cache()
    scheduler.prefix_reuse = False
    try:
        fresh = _chat(two_slots, second_turn)
    finally:
        scheduler.prefix_reuse = True
    assert fresh.prompt_cached_count == 0
    assert fresh.message.content == restored.message.content
    assert fresh.prompt_eval_count == restored.prompt_eval_count + restored.prompt_cached_count
