"""Options with Ollama's names and defaults, split by when they take effect.

`LoadOptions` are fixed when a model is loaded (changing one means a reload); `SamplingOptions` are chosen
per request (changing one never does). Every front end resolves options the same way: global defaults,
then the model's own parameters (a Modelfile's PARAMETER lines), then the request, later layers winning.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ember.errors import InvalidOptionError

log = logging.getLogger(__name__)

# Options Ollama still accepts but no longer acts on (its own runner ignores them too). ember accepts them
# so that clients written for Ollama keep working, and logs that they have no effect.
IGNORED_OLLAMA_OPTIONS = frozenset(
    {
        "tfs_z",
        "penalize_newline",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "num_gqa",
        "rope_frequency_base",
        "rope_frequency_scale",
    }
)

_MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "pick a random seed" value


class _OptionsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)


class SamplingOptions(_OptionsModel):
    """How the next token is chosen. Per request; never requires a reload."""

    temperature: float = Field(0.8, ge=0.0, description="Randomness; 0 always picks the most likely token.")
    top_k: int = Field(40, ge=0, description="Sample only from the k most likely tokens; 0 disables.")
    top_p: float = Field(0.9, ge=0.0, le=1.0, description="Nucleus sampling: smallest set with this mass.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    typical_p: float = Field(1.0, ge=0.0, le=1.0, description="Locally typical sampling; 1 disables.")
    repeat_penalty: float = Field(1.1, gt=0.0, le=10.0, description="Penalty on recent tokens; 1 disables.")
    repeat_last_n: int = Field(64, ge=-1, description="How many recent tokens to penalize; -1 = num_ctx.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Flat penalty on any seen token.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty growing with token count.")
    mirostat: int = Field(0, ge=0, le=2, description="Mirostat sampling: 0 off, 1 v1, 2 v2.")
    mirostat_tau: float = Field(5.0, gt=0.0, description="Mirostat target entropy.")
    mirostat_eta: float = Field(0.1, gt=0.0, le=1.0, description="Mirostat learning rate.")
    seed: int = Field(-1, ge=-1, le=_MAX_SEED, description="Random seed; -1 picks one at random.")
    stop: tuple[str, ...] = Field((), description="Strings that end the answer; never part of the output.")
    num_predict: int = Field(-1, ge=-2, description="Most tokens to generate; -1 = until the context is full.")
    num_keep: int = Field(4, ge=-1, description="Prompt tokens kept from the start when truncating.")
    logit_bias: dict[int, float] | None = Field(
        None, description="Added to a token's logit, by token id: -100 bans the token, 100 all but forces it."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
            value = tuple(value)
            if any(isinstance(item, str) and item == "" for item in value):
                raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if not value:
            return None
        for token, bias in value.items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias:g}; a bias must be from -100 to 100")
        return value

    def max_new_tokens(self, room: int) -> int:
        """Tokens this request may generate when `room` context cells are left after the prompt."""
        if self.num_predict < 0:
            return room
        return min(self.num_predict, room)


class LoadOptions(_OptionsModel):
    """How a model is loaded. Changing any of these means loading the model again."""

    num_ctx: int = Field(4096, ge=16, le=1 << 20, description="Context window per sequence, in tokens.")
    num_batch: int = Field(512, ge=1, le=1 << 16, description="Most prompt tokens decoded in one step.")
    num_thread: int = Field(0, ge=0, le=1024, description="CPU threads; 0 = one per physical core.")
    num_gpu: int = Field(-1, ge=-1, le=100_000, description="Layers offloaded to the GPU; -1 = automatic.")
    main_gpu: int = Field(0, ge=0, le=64, description="GPU used for small tensors and scratch buffers.")
    use_mmap: bool | None = Field(None, description="Map the model file instead of reading it; None = auto.")
    use_mlock: bool = Field(False, description="Lock the model in RAM so it is never swapped out.")
    flash_attn: bool | None = Field(None, description="Flash attention; None lets llama.cpp decide.")
    num_parallel: int = Field(1, ge=1, le=256, description="Sequences decoded together, each with num_ctx.")
    deterministic: bool = Field(
        False, description="Prefill in exact chunks: temp-0 answers never depend on the KV cache; slower prefill."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="transformers engine: the weights' dtype once loaded; None = as the model's config says."
    )
    device_map: str | None = Field(
        None,
        max_length=64,
        description='transformers engine: where the weights go ("auto", "cpu", "cuda", "cuda:1"); None = the GPU '
        "when there is one (num_gpu 0 keeps the CPU).",
    )


_OptionsT = TypeVar("_OptionsT", bound=_OptionsModel)

SAMPLING_OPTION_NAMES = frozenset(SamplingOptions.model_fields)
LOAD_OPTION_NAMES = frozenset(LoadOptions.model_fields)
ALL_OPTION_NAMES = SAMPLING_OPTION_NAMES | LOAD_OPTION_NAMES


def _describe_validation_error(error: ValidationError, values: Mapping[str, Any]) -> str:
    parts = []
    for detail in error.errors():
        name = str(detail["loc"][0]) if detail["loc"] else "options"
        message = detail["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        shown = values.get(name, detail.get("input"))
        parts.append(f"invalid option {name}={shown!r}: {message[0].lower()}{message[1:]}")
    return "; ".join(parts)


def _check_names(values: Mapping[str, Any]) -> dict[str, Any]:
    known: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue  # "not set", as Ollama treats a null option
        if name in ALL_OPTION_NAMES:
            known[name] = value
        elif name in IGNORED_OLLAMA_OPTIONS:
            log.warning("option %s has no effect in ember (Ollama ignores it too)", name)
        else:
            close = difflib.get_close_matches(name, sorted(ALL_OPTION_NAMES), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid options: {', '.join(sorted(ALL_OPTION_NAMES))}"
            raise InvalidOptionError(f"unknown option {name!r}{hint}")
    return known


def known_options(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Options as Ollama's HTTP API takes them: an unknown name is logged and ignored (Ollama warns "invalid
    option provided" and goes on; Open WebUI sends its own custom parameters there), the known ones are kept
    and validated later like any option. The Python API stays strict: a typo there is an error."""
    if values is None:
        return None
    kept = {}
    for name, value in values.items():
        if name in ALL_OPTION_NAMES:
            kept[name] = value
        elif name in IGNORED_OLLAMA_OPTIONS:
            log.warning("option %s has no effect in ember (Ollama ignores it too)", name)
        else:
            close = difflib.get_close_matches(name, sorted(ALL_OPTION_NAMES), n=1)
            log.warning("ignoring unknown option %r%s", name, f" (did you mean {close[0]}?)" if close else "")
    return kept


