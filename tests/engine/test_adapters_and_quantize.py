"""Quantizing with llama.cpp's quantizer, and LoRA adapters applied at load, on the real default model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.engine.quantize import QUANTIZE_TYPES, REFUSED_TYPES, quantize_model
from ember.errors import CorruptModelError, InvalidRequestError, ModelLoadError
from ember.store.gguf_file import read_gguf
from ember.store.resolve import ModelSource, resolve_model
from tests.conftest import greedy
from tests.gguf_files import write_tiny_gguf
from tests.lora_files import write_tiny_lora

PROMPT = "Name a colour."
ANSWER = greedy(num_predict=12)


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def base_answer(source: ModelSource) -> str:
    with ember.Model(source, num_ctx=256) as model:
        return model.generate(PROMPT, **ANSWER).response


def answer_with(source: ModelSource, *adapters: Path) -> str:
    with ember.Model(dataclasses.replace(source, adapters=adapters), num_ctx=256) as model:
        result = model.generate(PROMPT, **ANSWER)
    assert result.eval_count > 0
    return result.response


# --- quantize --------------------------------------------------------------------------------------------


def test_quantize_types_cover_the_common_ones() -> None:
    common = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "f16", "f32"}
    assert common <= QUANTIZE_TYPES.keys()
    assert all(name == name.lower() for name in QUANTIZE_TYPES)
    assert not REFUSED_TYPES.keys() & QUANTIZE_TYPES.keys()


def test_quantize_to_q4_0_loads_and_answers(model_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "smollm2-q4_0.gguf"
    quantize_model(model_path, target, "Q4_0")  # type names in any case; the Q4_1 source is requantized
    info = read_gguf(target)
    assert info.file_type == "Q4_0"
    # llama.cpp keeps norms in F32 and the token embeddings at their higher precision (Q8_0 here).
    kept = {tensor.name for tensor in info.tensors if tensor.type_name != "Q4_0"}
    assert all(name.endswith("_norm.weight") or name in ("token_embd.weight", "output.weight") for name in kept)
    assert sorted(tmp_path.iterdir()) == [target]
    with ember.Model(target, num_ctx=256) as model:
        result = model.generate(PROMPT, **ANSWER)
    assert result.eval_count > 0
    assert result.response.strip()


def test_an_unknown_type_is_refused_with_the_valid_names(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown quantization type 'q9_z'.*q4_0.*q8_0"):
        quantize_model(model_path, tmp_path / "out.gguf", "q9_z")
    assert list(tmp_path.iterdir()) == []


def test_a_type_that_needs_an_importance_matrix_is_refused(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="iq2_xxs needs an importance matrix"):
        quantize_model(model_path, tmp_path / "out.gguf", "IQ2_XXS")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_inside_llama_cpp_leaves_no_file(tmp_path: Path) -> None:
    # Structurally valid GGUF, but not a model llama.cpp can load: llama_model_quantize returns non-zero.
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelLoadError, match=r"could not quantize tiny\.gguf to Q8_0: key not found"):
        quantize_model(tiny, tmp_path / "out.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == [tiny]


def test_a_damaged_source_or_a_bad_target_is_refused(model_path: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(CorruptModelError):
        quantize_model(garbage, tmp_path / "out.gguf", "q4_0")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        quantize_model(model_path, tmp_path / "missing" / "out.gguf", "q4_0")
    with pytest.raises(InvalidRequestError, match="is the source file"):
        quantize_model(model_path, model_path, "q4_0")
    assert list(tmp_path.iterdir()) == [garbage]


# --- LoRA adapters ---------------------------------------------------------------------------------------


def test_a_lora_with_zero_b_gives_exactly_the_base_output(
    model_path: Path, source: ModelSource, base_answer: str, tmp_path: Path
) -> None:
    first = write_tiny_lora(model_path, tmp_path / "zero.gguf", scale=0.0)
    second = write_tiny_lora(model_path, tmp_path / "zero-ffn.gguf", scale=0.0, targets=("ffn_up",), layers=[0, 5])
    assert answer_with(source, first, second) == base_answer


def test_a_lora_with_large_weights_changes_the_output(
    model_path: Path, source: ModelSource, base_answer: str, tmp_path: Path
) -> None:
    adapter = write_tiny_lora(model_path, tmp_path / "loud.gguf", scale=1.0)
    assert answer_with(source, adapter) != base_answer


def test_an_adapter_for_another_architecture_is_refused(model_path: Path, source: ModelSource, tmp_path: Path) -> None:
    adapter = write_tiny_lora(model_path, tmp_path / "qwen.gguf", architecture="qwen2", layers=[0])
    with pytest.raises(ModelLoadError, match=r"for the 'qwen2' architecture but .* is a 'llama' model"):
        answer_with(source, adapter)


def test_a_damaged_adapter_file_is_refused(model_path: Path, source: ModelSource, tmp_path: Path) -> None:
    adapter = write_tiny_lora(model_path, tmp_path / "lora.gguf", layers=[0, 1])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(adapter.read_bytes()[: adapter.stat().st_size - 100])
    with pytest.raises(CorruptModelError, match=r"truncated\.gguf is not a valid GGUF file"):
        answer_with(source, truncated)
    with pytest.raises(CorruptModelError, match="does not exist"):
        answer_with(source, tmp_path / "missing.gguf")


def test_a_model_file_is_not_an_adapter(model_path: Path, source: ModelSource, tmp_path: Path) -> None:
    copy = shutil.copyfile(model_path, tmp_path / "model-as-adapter.gguf")
    with pytest.raises(ModelLoadError, match="is not a LoRA adapter"):
        answer_with(source, copy)


def test_an_adapter_llama_cpp_rejects_gives_its_reason(model_path: Path, source: ModelSource, tmp_path: Path) -> None:
    # Passes ember's checks; llama.cpp returns NULL because the base has no such tensor.
    stray = {
        "blk.99.attn_q.weight.lora_a": np.zeros((4, 576), dtype=np.float32),
        "blk.99.attn_q.weight.lora_b": np.zeros((576, 4), dtype=np.float32),
    }
    adapter = write_tiny_lora(model_path, tmp_path / "stray.gguf", layers=[0], extra_tensors=stray)
    with pytest.raises(
        ModelLoadError, match=r"adapter stray.gguf for .*: LoRA tensor .blk.99.attn_q.weight. does not exist in base"
    ):
        answer_with(source, adapter)
    # Shapes that do not fit the base weight: llama.cpp checks them too.
    wrong = {"blk.1.attn_k.weight.lora_a": np.zeros((4, 576), dtype=np.float32)}
    wrong["blk.1.attn_k.weight.lora_b"] = np.zeros((576, 4), dtype=np.float32)  # attn_k's output is 192 wide
    adapter = write_tiny_lora(model_path, tmp_path / "wrong.gguf", layers=[0], extra_tensors=wrong)
    with pytest.raises(ModelLoadError, match=r"wrong.gguf for .*: tensor .blk.1.attn_k.weight. has incorrect shape"):
        answer_with(source, adapter)


def test_a_model_llama_cpp_refuses_gives_llama_cpps_reason(tmp_path: Path) -> None:
    # ember reads llama.cpp's ERROR lines (ggml level 4) for the reason, not its warnings.
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", architecture="nosucharch")
    with pytest.raises(ModelLoadError, match=r"could not load tiny\.gguf: unknown model architecture: 'nosucharch'"):
        ember.Model(tiny, num_ctx=256)
