"""The engine's step loop with the real model: shared batches, cancellation, slots."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import ember
from ember.engine.engine import Engine
from ember.engine.llamacpp import TokenBatch
from ember.engine.sequence import DoneReason, SequenceRequest
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.options import sampling_options

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
OPTIONS = [
    {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24},
    {"temperature": 0, "repeat_penalty": 1.3, "num_predict": 32},
    {"temperature": 0, "presence_penalty": 1.0, "num_predict": 20},
    {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 28, "stop": ["\n\n"]},
]


@pytest.fixture(scope="module")
def parallel_model() -> Iterator[ember.Model]:
    with ember.Model("smollm2", num_ctx=512, num_parallel=4, deterministic=True) as loaded:
        yield loaded


def _requests(model: ember.Model) -> list[SequenceRequest]:
    requests = []
    for prompt, options in zip(PROMPTS, OPTIONS, strict=True):
        sampling = sampling_options(options)
        tokens = model.tokenize(prompt)
        requests.append(SequenceRequest(tokens, sampling, sampling.max_new_tokens(512 - len(tokens))))
    return requests


def _run_alone(engine: Engine, request: SequenceRequest) -> tuple[str, list[int]]:
    sequence = engine.submit(request)
    text = "".join(update.text for update in engine.run([sequence]))
    return text, sequence.output_tokens


def test_four_sequences_in_shared_batches_match_each_alone(
    parallel_model: ember.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = parallel_model.loaded.engine
    requests = _requests(parallel_model)
    alone = [_run_alone(engine, request) for request in requests]

    sequences_per_decode: list[set[int]] = []
    real_decode = engine.context.decode

    def spying_decode(batch: TokenBatch) -> None:
        sequences_per_decode.append({batch.raw.seq_id[i][0] for i in range(batch.size)})
        real_decode(batch)

    monkeypatch.setattr(engine.context, "decode", spying_decode)
    sequences = [engine.submit(request) for request in requests]
    texts = {sequence.id: "" for sequence in sequences}
    for update in engine.run(sequences):
        texts[update.sequence.id] += update.text

    together = [(texts[sequence.id], sequence.output_tokens) for sequence in sequences]
    assert together == alone
    assert all(text for text, _ in alone)
    # All four prompts were prefilled in one batch, and the four streams then decoded side by side.
    assert sequences_per_decode[0] == {0, 1, 2, 3}
    shortest = min(len(tokens) for _, tokens in alone)
    assert sum(1 for seq_ids in sequences_per_decode if len(seq_ids) == 4) >= shortest - 1
    assert len(sequences_per_decode) <= max(len(tokens) for _, tokens in alone) + 1


def test_more_sequences_than_slots_wait_and_then_run(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    requests = _requests(parallel_model) + _requests(parallel_model)[:2]
    sequences = [engine.submit(request) for request in requests]
    for _ in engine.run(sequences):
        pass
    assert all(sequence.done for sequence in sequences)
    assert sequences[4].output_tokens == sequences[0].output_tokens
    assert sequences[5].output_tokens == sequences[1].output_tokens
    assert sequences[4].started_ns >= min(s.finished_ns for s in sequences[:4])


def test_cancelling_a_sequence_frees_its_slot_and_leaves_the_others(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    requests = _requests(parallel_model)
    expected = [_run_alone(engine, request)[1] for request in requests[1:]]

    sequences = [engine.submit(request) for request in requests]
    updates = engine.run(sequences)
    for update in updates:
        if update.sequence is sequences[0] and update.sequence.output_tokens:
            engine.cancel(sequences[0])
            break
    for _ in updates:
        pass
    assert sequences[0].done_reason is DoneReason.CANCELLED
    assert [sequence.output_tokens for sequence in sequences[1:]] == expected
    assert sorted(engine.scheduler.free_slots()) == [0, 1, 2, 3]
    assert not engine.has_work()


def test_closing_a_run_early_cancels_its_sequence(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    sequence = engine.submit(_requests(parallel_model)[0])
    updates = engine.run([sequence])
    next(updates)
    updates.close()
    engine.step()
    assert sequence.done_reason is DoneReason.CANCELLED
    assert sorted(engine.scheduler.free_slots()) == [0, 1, 2, 3]


def test_a_waiting_sequence_can_be_cancelled(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    sequence = engine.submit(_requests(parallel_model)[0])
    engine.cancel(sequence)
    updates = engine.step()
    assert sequence.done_reason is DoneReason.CANCELLED
    assert [update.done for update in updates if update.sequence is sequence] == [True]


def test_the_engine_refuses_what_cannot_run(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    sampling = sampling_options({})
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit(SequenceRequest([], sampling, 8))
    with pytest.raises(ContextOverflowError, match=r"600.*512"):
        engine.submit(SequenceRequest([1] * 600, sampling, 8))
    with pytest.raises(InvalidRequestError, match="token"):
        engine.submit(SequenceRequest([10**9], sampling, 8))
    assert not engine.has_work()


def test_the_context_window_ends_a_sequence_with_length(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    tokens = parallel_model.tokenize("word " * 500)[:500]
    sampling = sampling_options({"temperature": 0})
    sequence = engine.submit(SequenceRequest(tokens, sampling, 1000))
    for _ in engine.run([sequence]):
        pass
    assert sequence.done_reason in (DoneReason.LENGTH, DoneReason.STOP)
    assert len(tokens) + len(sequence.output_tokens) <= 512 + 1


def test_a_second_chat_turn_reuses_the_first_turns_kv_and_gives_the_same_text(parallel_model: ember.Model) -> None:
    engine = parallel_model.loaded.engine
    first_turn = [{"role": "user", "content": "Name a large animal."}]
    first = parallel_model.chat(first_turn, num_predict=16, temperature=0, repeat_penalty=1.0)
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": first.message.content},
        {"role": "user", "content": "Where does it live?"},
    ]

    reused = parallel_model.chat(second_turn, num_predict=24, temperature=0, repeat_penalty=1.0)
    assert reused.prompt_cached_count > 20
    engine.forget_cache()
    engine.scheduler.prefix_reuse = False
    try:
        fresh = parallel_model.chat(second_turn, num_predict=24, temperature=0, repeat_penalty=1.0)
    finally:
        engine.scheduler.prefix_reuse = True
    assert fresh.prompt_cached_count == 0
    assert fresh.message.content == reused.message.content
    assert fresh.prompt_eval_count == reused.prompt_eval_count + reused.prompt_cached_count


def test_the_same_prompt_again_decodes_only_its_last_token(parallel_model: ember.Model) -> None:
    prompt = "The history of the Roman Empire begins"
    first = parallel_model.generate(prompt, raw=True, num_predict=8, temperature=0)
    again = parallel_model.generate(prompt, raw=True, num_predict=8, temperature=0)
    assert again.response == first.response
    assert again.prompt_eval_count == 1
    assert again.prompt_cached_count == first.prompt_eval_count + first.prompt_cached_count - 1


def test_forks_share_the_prompt_and_match_separate_runs(
    parallel_model: ember.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = parallel_model.loaded.engine
    engine.forget_cache()
    tokens = parallel_model.tokenize("Write a sentence about the ocean.")
    samplings = [sampling_options({"temperature": 0.9, "seed": seed, "num_predict": 16}) for seed in (1, 2, 3)]
    alone = []
    for sampling in samplings:
        engine.forget_cache()
        alone.append(_run_alone(engine, SequenceRequest(tokens, sampling, 16))[1])
    engine.forget_cache()

    prefilled: list[int] = []
    real_decode = engine.context.decode

    def counting_decode(batch: TokenBatch) -> None:
        prefilled.append(batch.size)
        real_decode(batch)

    monkeypatch.setattr(engine.context, "decode", counting_decode)
    sequences = engine.submit_forks(SequenceRequest(tokens, samplings[0], 16), samplings[1:])
    for _ in engine.run(sequences):
        pass
    assert [sequence.output_tokens for sequence in sequences] == alone
    assert prefilled[0] == len(tokens)  # the prompt was decoded once, not three times
    assert all(fork.cached_tokens == len(tokens) for fork in sequences[1:])
    assert len({tuple(tokens) for tokens in alone}) > 1


def test_by_default_a_prompt_is_prefilled_in_whole_batches(model: ember.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = model.loaded.engine
    assert not engine.deterministic
    engine.forget_cache()
    sizes: list[int] = []
    real_decode = engine.context.decode

    def spying_decode(batch: TokenBatch) -> None:
        sizes.append(batch.size)
        real_decode(batch)

    monkeypatch.setattr(engine.context, "decode", spying_decode)
    tokens = model.tokenize("word " * 300)[:300]
    sequence = engine.submit(SequenceRequest(tokens, sampling_options({"temperature": 0}), 2))
    for _ in engine.run([sequence]):
        pass
    assert sizes[0] == 300 and sequence.eval_count == 2