def _merge(layers: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update(_check_names(layer))
    return merged


def _build(model: type[_OptionsT], values: dict[str, Any], shown: Mapping[str, Any]) -> _OptionsT:
    try:
        return model(**values)
    except ValidationError as error:
        raise InvalidOptionError(_describe_validation_error(error, shown)) from None


def resolve_options(*layers: Mapping[str, Any] | None) -> tuple[LoadOptions, SamplingOptions]:
    """Merge option layers (later wins) and validate them into the two kinds.

    >>> load, sampling = resolve_options({"temperature": 0.2}, {"num_ctx": 1024, "temperature": 0})
    >>> (load.num_ctx, sampling.temperature)
    (1024, 0.0)
    """
    merged = _merge(layers)
    load = _build(LoadOptions, {k: v for k, v in merged.items() if k in LOAD_OPTION_NAMES}, merged)
    sampling = _build(SamplingOptions, {k: v for k, v in merged.items() if k in SAMPLING_OPTION_NAMES}, merged)
    return load, sampling


def sampling_options(*layers: Mapping[str, Any] | None) -> SamplingOptions:
    """Validate sampling options only, for a caller whose model is already loaded."""
    merged = _merge(layers)
    load_names = sorted(set(merged) & LOAD_OPTION_NAMES)
    if load_names:
        raise InvalidOptionError(
            f"{', '.join(load_names)} can only be set when the model is loaded; "
            "pass it to ember.Model(...) instead of to this call"
        )
    return _build(SamplingOptions, merged, merged)


def load_options(*layers: Mapping[str, Any] | None) -> LoadOptions:
    """Validate load-time options only; a sampling option here is an error."""
    merged = _merge(layers)
    sampling_names = sorted(set(merged) & SAMPLING_OPTION_NAMES)
    if sampling_names:
        raise InvalidOptionError(f"{', '.join(sampling_names)} is a sampling option; pass it with each request instead")
    return _build(LoadOptions, merged, merged)
