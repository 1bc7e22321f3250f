"""The transformers engine's logic around the model: what it refuses, what it holds back for stop strings,
how byte-level tokens map back to bytes. No model is loaded here."""

from __future__ import annotations

import pytest

from ember.engine_transformers.generator import _held_for_stop
from ember.engine_transformers.json_format import _byte_decoder
from ember.engine_transformers.support import check_request
from ember.errors import InvalidRequestError
from ember.options import sampling_options
from ember.types import ChatRequest, EmbedRequest, GenerateRequest


@pytest.mark.parametrize(
    ("request_", "options", "named"),
    [
        (GenerateRequest(prompt="x"), {"mirostat": 2}, "mirostat"),
        (GenerateRequest(prompt="x"), {"presence_penalty": 0.5}, "presence_penalty"),
        (GenerateRequest(prompt="x"), {"frequency_penalty": -1}, "frequency_penalty"),
        (GenerateRequest(prompt="x", grammar="root ::= [a]"), {}, "grammar"),
        (GenerateRequest(prompt="x", logprobs=True), {}, "logprobs"),
        (GenerateRequest(prompt="x", suffix="y"), {}, "suffix"),
        (ChatRequest(messages=[], tools=[{"type": "function"}]), {}, "tools"),
        (EmbedRequest(input="x"), {}, "embeddings"),
    ],
)
def test_what_transformers_lacks_is_a_400_naming_it(request_, options, named) -> None:
    with pytest.raises(InvalidRequestError, match=named) as refused:
        check_request(request_, sampling_options(options))
    assert refused.value.http_status == 400


def test_what_it_has_passes() -> None:
    options = {"temperature": 0.3, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.3}
    check_request(GenerateRequest(prompt="x", format="json"), sampling_options({**options, "seed": 1, "stop": ["."]}))


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("Hello wor", ("world",), 3), ("Hello", ("lo!",), 2), ("abc", ("x",), 0), ("a</", ("</s>", "<|end"), 2)],
)
def test_text_that_may_become_a_stop_string_is_held_back(text, stops, held) -> None:
    assert _held_for_stop(text, stops) == held


def test_byte_level_tokens_map_back_to_their_bytes() -> None:
    table = _byte_decoder()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert bytes(table[c] for c in "ĠParis") == b" Paris" and table["Ċ"] == 10
