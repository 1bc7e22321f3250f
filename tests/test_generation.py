"""What sampling options do, shown with the real default model."""

from __future__ import annotations

from collections import Counter

import pytest

import ember
from tests.conftest import greedy

STORY_PROMPT = "Write a short story about a dragon who learns to bake bread."


def test_temperature_zero_is_deterministic(model: ember.Model) -> None:
    first = model.generate(STORY_PROMPT, temperature=0, num_predict=40)
    second = model.generate(STORY_PROMPT, temperature=0, num_predict=40)
    assert first.response == second.response
    assert len(first.response) > 20


def test_a_seed_reproduces_the_text_and_other_seeds_differ(model: ember.Model) -> None:
    def sample(seed: int) -> str:
        return model.generate(STORY_PROMPT, temperature=0.8, seed=seed, num_predict=40).response

    assert sample(42) == sample(42)
    assert len({sample(1), sample(2), sample(3)}) == 3


def test_top_k_one_equals_greedy(model: ember.Model) -> None:
    greedy_text = model.generate(STORY_PROMPT, temperature=0, num_predict=40).response
    top_k_text = model.generate(STORY_PROMPT, temperature=0.9, top_k=1, seed=7, num_predict=40).response
    assert top_k_text == greedy_text


def test_num_predict_gives_exactly_that_many_tokens(model: ember.Model) -> None:
    result = model.generate("1, 2, 3, 4, 5,", raw=True, num_predict=17, **greedy())
    assert result.done_reason == "length"
    assert result.eval_count == 17
    continuation = result.context[-result.eval_count :]
    assert len(continuation) == 17
    assert model.detokenize(continuation) == result.response


def test_an_end_of_generation_token_ends_with_stop(model: ember.Model) -> None:
    result = model.chat([{"role": "user", "content": "Say only the word yes."}], num_predict=200, **greedy())
    assert result.done_reason == "stop"
    assert result.eval_count < 200
    assert "<|im_end|>" not in result.message.content


def _stop_string_across_tokens(model: ember.Model, text: str, tokens: list[int]) -> str:
    """A stop string made of the end of one token and the start of the next, found in `text`."""
    pieces = [model.detokenize([token]) for token in tokens]
    offset = 0
    for index in range(5, len(pieces) - 1):
        offset = len("".join(pieces[:index]))
        left, right = pieces[index - 1], pieces[index]
        if len(left.strip()) >= 2 and len(right.strip()) >= 2 and left.isprintable() and right.isprintable():
            stop = left[-2:] + right[:2]
            if text.find(stop) == offset - 2:
                return stop
    raise AssertionError("no pair of printable tokens to build a stop string from")


def test_a_stop_string_spanning_tokens_ends_output_before_it_and_never_leaks(model: ember.Model) -> None:
    baseline = model.generate(STORY_PROMPT, num_predict=60, **greedy())
    tokens = baseline.context[-baseline.eval_count :]
    stop = _stop_string_across_tokens(model, baseline.response, tokens)
    expected = baseline.response[: baseline.response.find(stop)]

    chunks = list(model.generate(STORY_PROMPT, num_predict=60, stop=[stop], stream=True, **greedy()))
    streamed = "".join(chunk.response for chunk in chunks)
    assert streamed == expected
    assert chunks[-1].done_reason == "stop"
    for end in range(1, len(chunks) + 1):  # not even a prefix of the stream ever shows the stop string
        assert stop not in "".join(chunk.response for chunk in chunks[:end])
    assert model.generate(STORY_PROMPT, num_predict=60, stop=[stop], **greedy()).response == expected


def test_several_stop_strings_end_at_the_first_found(model: ember.Model) -> None:
    baseline = model.generate(STORY_PROMPT, num_predict=60, **greedy()).response
    words = baseline.split()
    early, late = words[3], words[10]
    result = model.generate(STORY_PROMPT, num_predict=60, stop=[late, early], **greedy())
    assert result.response == baseline[: baseline.find(early)]


def test_multibyte_characters_survive_streaming(model: ember.Model) -> None:
    prompt = "English: Thank you\nJapanese: ありがとう\nEnglish: Good morning\nJapanese:"
    chunks = list(model.generate(prompt, raw=True, num_predict=24, stream=True, **greedy()))
    streamed = "".join(chunk.response for chunk in chunks)
    final = model.generate(prompt, raw=True, num_predict=24, **greedy())
    generated = final.context[-final.eval_count :]
    split_pieces = 0
    for token in generated:
        try:
            model.loaded.model.piece(token).decode("utf-8")
        except UnicodeDecodeError:
            split_pieces += 1
    assert split_pieces > 0, "the test must make the model emit characters split across tokens"
    assert "\ufffd" not in streamed
    assert any(ord(character) > 0x3000 for character in streamed)
    assert streamed == final.response


def test_repeat_penalty_changes_a_repetitive_continuation(model: ember.Model) -> None:
    prompt = "1 1 1 1 1 1 1 1 1 1 1 1"
    plain = model.generate(prompt, raw=True, num_predict=20, temperature=0, repeat_penalty=1.0).response
    penalized = model.generate(prompt, raw=True, num_predict=20, temperature=0, repeat_penalty=1.5).response
    assert plain != penalized
    assert Counter(plain.split())["1"] > Counter(penalized.split())["1"]


def test_presence_and_frequency_penalties_change_the_text(model: ember.Model) -> None:
    plain = model.generate(STORY_PROMPT, num_predict=40, **greedy()).response
    with_presence = model.generate(STORY_PROMPT, num_predict=40, **greedy(presence_penalty=1.5)).response
    with_frequency = model.generate(STORY_PROMPT, num_predict=40, **greedy(frequency_penalty=1.5)).response
    assert len({plain, with_presence, with_frequency}) == 3


@pytest.mark.parametrize("options", [{"min_p": 0.2}, {"typical_p": 0.5}, {"top_p": 0.5}, {"mirostat": 2}])
def test_other_samplers_run_and_are_reproducible_with_a_seed(model: ember.Model, options: dict) -> None:
    def once() -> str:
        return model.generate(STORY_PROMPT, temperature=0.9, seed=11, num_predict=24, **options).response

    assert once() == once() != ""


def test_streamed_text_equals_non_streamed_text(model: ember.Model) -> None:
    whole = model.generate(STORY_PROMPT, num_predict=48, **greedy())
    chunks = list(model.generate(STORY_PROMPT, num_predict=48, stream=True, **greedy()))
    assert "".join(chunk.response for chunk in chunks) == whole.response
    assert [chunk.done for chunk in chunks].count(True) == 1 and chunks[-1].done

    messages = [{"role": "user", "content": "Name three rivers."}]
    whole_chat = model.chat(messages, num_predict=40, **greedy())
    chat_chunks = list(model.chat(messages, num_predict=40, stream=True, **greedy()))
    assert "".join(chunk.message.content for chunk in chat_chunks) == whole_chat.message.content


def test_format_json_gives_valid_json(model: ember.Model) -> None:
    import json

    result = model.generate(
        "Describe a cat as JSON with keys name and age.", format="json", num_predict=200, **greedy()
    )
    assert result.done_reason == "stop"
    json.loads(result.response)


def test_format_schema_gives_json_that_follows_it(model: ember.Model) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    result = model.generate("Invent a person. Reply in JSON.", format=schema, num_predict=200, **greedy())
    value = json.loads(result.response)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
