"""Options: Ollama's names and defaults, the two kinds kept apart, clear errors for bad values."""

from __future__ import annotations

import pytest

from ember.errors import InvalidOptionError
from ember.options import LoadOptions, SamplingOptions, load_options, resolve_options, sampling_options


def test_defaults_are_ollamas() -> None:
    sampling = SamplingOptions()
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.typical_p) == (
        0.8,
        40,
        0.9,
        0.0,
        1.0,
    )
    assert (sampling.repeat_penalty, sampling.repeat_last_n, sampling.seed, sampling.num_predict) == (1.1, 64, -1, -1)
    load = LoadOptions()
    assert (load.num_ctx, load.num_batch, load.num_gpu, load.num_thread, load.use_mlock) == (4096, 512, -1, 0, False)


def test_layers_merge_later_wins_and_split_by_kind() -> None:
    load, sampling = resolve_options({"temperature": 0.3, "num_ctx": 512}, {"temperature": 0.0, "stop": "END"})
    assert load.num_ctx == 512
    assert sampling.temperature == 0.0
    assert sampling.stop == ("END",)


def test_none_means_not_set() -> None:
    assert sampling_options({"temperature": None, "top_k": 5}).temperature == 0.8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1}, "temperature=-1"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"min_p": -0.1}, "min_p=-0.1"),
        ({"repeat_penalty": 0}, "repeat_penalty=0"),
        ({"num_predict": -3}, "num_predict=-3"),
        ({"seed": "abc"}, "seed='abc'"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"num_ctx": 0}, "num_ctx=0"),
        ({"num_gpu": -2}, "num_gpu=-2"),
        ({"mirostat": 3}, "mirostat=3"),
    ],
)
def test_out_of_range_values_name_the_option_and_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOptionError, match="invalid option") as raised:
        resolve_options(options)
    assert message in str(raised.value)


def test_an_unknown_option_suggests_the_closest_name() -> None:
    with pytest.raises(InvalidOptionError, match="unknown option 'temprature'; did you mean temperature"):
        resolve_options({"temprature": 0.5})


def test_options_ollama_ignores_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert sampling_options({"tfs_z": 1.0, "penalize_newline": True}) == SamplingOptions()
    assert "tfs_z" in caplog.text


def test_sampling_calls_refuse_load_options_and_vice_versa() -> None:
    with pytest.raises(InvalidOptionError, match="num_ctx can only be set when the model is loaded"):
        sampling_options({"num_ctx": 1024})
    with pytest.raises(InvalidOptionError, match="temperature is a sampling option"):
        load_options({"temperature": 0.1})


def test_kinds_are_disjoint() -> None:
    assert not set(SamplingOptions.model_fields) & set(LoadOptions.model_fields)
